//! Publishing what the stream (or the initial snapshot) read: every row of a batch goes to
//! Kafka and is acknowledged, or is recorded in `outboxd_dead_rows`, before the slot may
//! confirm the batch's last transaction. Rows that failed are sent again, in order, after a
//! backoff; the stream waits meanwhile (nothing more is read, so nothing is confirmed past
//! them).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::WalError;
use crate::config::TableConfig;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;
use crate::relay::lanes::TableContext;
use crate::relay::publish::{MessageShape, Publication, RowOutcome};
use crate::relay::runtime::TableSettings;
use crate::relay::settle::count_published;
use crate::relay::store::{ClaimedRow, DeadRow};
use crate::systemd::Heartbeat;

/// Where a row came from, to keep the whole of it with a dead row.
pub(super) enum Origin {
    /// A row as JSON (column name to value).
    Row(serde_json::Value),
    /// A row of the stream, whose JSON is made only if it dies.
    Tuple(Box<dyn Fn() -> serde_json::Value + Send + Sync>),
}

impl Origin {
    fn json(&self) -> serde_json::Value {
        match self {
            Origin::Row(v) => v.clone(),
            Origin::Tuple(f) => f(),
        }
    }
}

/// Rows read and not yet published, in commit order.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) rows: Vec<ClaimedRow>,
    pub(super) origins: Vec<Origin>,
}

impl Batch {
    pub(super) fn push(&mut self, row: ClaimedRow, origin: Origin) {
        self.rows.push(row);
        self.origins.push(origin);
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Keeps the first `len` rows.
    pub(super) fn truncate(&mut self, len: usize) {
        self.rows.truncate(len);
        self.origins.truncate(len);
    }
}

/// What publishing needs, shared by the snapshot and the stream.
pub(super) struct Deliverer {
    pub(super) config: TableConfig,
    pub(super) shape: MessageShape,
    pub(super) producer: Arc<ProducerSlot>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) pool: sqlx::PgPool,
    pub(super) published: AtomicU64,
    /// How long a batch in flight may still wait for Kafka once stopped.
    pub(super) grace: Duration,
    /// Batch size (and poll interval, unused here), changed by reloads.
    settings: watch::Receiver<TableSettings>,
    /// The table's liveness: beaten at each attempt, so a long snapshot or a Kafka outage
    /// does not read as a stalled loop.
    heartbeat: Heartbeat,
    /// Refusals per row id, until the row is published or dead.
    refusals: HashMap<String, u32>,
}

/// What becomes of one row after an attempt.
#[derive(Debug)]
enum Next {
    Done,
    Retry,
    Dead(DeadRow),
}

impl Deliverer {
    /// The publisher of table `ctx`, recording dead rows through `pool` and beating
    /// `heartbeat` at each attempt.
    pub(super) fn new(ctx: &TableContext, pool: sqlx::PgPool, heartbeat: Heartbeat) -> Self {
        Deliverer {
            config: ctx.config.clone(),
            shape: ctx.messages.clone(),
            producer: ctx.producer.clone(),
            metrics: ctx.metrics.clone(),
            pool,
            published: AtomicU64::new(0),
            grace: ctx.drain_grace,
            settings: ctx.settings.clone(),
            heartbeat,
            refusals: HashMap::new(),
        }
    }

    /// The batch size now in effect (`batch_size`, which a reload may change).
    pub(super) fn batch_size(&self) -> usize {
        self.settings.borrow().batch_size as usize
    }

