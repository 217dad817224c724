//! The small rules the configuration checks share: a duration that must be positive, a
//! plain SQL identifier, the prefix of the environment variables that override the file.

use std::time::Duration;

/// Environment variables with this prefix override file keys; `__` separates sections,
/// e.g. `OUTBOXD_DATABASE__URL`.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// Records a problem when `d` is zero.
pub fn positive(p: &mut Vec<String>, key: &str, d: Duration) {
    if d.is_zero() {
        p.push(format!("{key}: must be greater than zero"));
    }
}

/// A plain SQL identifier: what outboxd accepts for table, column and channel names, so
/// that quoting them is always exact.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && s.len() <= 63
}
