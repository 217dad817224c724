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
