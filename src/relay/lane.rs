//! One lane's claim loop, on the sessions that hold the lane: claim a batch, publish it,
//! commit; on any failure roll back and settle the batch row by row. With a pair of
//! sessions, the next batch is claimed while Kafka acknowledges a full one, and rows of
//! other keys are sent while a short one waits (see [`pipeline`]). What the lane does at
//! each step is decided in [`super::decide`]; this module does the I/O.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cycle::{conclude, timed_out, AckWait, Acked, Cycle, Grace};
use super::decide::{after_claim, AfterClaim, Backoffs, Then};
use super::pipeline::{self, Flight};
use super::publish::Publication;
use super::runtime::{settings_changed, BatchEnd, Phase, TableRuntime};
use super::settle::{failed_batch, record_published};
use super::store::{ClaimedRow, Lane, LaneSession, PairedSession, StoreError};
use crate::systemd::Heartbeat;

/// Runs the lane held by `lane` until `stop` is cancelled (after the batch in flight) or
/// a session fails (the lane is then released with it, and the caller re-acquires later).
pub async fn run_lane(
    rt: Arc<TableRuntime>,
    lane: Lane,
    stop: CancellationToken,
    mut wake: watch::Receiver<()>,
    heartbeat: Heartbeat,
) -> Result<(), StoreError> {
    let table = rt.config.table.as_str();
    let mut backoffs = Backoffs::new();
    let mut sessions = match lane {
        Lane::Single(session) => Sessions::Single(session),
        Lane::Paired(current, other) => Sessions::Paired(Pair {
            current,
            other,
            ready: None,
        }),
    };
    tracing::info!(
        prefetch = matches!(sessions, Sessions::Paired(_)),
        "lane acquired"
    );
    let grace = Grace::new(rt.drain_grace);
    let mut settings = rt.settings.clone();
    let mut acks = AckWait::default();
    while !stop.is_cancelled() {
        heartbeat.beat();
        wake.borrow_and_update();
        let mut cycle = Cycle {
            rt: &rt,
            stop: &stop,
            wake: &mut wake,
            heartbeat: &heartbeat,
            grace: &grace,
            acks: &mut acks,
        };
        let end = match &mut sessions {
            Sessions::Single(session) => single_batch(&mut cycle, session.as_mut()).await,
            Sessions::Paired(pair) => paired_batch(&mut cycle, pair).await,
        };
        let end = match end {
            Ok(end) => end,
            Err(e) => {
                rt.metrics
                    .relay_publish_errors_total
                    .with_label_values(&[table, "database"])
                    .inc();
                return Err(e);
            }
        };
        let pause = match backoffs.after(end) {
            Then::Claim => continue,
            Then::Wait => {
                let poll_interval = settings.borrow_and_update().poll_interval;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(poll_interval) => {}
                    () = settings_changed(&mut settings) => {}
                }
                continue;
            }
            Then::BackOff(pause) => pause,
        };
        tracing::debug!(?pause, "backing off");
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if let Sessions::Paired(pair) = &mut sessions {
        if pair.ready.take().is_some() {
            pair.current.rollback().await?;
        }
    }
    tracing::info!("lane released");
    Ok(())
}

/// The sessions of one lane.
enum Sessions {
    /// One, claiming one batch at a time.
    Single(Box<dyn LaneSession>),
    /// Two, taking turns.
    Paired(Pair),
}

/// The two sessions of a lane: the one whose batch comes next, and the other, which
/// claims the batch after it while Kafka acknowledges it (or around its keys while it is
/// slow); they swap roles after each batch claimed so.
struct Pair {
    /// Claims (or has claimed, see `ready`) the next batch.
    current: Box<dyn PairedSession>,
    /// Claims the batch after it while Kafka acknowledges it.
    other: Box<dyn PairedSession>,
    /// Rows `current` claimed in its open transaction and nothing sent yet.
    ready: Option<Claimed>,
}

/// Rows a lane claims at a time when its store extends claims: each chunk is enqueued to
/// the producer while the next one is claimed, so claiming and publishing overlap.
const CLAIM_CHUNK: u32 = 1000;

