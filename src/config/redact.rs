//! Redaction: which keys, options, headers, variables and URL parts hold secrets; a copy of
//! the configuration fit for printing; and the list of secret values, so that any text
//! leaving the process can be scrubbed of them.

use std::ops::Range;

use super::{Config, HandlerConfig, OptionValue};

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// Names containing one of these (in lower case) hold credentials, whether they name an
/// HTTP header, a URL query parameter, a child's environment variable or a Kafka option
/// (`sasl.password`, `ssl.key.password`, `sasl.oauthbearer.client.secret`, `sslpassword`,
/// `access_token`, `x-api-key`, `authorization`, `DB_PASSWORD`).
const SECRET_MARKERS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "credential",
    "jaas",
    "oauthbearer.config",
    "signature",
];

/// Whether a header, parameter, variable or option called `name` holds a secret: it
/// contains a marker, or it is (or ends in) `key`, `key.pem` or `pwd` (`key`, `apikey`,
/// `api_key`, `x-api-key`, `ssl.key.pem`, `sslkey`).
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| lower.contains(m))
        || ["key", "key.pem", "pwd", "sig"]
            .iter()
            .any(|end| lower.ends_with(end))
}

pub(super) fn redacted(config: &Config) -> Config {
    let mut c = config.clone();
    if let Some(url) = &c.database.url {
        c.database.url = Some(redact_url(url));
    }
    for (key, value) in kafka_options_mut(&mut c) {
        if is_secret_name(key) {
            *value = OptionValue::Text(REDACTED.into());
        }
    }
    for handler in c.handlers.values_mut() {
        match handler {
            HandlerConfig::Http(http) => {
                for (name, value) in http.headers.iter_mut() {
                    if is_secret_name(name) {
                        *value = REDACTED.into();
                    }
                }
                http.url = redact_url(&http.url);
            }
            HandlerConfig::Command(command) => {
                for (name, value) in command.env.iter_mut() {
                    if is_secret_name(name) {
                        *value = REDACTED.into();
                    }
                }
            }
            _ => {}
        }
    }
    c
}

/// Every Kafka option table: shared, producer-only and consumer-only.
fn kafka_options_mut(c: &mut Config) -> impl Iterator<Item = (&String, &mut OptionValue)> {
    let k = &mut c.kafka;
    k.options
        .iter_mut()
        .chain(k.producer_options.iter_mut())
        .chain(k.consumer_options.iter_mut())
}

/// The secret values of `config`, as they are and percent-decoded: passwords in URLs,
/// values of secret query parameters, options, headers and variables. Text that leaves the
/// process is scrubbed of them.
pub(super) fn secret_values(config: &Config) -> Vec<String> {
    let mut found = Vec::new();
    let mut url = |url: &str| {
        let parts = UrlParts::of(url);
        found.extend(parts.password.clone().map(|p| url[p].to_owned()));
        found.extend(
            parts
                .query_pairs(url)
                .filter(|(k, _)| is_secret_name(k))
                .map(|(_, v)| v.to_owned()),
        );
    };
    if let Some(u) = &config.database.url {
        url(u);
    }
    for handler in config.handlers.values() {
        if let HandlerConfig::Http(http) = handler {
            url(&http.url);
        }
    }
    let k = &config.kafka;
    for (key, value) in k
        .options
        .iter()
        .chain(&k.producer_options)
        .chain(&k.consumer_options)
    {
        if is_secret_name(key) {
            found.push(value.to_string());
        }
    }
    for handler in config.handlers.values() {
        let pairs: Box<dyn Iterator<Item = (&String, &String)>> = match handler {
            HandlerConfig::Http(http) => Box::new(http.headers.iter()),
            HandlerConfig::Command(command) => Box::new(command.env.iter()),
            _ => Box::new(std::iter::empty()),
        };
        found.extend(
            pairs
                .filter(|(name, _)| is_secret_name(name))
                .map(|(_, v)| v.clone()),
        );
    }
    let decoded: Vec<String> = found.iter().filter_map(|s| percent_decode(s)).collect();
    found.extend(decoded);
    found.retain(|s| !s.is_empty() && s != REDACTED);
    found.sort();
    found.dedup();
    found
}

/// Where the secrets of `scheme://user:password@host/...?query#fragment` may be: the byte
/// range of the password, and that of the query.
struct UrlParts {
    password: Option<Range<usize>>,
    query: Option<Range<usize>>,
}

impl UrlParts {
    fn of(url: &str) -> Self {
        let mut password = None;
        if let Some(scheme_end) = url.find("://") {
            let rest = scheme_end + 3;
            let authority_end = url[rest..]
                .find(['/', '?', '#'])
                .map_or(url.len(), |i| rest + i);
            if let Some(at) = url[rest..authority_end].rfind('@') {
                if let Some(colon) = url[rest..rest + at].find(':') {
                    password = Some(rest + colon + 1..rest + at);
                }
            }
        }
        let query = url.find('?').map(|q| {
            let end = url[q..].find('#').map_or(url.len(), |i| q + i);
            q + 1..end
        });
        UrlParts { password, query }
    }

    /// The `(name, value)` pairs of the query.
    fn query_pairs<'a>(&self, url: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        let query = self.query.clone().map_or("", |q| &url[q]);
        query.split('&').filter_map(|kv| kv.split_once('='))
    }
}

/// Replaces the password of `scheme://user:password@host/...` and the values of secret
/// query parameters (see [`is_secret_name`]).
pub fn redact_url(url: &str) -> String {
    let parts = UrlParts::of(url);
    let mut out = url.to_owned();
    if let Some(q) = parts.query {
        let query = url[q.clone()]
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret_name(k) => format!("{k}={REDACTED}"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out.replace_range(q, &query);
    }
    if let Some(p) = parts.password {
        out.replace_range(p, REDACTED);
    }
    out
}

/// `s` with `%XX` escapes decoded, when it has any and they form UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_and_secret_parameters_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/x?sslmode=require&password=p"),
            "postgres://app:<redacted>@db:5432/x?sslmode=require&password=<redacted>"
        );
        assert_eq!(
            redact_url("postgres://db/x?sslpassword=a&user=u&db_password=b&key=c"),
            "postgres://db/x?sslpassword=<redacted>&user=u&db_password=<redacted>&key=<redacted>"
        );
        assert_eq!(
            redact_url("https://h/p?token=t&api_key=k&secret=s&page=2#frag"),
            "https://h/p?token=<redacted>&api_key=<redacted>&secret=<redacted>&page=2#frag"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        // An `@` in the path is not userinfo.
        assert_eq!(redact_url("http://h/a:b@c"), "http://h/a:b@c");
    }

    #[test]
    fn secret_names_are_recognised() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.jaas.config",
            "Authorization",
            "x-api-key",
            "API_TOKEN",
            "DB_PASSWORD",
            "sslpassword",
            "key",
            "sslkey",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "linger.ms",
            "sasl.username",
            "sasl.mechanism",
            "ssl.ca.location",
            "sslmode",
            "content-type",
            "LANG",
            "keys",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn secret_values_include_decoded_forms() {
        let mut c = Config::default();
        c.database.url = Some("postgres://app:s3cr%40t@db/x?sslpassword=kp".into());
        c.kafka.options.insert(
            "sasl.password".into(),
            OptionValue::Text("swordfish".into()),
        );
        c.kafka
            .consumer_options
            .insert("linger.ms".into(), OptionValue::Int(5));
        let values = secret_values(&c);
        assert_eq!(values, ["kp", "s3cr%40t", "s3cr@t", "swordfish"]);
    }
}
