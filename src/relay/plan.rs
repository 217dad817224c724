//! How a partly failed batch is settled: which of its rows leave the outbox, which were
//! refused or failed and stay, and which can never become a message.

use std::collections::HashSet;

use super::publish::RowOutcome;
use super::store::{ClaimedRow, DeadRow};

/// How a partly failed batch is settled.
pub(super) struct Plan<'a> {
    /// Acknowledged rows that may leave the outbox.
    pub(super) finished: Vec<&'a str>,
    /// Rows Kafka refused, with the error.
    pub(super) refused: Vec<(&'a str, String)>,
    /// Errors of rows that failed for reasons unrelated to the row.
    pub(super) failed: Vec<String>,
    /// Rows that cannot become a message.
    pub(super) bad: Vec<DeadRow>,
}

impl<'a> Plan<'a> {
    /// Once a row of a key failed or was refused, later rows of that key stay in the outbox
    /// even if Kafka took them: they are published again after the earlier row, so the
    /// last copy a consumer sees keeps per-key order.
    pub(super) fn new(rows: &'a [ClaimedRow], outcomes: &[RowOutcome]) -> Self {
        let mut plan = Plan {
            finished: Vec::new(),
            refused: Vec::new(),
            failed: Vec::new(),
            bad: Vec::new(),
        };
        let mut blocked: HashSet<&str> = HashSet::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            let key = row.key().unwrap_or_default();
            match outcome {
                RowOutcome::Delivered { .. } if !blocked.contains(key) => {
                    plan.finished.push(row.id())
                }
                RowOutcome::Delivered { .. } => {}
                RowOutcome::Refused(e) => {
                    blocked.insert(key);
                    plan.refused.push((row.id(), e.clone()));
                }
                RowOutcome::Failed(e) => {
                    blocked.insert(key);
                    plan.failed.push(e.clone());
                }
                RowOutcome::Bad(reason) => plan.bad.push(DeadRow::new(row.id(), reason, 0)),
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::relay::store::Columns;

    fn row(id: &str, key: Option<&str>) -> ClaimedRow {
        ClaimedRow::new(&Columns {
            id,
            key,
            payload: Some(b"{}"),
            ..Columns::default()
        })
    }

    fn delivered() -> RowOutcome {
        RowOutcome::Delivered {
            at: SystemTime::now(),
            topic: Arc::from("t"),
        }
    }

    #[test]
    fn a_batch_delivered_in_full_leaves_the_outbox_in_order() {
        let rows = [
            row("1", Some("a")),
            row("2", Some("b")),
            row("3", Some("a")),
        ];
        let plan = Plan::new(&rows, &[delivered(), delivered(), delivered()]);
        assert_eq!(plan.finished, ["1", "2", "3"]);
        assert!(plan.refused.is_empty() && plan.failed.is_empty() && plan.bad.is_empty());
    }

    #[test]
    fn later_rows_of_a_failed_key_stay_even_when_kafka_took_them() {
        let rows = [
            row("1", Some("a")),
            row("2", Some("a")),
            row("3", Some("b")),
            row("4", Some("a")),
        ];
        let outcomes = [
            RowOutcome::Failed("broker down".into()),
            delivered(),
            delivered(),
            delivered(),
        ];
        let plan = Plan::new(&rows, &outcomes);
        assert_eq!(plan.finished, ["3"], "only the other key's row leaves");
        assert_eq!(plan.failed, ["broker down"]);
        assert!(plan.refused.is_empty());
    }

    #[test]
    fn a_refused_row_holds_its_key_from_there_on_but_not_before() {
        let rows = [
            row("1", Some("a")),
            row("2", Some("a")),
            row("3", Some("a")),
        ];
        let outcomes = [
            delivered(),
            RowOutcome::Refused("message too large".into()),
            delivered(),
        ];
        let plan = Plan::new(&rows, &outcomes);
        assert_eq!(plan.finished, ["1"], "the row before the refusal is done");
        assert_eq!(plan.refused, [("2", "message too large".to_owned())]);
    }

    #[test]
    fn rows_without_a_key_share_the_empty_key() {
        let rows = [row("1", None), row("2", Some("")), row("3", Some("x"))];
        let outcomes = [
            RowOutcome::Failed("timeout".into()),
            delivered(),
            delivered(),
        ];
        let plan = Plan::new(&rows, &outcomes);
        assert_eq!(plan.finished, ["3"]);
    }

    #[test]
    fn a_row_that_cannot_become_a_message_is_dead_and_does_not_hold_its_key() {
        let rows = [row("1", Some("a")), row("2", Some("a"))];
        let outcomes = [RowOutcome::Bad("payload is NULL".into()), delivered()];
        let plan = Plan::new(&rows, &outcomes);
        assert_eq!(plan.finished, ["2"]);
        assert_eq!(plan.bad.len(), 1);
        assert_eq!(plan.bad[0].id, "1");
        assert_eq!(plan.bad[0].reason, "payload is NULL");
        assert_eq!(plan.bad[0].attempts, 0);
    }
}