/// Rows claimed in a session's open transaction.
struct Claimed {
    rows: Vec<ClaimedRow>,
    /// Whether the last claim filled its chunk: the claim may go on.
    more: bool,
}

impl Claimed {
    fn new(rows: Vec<ClaimedRow>, chunk: u32) -> Self {
        Claimed {
            more: rows.len() as u32 == chunk,
            rows,
        }
    }
}

/// Where a claim starts.
enum Start {
    /// A new claim.
    New,
    /// Rows already claimed in the session's open transaction (none yet after
    /// [`PairedSession::follow`]).
    Claimed(Claimed),
}

/// Claims up to `batch_size` rows from `start`, and, when given a `publication`, sends
/// them to it: each chunk is sent while the next one is claimed (the claim is polled
/// first, so its statement is on its way to the database while this task prepares and
/// enqueues the previous chunk). Returns the rows and how many of them were sent: the
/// rows claimed last are left for the caller to send. A prefetch stops claiming further
/// chunks once `until` is set (the batch before it was acknowledged), but not before its
/// first.
async fn claim(
    session: &mut dyn LaneSession,
    batch_size: u32,
    mut publication: Option<&mut Publication<'_>>,
    start: Start,
    until: Option<&AtomicBool>,
) -> Result<(Claimed, usize), StoreError> {
    let chunk = if session.claims_in_chunks() {
        CLAIM_CHUNK.min(batch_size)
    } else {
        batch_size
    };
    let mut claimed = match start {
        Start::Claimed(claimed) => claimed,
        Start::New => Claimed::new(session.claim(chunk).await?, chunk),
    };
    let rows = &mut claimed.rows;
    if claimed.more {
        rows.reserve((batch_size as usize).saturating_sub(rows.len()));
    }
    let mut sent = 0;
    while claimed.more
        && (rows.len() as u32) < batch_size
        && (rows.is_empty() || !until.is_some_and(|u| u.load(Ordering::Acquire)))
    {
        let want = chunk.min(batch_size - rows.len() as u32);
        let send = async {
            if let Some(p) = publication.as_deref_mut() {
                p.send(&rows[sent..]).await;
            }
        };
        let (more, ()) = tokio::join!(session.claim_more(want), send);
        let more = more?;
        sent = rows.len();
        claimed.more = more.len() as u32 == want;
        rows.extend(more);
    }
    Ok((claimed, sent))
}

/// One claim/publish/commit cycle on a lane's only session.
async fn single_batch(
    cycle: &mut Cycle<'_>,
    session: &mut dyn LaneSession,
) -> Result<BatchEnd, StoreError> {
    let (rt, stop) = (cycle.rt, cycle.stop);
    let batch_size = rt.batch_size();
    let producer = rt.producer.get();
    let mut publication = Publication::new(&producer, &rt.messages, stop, batch_size as usize);
    let claiming = Instant::now();
    let (Claimed { rows, .. }, sent) = claim(
        session,
        batch_size,
        Some(&mut publication),
        Start::New,
        None,
    )
    .await?;
    if !rows.is_empty() {
        rt.phase(Phase::Claim, claiming);
    }
    match after_claim(rows.len(), batch_size, false, false, stop.is_cancelled()) {
        AfterClaim::Nothing(end) => {
            rt.empty_claim();
            session.commit().await?;
            Ok(end)
        }
        AfterClaim::Alone(done) | AfterClaim::Prefetch(done) => {
            let flight = Flight::launch(rt, rows, publication, sent).await;
            pipeline::conclude_alone(cycle, session, &producer, flight, done).await
        }
    }
}

