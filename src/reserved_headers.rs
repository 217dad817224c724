//! Header names outboxd reserves: the dead-letter context of every dialect and the replay
//! counter. Only outboxd writes them; a message or outbox row that brings its own would
//! otherwise steer `dlq replay`.

/// Header counting how often a message was replayed.
pub const REPLAY_COUNT: &str = "outboxd-replay-count";

/// Prefixes of dead-letter context headers, in every dialect.
pub const CONTEXT_PREFIXES: &[&str] = &["outboxd-dlt-", "kafka_dlt-", "__connect.errors."];

/// Whether `name` is a reserved header (compared without regard to ASCII case, as tools
/// reading the headers may).
pub fn is_reserved(name: &str) -> bool {
    let starts_with = |prefix: &str| {
        name.len() >= prefix.len()
            && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    name.eq_ignore_ascii_case(REPLAY_COUNT) || CONTEXT_PREFIXES.iter().any(|p| starts_with(p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_dialect_and_the_counter_are_reserved() {
        for name in [
            "outboxd-dlt-original-topic",
            "kafka_dlt-original-topic",
            "KAFKA_DLT-original-topic",
            "__connect.errors.topic",
            "outboxd-replay-count",
        ] {
            assert!(super::is_reserved(name), "{name}");
        }
        for name in ["event-id", "traceparent", "outboxd-other", "kafka_dl"] {
            assert!(!super::is_reserved(name), "{name}");
        }
    }
}
