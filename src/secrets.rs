//! The process-wide scrubber: text that leaves outboxd (log lines, the final error,
//! readiness bodies, dead-letter headers, dead-row reasons) passes through [`scrub`], which
//! replaces every secret value of the configuration with `<redacted>`, whatever library
//! wrote the text. Structured redaction ([`crate::config::redact_url`], check-config)
//! removes secrets where outboxd prints a URL or option itself; this catches the rest.

use std::borrow::Cow;
use std::io::Write;
use std::sync::RwLock;

use crate::config::{Config, REDACTED};

/// Values shorter than this are not scrubbed from free text: replacing every occurrence
/// of a two-letter string would garble every line. Keep secrets longer.
pub const MIN_SCRUBBED_LEN: usize = 4;

/// The known secrets, longest first (so a secret that contains another goes whole).
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds the secret values of `config`; a reload adds the new ones and keeps the old,
/// which may still appear in texts made before it.
pub fn learn(config: &Config) {
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    secrets.extend(
        config
            .secret_values()
            .into_iter()
            .filter(|s| s.len() >= MIN_SCRUBBED_LEN),
    );
    secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    secrets.dedup();
}

/// `text` with every known secret replaced by `<redacted>`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
    }
    out
}

/// Standard error through [`scrub`], for the log subscriber: each log line arrives in one
/// write and leaves scrubbed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptionValue;

    #[test]
    fn known_secrets_leave_no_text() {
        let mut c = Config::default();
        c.database.url = Some("postgres://app:hunter2-db@db/x?sslpassword=kp-secret".into());
        c.kafka.options.insert(
            "sasl.password".into(),
            OptionValue::Text("swordfish".into()),
        );
        c.kafka
            .options
            .insert("linger.ms".into(), OptionValue::Int(5));
        learn(&c);
        assert_eq!(
            scrub("connect to postgres://app:hunter2-db@db failed; sasl swordfish; kp-secret; linger 5"),
            "connect to postgres://app:<redacted>@db failed; sasl <redacted>; <redacted>; linger 5"
        );
        assert!(matches!(scrub("nothing secret"), Cow::Borrowed(_)));
    }
}
