//! The small rules the configuration checks share: how a problem is reported, a duration
//! that must be positive, a plain SQL identifier, the prefix of the environment variables
//! that override the file.

use std::fmt;
use std::time::Duration;

/// One problem of a configuration: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, as a path (`relay.tables[0].topic`).
    pub key: String,
    /// What is wrong, and what to do about it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The problems found so far; every check adds to them, so that all are reported at once.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records that `key` has the problem `message`.
    pub fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Every problem, in the order found.
    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }
}

/// Environment variables with this prefix override file keys; `__` separates sections,
/// e.g. `OUTBOXD_DATABASE__URL`.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// Records a problem when `d` is zero.
pub fn positive(p: &mut Problems, key: &str, d: Duration) {
    if d.is_zero() {
        p.add(key, "must be greater than zero");
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