/// One claim/publish/commit cycle on a pair of sessions. After a full batch the other
/// session claims the next one, chunk by chunk, until Kafka acknowledged this one; this
/// one commits as soon as it is acknowledged, while the other may still claim. The other's
/// rows are sent only once this batch committed (the next cycle goes on claiming the rest
/// of its batch), and rolled back unsent if this one failed, so they never overtake it. A
/// batch that did not fill goes on in [`pipeline::run`]: the rows committed while it
/// waits are claimed around its keys and sent at once.
async fn paired_batch(cycle: &mut Cycle<'_>, pair: &mut Pair) -> Result<BatchEnd, StoreError> {
    let (rt, stop) = (cycle.rt, cycle.stop);
    let Pair {
        current,
        other,
        ready,
    } = pair;
    let batch_size = rt.batch_size();
    let producer = rt.producer.get();
    let mut publication = Publication::new(&producer, &rt.messages, stop, batch_size as usize);
    // A prefetched batch saw the outbox as an earlier claim did: what was committed since
    // is for a fresh claim, at once, even if this batch comes out short.
    let prefetched = ready.is_some();
    let start = ready.take().map_or(Start::New, Start::Claimed);
    let claiming = Instant::now();
    let (Claimed { rows, .. }, sent) = claim(
        current.as_mut(),
        batch_size,
        Some(&mut publication),
        start,
        None,
    )
    .await?;
    if !rows.is_empty() {
        rt.phase(Phase::Claim, claiming);
    }
    let next = after_claim(
        rows.len(),
        batch_size,
        prefetched,
        true,
        stop.is_cancelled(),
    );
    if !matches!(next, AfterClaim::Prefetch(_)) {
        // A transaction prepared for a follow that will not come ends now, not after the
        // wait for more rows.
        other.release().await?;
    }
    let done = match next {
        AfterClaim::Nothing(end) => {
            rt.empty_claim();
            current.commit().await?;
            return Ok(end);
        }
        AfterClaim::Alone(done) => {
            let flight = Flight::launch(rt, rows, publication, sent).await;
            return pipeline::run(cycle, current, other, &producer, flight, done).await;
        }
        AfterClaim::Prefetch(done) => {
            rt.metrics.relay_batch_rows.observe(rows.len() as f64);
            done
        }
    };
    let session = current.as_mut();
    let follower = other.as_mut();
    // The other session goes on right after this claim when the store can say where that
    // is. It takes this claim's snapshot before the rows claimed last are sent, so its
    // first claim is on its way to the database while they are enqueued. The snapshot it
    // exports in turn lets this session prepare the next follow once it committed.
    let (followed, next_snapshot) = match session.handoff().await? {
        Some(handoff) => (true, follower.follow(&handoff).await?),
        None => (false, None),
    };
    let acknowledged = AtomicBool::new(false);
    let finish = async {
        publication.send(&rows[sent..]).await;
        let acked = conclude(
            rt,
            &mut *session,
            publication,
            (stop, cycle.grace),
            Some(&acknowledged),
        )
        .await;
        if let (Acked::Committed(Ok(_)), Some(snapshot)) = (&acked, next_snapshot.as_deref()) {
            // While the other session still claims: its rows come next, and this one
            // will follow them.
            session.prepare_follow(snapshot).await;
        }
        acked
    };
    let prefetch = async {
        let start = if followed {
            Start::Claimed(Claimed {
                rows: Vec::new(),
                more: true,
            })
        } else {
            Start::New
        };
        let claimed = claim(follower, batch_size, None, start, Some(&acknowledged)).await;
        claimed.map(|(claimed, _)| claimed)
    };
    // The prefetch is polled first: its statement goes out before the sending starts.
    let (next, acked) = tokio::join!(prefetch, finish);
    let outcomes = match acked {
        Acked::TimedOut => {
            // The other session's claim ends with the lane, which is stopping: its
            // connection closes, which rolls the claim back.
            current.rollback().await?;
            timed_out(rows.len());
            return Ok(BatchEnd::Empty);
        }
        // The lane ends; the other session's claim dies with its connection.
        Acked::Committed(Err(e)) => return Err(e),
        Acked::Committed(Ok(outcomes)) => {
            record_published(rt, rows.iter().zip(&outcomes));
            *ready = Some(next?);
            std::mem::swap(current, other);
            return Ok(done);
        }
        Acked::Failed(outcomes) => outcomes,
    };
    // Something failed. The prefetched rows were never sent and come after this batch:
    // they go back first (if the other session itself failed, the lane ends and its claim
    // dies with its connection).
    next?;
    other.rollback().await?;
    failed_batch(rt, current.as_mut(), &producer, &rows, &outcomes, done).await
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use async_trait::async_trait;

    use super::*;
    use crate::relay::store::{Columns, Settled, Settlement};

    /// A lane's pending rows in memory, claimed in order; records each claim's limit.
    struct Memory {
        pending: VecDeque<u32>,
        chunks: bool,
        limits: Vec<u32>,
    }

    impl Memory {
        fn new(rows: u32, chunks: bool) -> Self {
            Memory {
                pending: (1..=rows).collect(),
                chunks,
                limits: Vec::new(),
            }
        }

        fn take(&mut self, limit: u32) -> Vec<ClaimedRow> {
            self.limits.push(limit);
            let n = (limit as usize).min(self.pending.len());
            self.pending
                .drain(..n)
                .map(|id| {
                    ClaimedRow::new(&Columns {
                        id: &id.to_string(),
                        key: Some("k"),
                        payload: Some(b"{}"),
                        ..Columns::default()
                    })
                })
                .collect()
        }
    }

    #[async_trait]
    impl LaneSession for Memory {
        async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
            Ok(self.take(limit))
        }

        fn claims_in_chunks(&self) -> bool {
            self.chunks
        }

        async fn claim_more(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
            Ok(self.take(limit))
        }

        async fn commit(&mut self) -> Result<(), StoreError> {
            Ok(())
        }

        async fn rollback(&mut self) -> Result<(), StoreError> {
            Ok(())
        }

        async fn settle(&mut self, _s: &Settlement<'_>) -> Result<Settled, StoreError> {
            Ok(Settled::default())
        }
    }

    fn ids(c: &Claimed) -> Vec<String> {
        c.rows.iter().map(|r| r.id().to_owned()).collect()
    }

    #[tokio::test]
    async fn a_batch_is_claimed_in_chunks_up_to_the_batch_size_in_order() {
        let mut s = Memory::new(2_500, true);
        let (claimed, sent) = claim(&mut s, 2_200, None, Start::New, None).await.unwrap();
        assert_eq!(
            s.limits,
            [1_000, 1_000, 200],
            "chunks of CLAIM_CHUNK, the rest last"
        );
        assert_eq!(claimed.rows.len(), 2_200);
        let expected: Vec<String> = (1..=2_200).map(|i| i.to_string()).collect();
        assert_eq!(ids(&claimed), expected, "in publication order");
        assert!(claimed.more, "the last chunk filled: more may wait");
        assert_eq!(
            sent, 2_000,
            "the rows claimed last are left for the caller to send"
        );
    }

    #[tokio::test]
    async fn a_short_chunk_ends_the_claim() {
        let mut s = Memory::new(1_300, true);
        let (claimed, _) = claim(&mut s, 5_000, None, Start::New, None).await.unwrap();
        assert_eq!(s.limits, [1_000, 1_000]);
        assert_eq!(claimed.rows.len(), 1_300);
        assert!(!claimed.more, "the outbox is drained for now");
    }

    #[tokio::test]
    async fn a_store_that_does_not_extend_claims_claims_the_batch_at_once() {
        let mut s = Memory::new(2_500, false);
        let (claimed, sent) = claim(&mut s, 2_200, None, Start::New, None).await.unwrap();
        assert_eq!(s.limits, [2_200]);
        assert_eq!((claimed.rows.len(), sent), (2_200, 0));
    }

    #[tokio::test]
    async fn a_prefetch_stops_after_its_first_chunk_once_the_batch_before_is_acknowledged() {
        let acknowledged = AtomicBool::new(true);
        let mut s = Memory::new(5_000, true);
        let (claimed, _) = claim(&mut s, 3_000, None, Start::New, Some(&acknowledged))
            .await
            .unwrap();
        assert_eq!(s.limits, [1_000], "the first chunk, and no more");
        assert!(claimed.more, "the next cycle goes on claiming the rest");
        // The next cycle goes on from the rows already claimed.
        let (claimed, _) = claim(&mut s, 3_000, None, Start::Claimed(claimed), None)
            .await
            .unwrap();
        assert_eq!(s.limits, [1_000, 1_000, 1_000]);
        let expected: Vec<String> = (1..=3_000).map(|i| i.to_string()).collect();
        assert_eq!(ids(&claimed), expected);
    }
}
