//! What a batch leaves behind once Kafka answered: its published rows counted, and a partly
//! failed batch settled row by row after its claim was rolled back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::producer::FutureProducer;

use super::plan::Plan;
use super::publish::{delay_seconds, RowOutcome};
use super::runtime::{BatchEnd, TableRuntime};
use super::store::{ClaimedRow, LaneSession, Settlement, StoreError};
use crate::metrics::Metrics;

/// Settles a batch that Kafka did not wholly acknowledge, on `session`, whose claim of
/// `rows` is still open: undoes the claim, then, in a second transaction, deletes what Kafka
/// acknowledged (unless an earlier row of its key failed), counts refusals and moves dead
/// rows. The lane lock keeps every other relay away from these rows meanwhile. Returns
/// what the lane does next: back off after a Kafka failure or a refusal, claim again at
/// once when rows were held back behind a row that is dead now, else `done`.
pub(super) async fn failed_batch(
    rt: &TableRuntime,
    session: &mut dyn LaneSession,
    producer: &Arc<FutureProducer>,
    rows: &[ClaimedRow],
    outcomes: &[RowOutcome],
    done: BatchEnd,
) -> Result<BatchEnd, StoreError> {
    session.rollback().await?;
    rt.producer.renew_if_fatal(producer);
    let plan = Plan::new(rows, outcomes);
    let settled = session
        .settle(&Settlement {
            finished: &plan.finished,
            refused: &plan.refused,
            bad: &plan.bad,
            max_attempts: rt.config.max_attempts,
        })
        .await?;
    let (dead, moved, still_refused) = (settled.dead, settled.moved, settled.still_refused);

    let table = rt.config.table.as_str();
    let finished: HashSet<&str> = plan.finished.iter().copied().collect();
    record_published(
        rt,
        rows.iter()
            .zip(outcomes)
            .filter(|(r, _)| finished.contains(r.id())),
    );
    let errors = &rt.metrics.relay_publish_errors_total;
    errors
        .with_label_values(&[table, "kafka"])
        .inc_by(plan.failed.len() as u64);
    errors
        .with_label_values(&[table, "refused"])
        .inc_by(plan.refused.len() as u64);
    errors
        .with_label_values(&[table, "bad_row"])
        .inc_by(dead.iter().filter(|d| d.attempts == 0).count() as u64);
    rt.metrics
        .relay_dead_rows_total
        .with_label_values(&[table])
        .inc_by(moved);
    if let Some(first) = plan.failed.first() {
        tracing::warn!(
            failed = plan.failed.len(),
            published = plan.finished.len(),
            error = %first,
            "kafka did not acknowledge part of a batch; those rows stay in the outbox and are retried"
        );
    }
    for (id, error) in &plan.refused {
        tracing::warn!(row_id = id, %error, "kafka refused a row");
    }
    for d in &dead {
        tracing::error!(row_id = %d.id, reason = %d.reason, "row moved to outboxd_dead_rows");
    }
    // Rows of the batch neither published, refused nor dead: later rows of a key whose
    // earlier row was refused or bad, kept to go out after it.
    let held_back = rows
        .len()
        .saturating_sub(plan.finished.len() + plan.refused.len() + plan.bad.len());
    Ok(if !plan.failed.is_empty() {
        BatchEnd::KafkaFailed
    } else if still_refused > 0 {
        BatchEnd::Refused
    } else if held_back > 0 {
        // What held them back is dead now: they go at once, not at the next notification
        // or poll.
        BatchEnd::More
    } else {
        done
    })
}

/// Counts the delivered rows among `rows` (published total, publish delay).
pub(super) fn record_published<'r>(
    rt: &TableRuntime,
    rows: impl Iterator<Item = (&'r ClaimedRow, &'r RowOutcome)>,
) {
    count_published(&rt.metrics, &rt.config.table, &rt.published, rows);
}

/// Counts the delivered rows among `rows` of `table` in `metrics` and `published`.
pub(super) fn count_published<'r>(
    metrics: &Metrics,
    table: &str,
    published: &AtomicU64,
    rows: impl Iterator<Item = (&'r ClaimedRow, &'r RowOutcome)>,
) {
    let delay = metrics
        .relay_publish_delay_seconds
        .with_label_values(&[table]);
    let mut per_topic: Vec<(&str, u64)> = Vec::new();
    for (row, outcome) in rows {
        let RowOutcome::Delivered { at, topic } = outcome else {
            continue;
        };
        if let Some(created) = row.created_at {
            delay.observe(delay_seconds(created, *at));
        }
        match per_topic.iter_mut().find(|(t, _)| *t == &**topic) {
            Some((_, n)) => *n += 1,
            None => per_topic.push((topic, 1)),
        }
    }
    published.fetch_add(
        per_topic.iter().map(|(_, n)| n).sum::<u64>(),
        Ordering::Relaxed,
    );
    for (topic, n) in per_topic {
        metrics
            .relay_published_total
            .with_label_values(&[table, topic])
            .inc_by(n);
    }
}
