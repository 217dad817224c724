//! Redaction: a copy of the configuration fit for printing and logging.

use super::{Config, HandlerConfig, OptionValue};

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// HTTP header names containing one of these carry credentials.
const SECRET_HEADER_MARKERS: &[&str] = &[
    "authorization",
    "cookie",
    "key",
    "token",
    "secret",
    "password",
];

/// Kafka property names containing one of these hold secrets.
const SECRET_OPTION_MARKERS: &[&str] = &[
    "password",
    "secret",
    "key.pem",
    "jaas",
    "oauthbearer.config",
    "token",
];

pub(super) fn redacted(config: &Config) -> Config {
    let mut c = config.clone();
    if let Some(url) = &c.database.url {
        c.database.url = Some(redact_url(url));
    }
    for (key, value) in c.kafka.options.iter_mut() {
        let lower = key.to_ascii_lowercase();
        if SECRET_OPTION_MARKERS.iter().any(|m| lower.contains(m)) {
            *value = OptionValue::Text(REDACTED.into());
        }
    }
    for handler in c.handlers.values_mut() {
        if let HandlerConfig::Http(http) = handler {
            for (name, value) in http.headers.iter_mut() {
                let lower = name.to_ascii_lowercase();
                if SECRET_HEADER_MARKERS.iter().any(|m| lower.contains(m)) {
                    *value = REDACTED.into();
                }
            }
            http.url = redact_url(&http.url);
        }
    }
    c
}

/// Replaces the password of `scheme://user:password@host/...` and any `password=` query
/// parameter.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, REDACTED);
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}={REDACTED}"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out = format!("{base}{query}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/x?sslmode=require&password=p"),
            "postgres://app:<redacted>@db:5432/x?sslmode=require&password=<redacted>"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
