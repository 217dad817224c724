//! Concluding a batch sent: alone on a lane's only session, or overlapping on a pair.
//!
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

use super::cycle::{conclude, timed_out, AckWait, Acked, Cycle};
use super::decide::{after_conclusion, keys_in_flight, worse, Beside, Overlap};
use super::publish::Publication;
use super::runtime::{BatchEnd, Phase, TableRuntime};
use super::settle::{failed_batch, record_published};
use super::store::{ClaimedRow, LaneSession, PairedSession, StoreError};

/// A batch sent and waiting for Kafka, its claim open on the lane's current session.
pub(super) struct Flight<'p> {
    /// Its rows, in publication order.
    pub(super) rows: Vec<ClaimedRow>,
    /// Every one of them sent.
    pub(super) publication: Publication<'p>,
    /// When the last of them was sent.
    pub(super) sent: Instant,
}

impl<'p> Flight<'p> {
    /// A claimed batch taking off: counts it, sends its rows from `sent` on (those before
    /// were sent while it was claimed), and starts its wait for Kafka.
    pub(super) async fn launch(
        rt: &TableRuntime,
        rows: Vec<ClaimedRow>,
        mut publication: Publication<'p>,
        sent: usize,
    ) -> Flight<'p> {
        rt.metrics.relay_batch_rows.observe(rows.len() as f64);
        publication.send(&rows[sent..]).await;
        Flight {
            rows,
            publication,
            sent: Instant::now(),
        }
    }
}

/// Concludes `flight` on a lane's only `session`: a failure if it failed, else `done`.
pub(super) async fn conclude_alone(
    cycle: &mut Cycle<'_>,
    session: &mut dyn LaneSession,
    producer: &Arc<FutureProducer>,
    flight: Flight<'_>,
    done: BatchEnd,
) -> Result<BatchEnd, StoreError> {
    let (rt, stop, grace) = (cycle.rt, cycle.stop, cycle.grace);
    let acked = conclude(rt, session, flight.publication, (stop, grace), None).await;
    let landed = land(
        rt,
        session,
        producer,
        &flight.rows,
        acked,
        cycle.acks,
        flight.sent,
    );
    Ok(match landed.await? {
        Landed::TimedOut => BatchEnd::Empty,
        Landed::Published => done,
        Landed::Settled(settled) => worse(done, settled),
    })
}

/// Concludes `flight` on `current`. While it waits, when rows were committed and the
/// flight is slow (see [`AckWait`]), claims up to the rest of the batch size around the
/// flight's keys on `other` and sends them; once `flight` concluded, that batch is the
/// next flight, and the sessions swap. Returns once no batch is in flight: a failure if a
/// batch failed, else `More` when rows were committed meanwhile (some may have been left
/// out for their key, or an early claim filled its limit and more are waiting: the next
/// cycle claims a whole batch at once), else `done`.
pub(super) async fn run(
    cycle: &mut Cycle<'_>,
    current: &mut Box<dyn PairedSession>,
    other: &mut Box<dyn PairedSession>,
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
    let mut overlap = Overlap::new();
    loop {
        let concluded = Notify::new();
        let finish = async {
            let acked = conclude(rt, current.as_mut(), publication, (stop, grace), None).await;
            concluded.notify_one();
            acked
        };
        let limit = overlap.limit(rt.batch_size(), rows.len());
        let rows_ref = &rows;
        let wake = &mut **wake;
        let slow = sent + acks.slow_after();
        let next = async {
            let Some(limit) = limit else {
                return Early::Idle;
            };
            let session = other.as_mut();
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
        let landed = land(rt, current.as_mut(), producer, &rows, acked, acks, sent);
        match landed.await? {
            Landed::TimedOut => {
                if let Early::Claimed(Ok(Some(next))) = next {
                    other.rollback().await?;
                    timed_out(next.rows.len());
                }
                return Ok(BatchEnd::Empty);
            }
            Landed::Published => {}
            Landed::Settled(settled) => {
                overlap.failed();
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
        std::mem::swap(current, other);
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

/// How a batch in flight ended, once handled on its session.
enum Landed {
    /// Shutting down, and Kafka did not answer within the grace: rolled back.
    TimedOut,
    /// Acknowledged and committed.
    Published,
    /// Partly failed, rolled back and settled; the lane goes on as this says.
    Settled(BatchEnd),
}

/// Handles how the wait for the batch of `rows` on `session` ended (`acked`): a timed-out
/// batch is rolled back and logged, a published one counted (and its wait, since `sent`,
/// recorded in `acks`), a failed one settled. A failed commit ends the lane.
async fn land(
    rt: &TableRuntime,
    session: &mut dyn LaneSession,
    producer: &Arc<FutureProducer>,
    rows: &[ClaimedRow],
    acked: Acked,
    acks: &mut AckWait,
    sent: Instant,
) -> Result<Landed, StoreError> {
    match acked {
        Acked::TimedOut => {
            session.rollback().await?;
            timed_out(rows.len());
            Ok(Landed::TimedOut)
        }
        // The lane ends; a claim on the other session dies with its connection.
        Acked::Committed(Err(e)) => Err(e),
        Acked::Committed(Ok(outcomes)) => {
            acks.record(sent.elapsed());
            record_published(rt, rows.iter().zip(&outcomes));
            Ok(Landed::Published)
        }
        Acked::Failed(outcomes) => {
            let settled = failed_batch(rt, session, producer, rows, &outcomes, BatchEnd::Partial);
            Ok(Landed::Settled(settled.await?))
        }
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
    session: &mut dyn PairedSession,
    limit: u32,
    keys: &[&str],
    producer: &'p Arc<FutureProducer>,
    rt: &'p TableRuntime,
    stop: &'p tokio_util::sync::CancellationToken,
) -> Result<Option<Flight<'p>>, StoreError> {
    let claiming = Instant::now();
    let rows = session.claim_around(limit, keys).await?;
    if rows.is_empty() {
        rt.empty_claim();
        session.rollback().await?;
        return Ok(None);
    }
    rt.phase(Phase::Claim, claiming);
    let mut publication = Publication::new(producer, &rt.messages, stop, rows.len());
    publication.send(&rows).await;
    Ok(Some(Flight {
        rows,
        publication,
        sent: Instant::now(),
    }))
}
