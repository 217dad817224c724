//! Batches that overlap: while a batch that did not fill waits for Kafka, the rows
//! committed meanwhile are claimed on the lane's second session, around the keys that
//! batch holds, and sent at once. Each batch then commits, or settles, on its own.
//!
//! A row therefore waits for its own acknowledgement, not also for the batch before it.
//! What holds as with one batch at a time:
//! - per-key order: a batch never holds a key that the batch in flight holds, so a row
//!   that fails is never overtaken by a later row of its key;
//! - at most `batch_size` rows are sent and not yet committed, which bounds the
//!   duplicates a crash can cause as before;
//! - after a failure, nothing more is claimed early: the lane backs off as usual.

use rdkafka::producer::FutureProducer;
use std::sync::Arc;
use tokio::sync::Notify;

use super::lane::{conclude, timed_out, Acked, BatchEnd, Cycle};
use super::publish::Publication;
use super::settle::{failed_batch, record_published};
use super::store::{ClaimedRow, LaneSession, StoreError};

/// A batch sent and waiting for Kafka, its claim open on the lane's current session.
pub(super) struct Flight<'p> {
    /// Its rows, in publication order.
    pub(super) rows: Vec<ClaimedRow>,
    /// Every one of them sent.
    pub(super) publication: Publication<'p>,
}

/// Concludes `flight` on `current`. While it waits, when rows were committed and `other`
/// is there, claims up to the rest of the batch size around the flight's keys on `other`
/// and sends them; once `flight` concluded, that batch is the next flight, and the
/// sessions swap. Returns once no batch is in flight: a failure if a batch failed, else
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
    } = cycle;
    let (rt, stop, grace) = (*rt, *stop, *grace);
    let Flight {
        mut rows,
        mut publication,
    } = flight;
    let mut end = done;
    let mut early = other.is_some();
    loop {
        let concluded = Notify::new();
        let finish = async {
            let acked = conclude(current.as_mut(), publication, (stop, grace), None, None).await;
            concluded.notify_one();
            acked
        };
        let limit = rt.tunables.batch_size().saturating_sub(rows.len() as u32);
        let rows_ref = &rows;
        let wake = &mut **wake;
        let next = async {
            let session = other.as_deref_mut().filter(|_| early && limit > 0)?;
            tokio::select! {
                biased;
                () = concluded.notified() => return None,
                changed = wake.changed() => changed.ok()?,
            }
            if stop.is_cancelled() {
                return None;
            }
            let keys: Vec<&str> = rows_ref.iter().map(|r| r.key().unwrap_or("")).collect();
            Some(claim_around(session, limit, &keys, producer, rt, stop).await)
        };
        let (acked, next) = tokio::join!(finish, next);
        match acked {
            Acked::TimedOut => {
                current.rollback().await?;
                timed_out(rt, rows.len());
                if let (Some(Ok(Some(next))), Some(other)) = (next, other.as_mut()) {
                    other.rollback().await?;
                    timed_out(rt, next.rows.len());
                }
                return Ok(BatchEnd::Empty);
            }
            // The lane ends; a claim on the other session dies with its connection.
            Acked::Committed(Err(e)) => return Err(e),
            Acked::Committed(Ok(outcomes)) => record_published(rt, rows.iter().zip(&outcomes)),
            Acked::Failed(outcomes) => {
                early = false;
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
        let Some(next) = next.transpose()? else {
            return Ok(end);
        };
        // The claim left out the rows of the keys in flight that were committed: the lane
        // claims again once the batches in flight are done, rather than at the next poll.
        end = worse(end, BatchEnd::More);
        let Some(next) = next else {
            return Ok(end);
        };
        if next.rows.len() as u32 >= limit {
            // The rows came in faster than the batches went out: back to whole batches.
            early = false;
        }
        if let Some(other) = other.as_mut() {
            std::mem::swap(current, other);
        }
        rt.metrics.relay_batch_rows.observe(next.rows.len() as f64);
        heartbeat.beat();
        Flight { rows, publication } = next;
    }
}

/// Claims up to `limit` rows of keys other than `keys` on `session` and sends them; `None`
/// (the claim rolled back) when there were none.
async fn claim_around<'p>(
    session: &mut dyn LaneSession,
    limit: u32,
    keys: &[&str],
    producer: &'p Arc<FutureProducer>,
    rt: &'p super::lane::TableRuntime,
    stop: &'p tokio_util::sync::CancellationToken,
) -> Result<Option<Flight<'p>>, StoreError> {
    let rows = session.claim_around(limit, keys).await?;
    if rows.is_empty() {
        session.rollback().await?;
        return Ok(None);
    }
    let mut publication = Publication::new(producer, &rt.topics, stop, rows.len());
    publication.send(&rows).await;
    Ok(Some(Flight { rows, publication }))
}

/// The end of a cycle of several batches: a Kafka failure over a refusal over the rest,
/// and `More` over `Partial`.
fn worse(a: BatchEnd, b: BatchEnd) -> BatchEnd {
    let rank = |e: &BatchEnd| match e {
        BatchEnd::KafkaFailed => 4,
        BatchEnd::Refused => 3,
        BatchEnd::More => 2,
        BatchEnd::Partial => 1,
        BatchEnd::Empty => 0,
    };
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}
