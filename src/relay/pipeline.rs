//! Batches that overlap: while a batch that did not fill waits for Kafka longer than
//! usual, the rows committed meanwhile are claimed on the lane's second session, around
//! the keys that batch holds, and sent at once. Each batch then commits, or settles, on
//! its own.
//!
//! A row committed while a batch is slow is claimed once the batch has waited twice as
//! long as usual, rather than after the slow batch's end, its commit and a claim of its
//! own. What holds as with one batch at a time:
//! - per-key order: a batch never holds a key that the batch in flight holds, so a row
//!   that fails is never overtaken by a later row of its key;
//! - at most `batch_size` rows are sent and not yet committed, which bounds the
//!   duplicates a crash can cause as before;
//! - after a failure, nothing more is claimed early: the lane backs off as usual.

use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::cycle::{conclude, timed_out, Acked, Cycle};
use super::decide::{after_conclusion, keys_in_flight, worse, Beside, Overlap};
use super::publish::Publication;
use super::runtime::{BatchEnd, Phase};
use super::settle::{failed_batch, record_published};
use super::store::{ClaimedRow, LaneSession, StoreError};

/// A batch sent and waiting for Kafka, its claim open on the lane's current session.
pub(super) struct Flight<'p> {
    /// Its rows, in publication order.
    pub(super) rows: Vec<ClaimedRow>,
    /// Every one of them sent.
    pub(super) publication: Publication<'p>,
    /// When the last of them was sent.
    pub(super) sent: Instant,
}

/// Concludes `flight` on `current`. While it waits, when rows were committed, the flight
/// is slow (see [`AckWait`]) and `other` is there, claims up to the rest of the batch
/// size around the flight's keys on `other` and sends them; once `flight` concluded, that
/// batch is the next flight, and the sessions swap. Returns once no batch is in flight: a failure if a batch failed, else
/// `More` when rows were committed meanwhile (some may have been left out for their key,
/// or an early claim filled its limit and more are waiting: the next cycle claims a whole
/// batch at once), else `done`.
pub(super) async fn run(
    cycle: &mut Cycle<'_>,
    current: &mut Box<dyn LaneSession>,
    other: &mut Option<Box<dyn LaneSession>>,
    producer: &Arc<FutureProducer>,
    flight: Flight<'_>,
    done: BatchEnd,
) -> Result<BatchEnd, StoreError> {
    let Cycle {
        rt,
        stop,
        wake,
        heartbeat,
        grace,
        acks,
    } = cycle;
    let (rt, stop, grace) = (*rt, *stop, *grace);
    let Flight {
        mut rows,
        mut publication,
        mut sent,
    } = flight;
    let mut end = done;
    let mut overlap = Overlap::new(other.is_some());
    loop {
        let concluded = Notify::new();
        let finish = async {
            let acked =
                conclude(rt, current.as_mut(), publication, (stop, grace), None, None).await;
            concluded.notify_one();
            acked
        };
        let limit = overlap.limit(rt.batch_size(), rows.len());
        let rows_ref = &rows;
        let wake = &mut **wake;
        let slow = sent + acks.slow_after();
        let next = async {
            let (Some(session), Some(limit)) = (other.as_deref_mut(), limit) else {
                return Early::Idle;
            };
            let mut woken = false;
            let slow_with_rows = async {
                if wake.changed().await.is_err() {
                    return false;
                }
                woken = true;
                tokio::time::sleep_until(slow).await;
                true
            };
            let claim = tokio::select! {
                biased;
                () = concluded.notified() => false,
                slow = slow_with_rows => slow,
            };
            match (claim && !stop.is_cancelled(), woken) {
                (true, _) => {}
                (false, true) => return Early::Woken,
                (false, false) => return Early::Idle,
            }
            let keys = keys_in_flight(rows_ref);
            Early::Claimed(claim_around(session, limit, &keys, producer, rt, stop).await)
        };
        let (acked, next) = tokio::join!(finish, next);
        match acked {
            Acked::TimedOut => {
                current.rollback().await?;
                timed_out(rows.len());
                if let (Early::Claimed(Ok(Some(next))), Some(other)) = (next, other.as_mut()) {
                    other.rollback().await?;
                    timed_out(next.rows.len());
                }
                return Ok(BatchEnd::Empty);
            }
            // The lane ends; a claim on the other session dies with its connection.
            Acked::Committed(Err(e)) => return Err(e),
            Acked::Committed(Ok(outcomes)) => {
                acks.record(sent.elapsed());
                record_published(rt, rows.iter().zip(&outcomes));
            }
            Acked::Failed(outcomes) => {
                overlap.failed();
                let settled = failed_batch(
                    rt,
                    current.as_mut(),
                    producer,
                    &rows,
                    &outcomes,
                    BatchEnd::Partial,
                )
                .await?;
                end = worse(end, settled);
            }
        }
        let next = match next {
            Early::Idle => return Ok(after_conclusion(end, Beside::Idle)),
            Early::Woken => return Ok(after_conclusion(end, Beside::Woken)),
            Early::Claimed(claimed) => {
                end = after_conclusion(end, Beside::Claimed);
                match claimed? {
                    Some(next) => next,
                    None => return Ok(end),
                }
            }
        };
        if let Some(limit) = limit {
            overlap.claimed(next.rows.len(), limit);
        }
        if let Some(other) = other.as_mut() {
            std::mem::swap(current, other);
        }
        rt.metrics.relay_batch_rows.observe(next.rows.len() as f64);
        rt.metrics
            .relay_early_batches_total
            .with_label_values(&[rt.config.table.as_str()])
            .inc();
        heartbeat.beat();
        Flight {
            rows,
            publication,
            sent,
        } = next;
    }
}

/// What happened on the other session while a batch was in flight.
enum Early<'p> {
    /// Nothing: no rows were committed meanwhile, or no early claim is allowed.
    Idle,
    /// Rows were committed, but the batch concluded before it was slow.
    Woken,
    /// The batch was slow: the rows committed meanwhile were claimed around its keys
    /// (`None`: there were none) and sent.
    Claimed(Result<Option<Flight<'p>>, StoreError>),
}

/// Claims up to `limit` rows of keys other than `keys` on `session` and sends them; `None`
/// (the claim rolled back) when there were none.
async fn claim_around<'p>(
    session: &mut dyn LaneSession,
    limit: u32,
    keys: &[&str],
    producer: &'p Arc<FutureProducer>,
    rt: &'p super::runtime::TableRuntime,
    stop: &'p tokio_util::sync::CancellationToken,
) -> Result<Option<Flight<'p>>, StoreError> {
    let claiming = Instant::now();
    let rows = session.claim_around(limit, keys).await?;
    if rows.is_empty() {
        session.rollback().await?;
        return Ok(None);
    }
    rt.phase(Phase::Claim, claiming);
    let mut publication = Publication::new(producer, &rt.topics, stop, rows.len());
    publication.send(&rows).await;
    Ok(Some(Flight {
        rows,
        publication,
        sent: Instant::now(),
    }))
}