    /// Publishes every row of `batch` (emptying it): returns once each was acknowledged
    /// or recorded as dead. `Err(Stopped)` when `stop` came first (nothing was confirmed
    /// for the rows not yet acknowledged).
    pub(super) async fn deliver(
        &mut self,
        batch: &mut Batch,
        stop: &CancellationToken,
    ) -> Result<(), WalError> {
        let mut backoff = crate::backoff::exponential();
        let table = self.config.table.clone();
        while !batch.is_empty() {
            self.heartbeat.beat();
            let producer = self.producer.get();
            let mut publication = Publication::new(&producer, &self.shape, stop, batch.len());
            publication.send(&batch.rows).await;
            let grace_over = async {
                stop.cancelled().await;
                tokio::time::sleep(self.grace).await;
            };
            let outcomes = tokio::select! {
                outcomes = publication.finish() => outcomes,
                () = grace_over => return Err(WalError::Stopped),
            };
            let max = self.config.max_attempts;
            let nexts = plan(&batch.rows, &outcomes, &mut self.refusals, max);
            let errors = &self.metrics.relay_publish_errors_total;
            let dead: Vec<(DeadRow, serde_json::Value)> = nexts
                .iter()
                .zip(&batch.origins)
                .filter_map(|(n, o)| match n {
                    Next::Dead(d) => Some((d.clone(), o.json())),
                    _ => None,
                })
                .collect();
            if !dead.is_empty() {
                self.bury(&dead).await?;
                errors
                    .with_label_values(&[&table, "bad_row"])
                    .inc_by(dead.iter().filter(|(d, _)| d.attempts == 0).count() as u64);
                self.metrics
                    .relay_dead_rows_total
                    .with_label_values(&[&table])
                    .inc_by(dead.len() as u64);
                for (d, _) in &dead {
                    tracing::error!(row_id = %d.id, reason = %d.reason, "row recorded in outboxd_dead_rows");
                }
            }
            count_published(
                &self.metrics,
                &table,
                &self.published,
                batch
                    .rows
                    .iter()
                    .zip(&outcomes)
                    .zip(&nexts)
                    .filter(|(_, n)| matches!(n, Next::Done))
                    .map(|(pair, _)| pair),
            );
            let failed = outcomes
                .iter()
                .filter(|o| matches!(o, RowOutcome::Failed(_)))
                .count();
            let refused = outcomes
                .iter()
                .filter(|o| matches!(o, RowOutcome::Refused(_)))
                .count();
            errors
                .with_label_values(&[&table, "kafka"])
                .inc_by(failed as u64);
            errors
                .with_label_values(&[&table, "refused"])
                .inc_by(refused as u64);
            for (row, next) in batch.rows.iter().zip(&nexts) {
                if !matches!(next, Next::Retry) {
                    self.refusals.remove(row.id());
                }
            }
            let mut keep = nexts.iter().map(|n| matches!(n, Next::Retry));
            let mut keep_origin = nexts.iter().map(|n| matches!(n, Next::Retry));
            batch.rows.retain(|_| keep.next().unwrap_or(false));
            batch
                .origins
                .retain(|_| keep_origin.next().unwrap_or(false));
            if batch.is_empty() {
                break;
            }
            self.producer.renew_if_fatal(&producer);
            let first = outcomes.iter().find_map(|o| match o {
                RowOutcome::Failed(e) | RowOutcome::Refused(e) => Some(e.as_str()),
                _ => None,
            });
            let pause = backoff.next().unwrap_or_default();
            tracing::warn!(
                waiting = batch.len(),
                error = first.unwrap_or_default(),
                ?pause,
                "kafka did not acknowledge part of a batch; the slot waits and they are sent again"
            );
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return Err(WalError::Stopped),
            }
        }
        Ok(())
    }

    /// Records `dead` in `outboxd_dead_rows`; the rows themselves stay where they are.
    async fn bury(&self, dead: &[(DeadRow, serde_json::Value)]) -> Result<(), WalError> {
        let mut tx = self.pool.begin().await?;
        let buried = Self::insert_dead(&mut tx, &self.config.table, dead).await;
        buried.map_err(WalError::from_state)?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_dead(
        tx: &mut sqlx::PgConnection,
        table: &str,
        dead: &[(DeadRow, serde_json::Value)],
    ) -> Result<(), sqlx::Error> {
        for (d, data) in dead {
            sqlx::query(
                "INSERT INTO outboxd_dead_rows (source_table, row_id, reason, attempts, row_data) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(table)
            .bind(&d.id)
            .bind(&d.reason)
            .bind(d.attempts)
            .bind(sqlx::types::Json(data))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// What becomes of each row after an attempt, counting refusals in `refusals` (by row id)
/// up to `max_attempts`: once a row of a key failed or was refused, later rows of that key
/// are sent again after it, even if Kafka took them, so that the last copy a consumer
/// sees keeps per-key order (as in the other modes).
fn plan(
    rows: &[ClaimedRow],
    outcomes: &[RowOutcome],
    refusals: &mut HashMap<String, u32>,
    max_attempts: u32,
) -> Vec<Next> {
    let mut blocked: HashSet<&str> = HashSet::new();
    rows.iter()
        .zip(outcomes)
        .map(|(row, outcome)| {
            let key = row.key().unwrap_or_default();
            match outcome {
                RowOutcome::Delivered { .. } if !blocked.contains(key) => Next::Done,
                RowOutcome::Delivered { .. } => Next::Retry,
                RowOutcome::Failed(_) => {
                    blocked.insert(key);
                    Next::Retry
                }
                RowOutcome::Refused(e) => {
                    blocked.insert(key);
                    let n = refusals.entry(row.id().to_owned()).or_default();
                    *n += 1;
                    if *n >= max_attempts {
                        Next::Dead(DeadRow::new(
                            row.id(),
                            &format!("kafka refused it {n} times; last error: {e}"),
                            *n as i32,
                        ))
                    } else {
                        Next::Retry
                    }
                }
                RowOutcome::Bad(reason) => Next::Dead(DeadRow::new(row.id(), reason, 0)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::relay::store::Columns;

    fn row(id: &str, key: &str) -> ClaimedRow {
        ClaimedRow::new(&Columns {
            id,
            key: Some(key),
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

    fn kinds(nexts: &[Next]) -> Vec<&'static str> {
        nexts
            .iter()
            .map(|n| match n {
                Next::Done => "done",
                Next::Retry => "retry",
                Next::Dead(_) => "dead",
            })
            .collect()
    }

    #[test]
    fn a_failed_row_takes_the_later_rows_of_its_key_along_and_leaves_other_keys_done() {
        let rows = [row("1", "a"), row("2", "b"), row("3", "a"), row("4", "c")];
        let outcomes = [
            RowOutcome::Failed("timed out".into()),
            delivered(),
            delivered(),
            RowOutcome::Bad("NULL payload".into()),
        ];
        let mut refusals = HashMap::new();
        let nexts = plan(&rows, &outcomes, &mut refusals, 3);
        assert_eq!(kinds(&nexts), ["retry", "done", "retry", "dead"]);
        assert!(refusals.is_empty(), "a failure is no refusal");
    }

    #[test]
    fn a_row_refused_max_attempts_times_is_dead_with_its_count() {
        let rows = [row("1", "a")];
        let refused = [RowOutcome::Refused("too large".into())];
        let mut refusals = HashMap::new();
        assert_eq!(kinds(&plan(&rows, &refused, &mut refusals, 2)), ["retry"]);
        let nexts = plan(&rows, &refused, &mut refusals, 2);
        let Next::Dead(dead) = &nexts[0] else {
            panic!("not dead: {nexts:?}")
        };
        assert_eq!(dead.attempts, 2);
        assert!(
            dead.reason.contains("refused it 2 times"),
            "{}",
            dead.reason
        );
    }
}
