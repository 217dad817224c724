//! One lane's claim loop, on the session that holds the lane: claim a batch, publish it,
//! commit; on any failure roll back and settle the batch row by row. With a follower
//! session, the next batch is claimed while Kafka acknowledges a full one, and rows of
//! other keys are sent while a short one waits (see [`pipeline`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::phase::Phase;
use super::pipeline;
use super::publish::{Publication, RowOutcome, TopicSource};
use super::settle::{failed_batch, record_published};
use super::store::{ClaimedRow, LaneSession, Store, StoreError};
use crate::config::TableConfig;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;
use crate::systemd::Heartbeat;

/// The settings of a table that a reload may change while lanes run.
#[derive(Debug)]
pub struct TableTunables {
    batch_size: AtomicU32,
    poll_interval_ms: AtomicU64,
    /// Wakes idle lanes so a shorter poll interval takes effect at once.
    changed: Notify,
}

impl TableTunables {
    /// Starts from the table's configuration.
    pub fn new(t: &TableConfig) -> Self {
        let tunables = TableTunables {
            batch_size: AtomicU32::new(0),
            poll_interval_ms: AtomicU64::new(0),
            changed: Notify::new(),
        };
        tunables.set(t);
        tunables
    }

    /// Takes `batch_size` and `poll_interval` from `t`.
    pub fn set(&self, t: &TableConfig) {
        self.batch_size.store(t.batch_size, Ordering::Relaxed);
        self.poll_interval_ms
            .store(t.poll_interval.as_millis() as u64, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    pub(super) fn batch_size(&self) -> u32 {
        self.batch_size.load(Ordering::Relaxed)
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.load(Ordering::Relaxed))
    }
}

/// What every lane of one table shares.
pub struct TableRuntime {
    /// The table's configuration.
    pub config: TableConfig,
    /// Its storage.
    pub store: Arc<dyn Store>,
    /// How a row's topic is found.
    pub topics: TopicSource,
    /// The shared producer.
    pub producer: Arc<ProducerSlot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Rows published since start, for the periodic progress log line.
    pub published: AtomicU64,
    /// How long a batch in flight may still wait for Kafka once the lane is stopped.
    pub drain_grace: Duration,
    /// Batch size and poll interval, reloadable.
    pub tunables: Arc<TableTunables>,
}

/// How a batch ended, which decides what the lane does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BatchEnd {
    /// Nothing to claim: wait for a notification or the poll interval.
    Empty,
    /// Fewer rows than the batch size: the lane is drained for now.
    Partial,
    /// A full batch, or one that began in an earlier claim's view of the outbox (a
    /// prefetch): there is probably more, claim again at once.
    More,
    /// Kafka failed for reasons unrelated to the rows: back off, then retry.
    KafkaFailed,
    /// Kafka refused rows that are not yet dead: back off a little before retrying them.
    Refused,
}

/// Runs lane `lane` until `stop` is cancelled (after the batch in flight) or the
/// session fails (the lane is then released with it, and the caller re-acquires later).
pub async fn run_lane(
    rt: Arc<TableRuntime>,
    lane: u32,
    mut session: Box<dyn LaneSession>,
    stop: CancellationToken,
    mut wake: watch::Receiver<()>,
    heartbeat: Heartbeat,
) -> Result<(), StoreError> {
    let table = rt.config.table.as_str();
    let mut kafka_backoff = crate::backoff::exponential();
    let mut refusal_backoff = crate::backoff::exponential();
    let other = session.follower().await?;
    let mut sessions = Sessions {
        current: session,
        other,
        ready: None,
    };
    tracing::info!(
        table,
        lane,
        prefetch = sessions.other.is_some(),
        "lane acquired"
    );
    let grace = Grace::new(rt.drain_grace);
    let mut acks = pipeline::AckWait::default();
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
        let end = match batch(&mut cycle, &mut sessions).await {
            Ok(end) => end,
            Err(e) => {
                rt.metrics
                    .relay_publish_errors_total
                    .with_label_values(&[table, "database"])
                    .inc();
                return Err(e);
            }
        };
        let pause = match end {
            BatchEnd::More => {
                kafka_backoff = crate::backoff::exponential();
                refusal_backoff = crate::backoff::exponential();
                continue;
            }
            BatchEnd::Empty | BatchEnd::Partial => {
                kafka_backoff = crate::backoff::exponential();
                refusal_backoff = crate::backoff::exponential();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(rt.tunables.poll_interval()) => {}
                    _ = rt.tunables.changed.notified() => {}
                }
                continue;
            }
            BatchEnd::KafkaFailed => kafka_backoff.next(),
            BatchEnd::Refused => refusal_backoff.next(),
        };
        let pause = pause.unwrap_or(Duration::from_secs(30));
        tracing::debug!(table, lane, ?pause, "backing off");
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if sessions.ready.take().is_some() {
        sessions.current.rollback().await?;
    }
    tracing::info!(table, lane, "lane released");
    Ok(())
}

/// The sessions of one lane: the one whose batch comes next, and the follower (when the
/// store offers one), which swap roles after each prefetched batch.
struct Sessions {
    /// Claims (or has claimed, see `ready`) the next batch.
    current: Box<dyn LaneSession>,
    /// Claims the batch after it while Kafka acknowledges it.
    other: Option<Box<dyn LaneSession>>,
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
    /// [`LaneSession::follow`]).
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

/// How the wait for a batch's delivery reports ended.
pub(super) enum Acked {
    /// Kafka acknowledged every row, and the claim was committed (or the commit failed).
    Committed(Result<Vec<RowOutcome>, StoreError>),
    /// Some rows were not acknowledged; the claim is still open.
    Failed(Vec<RowOutcome>),
    /// Shutting down, and the reports did not come within the grace period.
    TimedOut,
}

/// How long a stopped lane still waits for its batches in flight: one period from the
/// first wait after the stop, shared by every batch of the lane.
pub(super) struct Grace {
    period: Duration,
    ends: OnceLock<Instant>,
}

impl Grace {
    fn new(period: Duration) -> Self {
        Grace {
            period,
            ends: OnceLock::new(),
        }
    }

    /// Returns once `stop` was cancelled and the grace period is over.
    async fn over(&self, stop: &CancellationToken) {
        stop.cancelled().await;
        let ends = *self.ends.get_or_init(|| Instant::now() + self.period);
        tokio::time::sleep_until(ends).await;
    }
}

/// What a lane's cycle works with besides its sessions.
pub(super) struct Cycle<'a> {
    pub(super) rt: &'a TableRuntime,
    pub(super) stop: &'a CancellationToken,
    /// Changes when rows were committed to the table (LISTEN).
    pub(super) wake: &'a mut watch::Receiver<()>,
    pub(super) heartbeat: &'a Heartbeat,
    pub(super) grace: &'a Grace,
    /// How long short batches usually wait for Kafka.
    pub(super) acks: &'a mut pipeline::AckWait,
}

/// Awaits the delivery reports of the rows `publication` sent, until the grace period
/// once stopped, and sets `acknowledged` when they are in. Commits `session`'s claim when
/// Kafka acknowledged every row, then begins the follow after `next_snapshot` on it. The
/// wait and the commit count as the batch's `kafka` and `commit` phases in `rt`.
pub(super) async fn conclude(
    rt: &TableRuntime,
    session: &mut dyn LaneSession,
    publication: Publication<'_>,
    stopping: (&CancellationToken, &Grace),
    acknowledged: Option<&AtomicBool>,
    next_snapshot: Option<&str>,
) -> Acked {
    let (stop, grace) = stopping;
    let waiting = Instant::now();
    let outcomes = tokio::select! {
        outcomes = publication.finish() => Some(outcomes),
        () = grace.over(stop) => None,
    };
    if let Some(acknowledged) = acknowledged {
        acknowledged.store(true, Ordering::Release);
    }
    if outcomes.is_some() {
        rt.phase(Phase::Kafka, waiting);
    }
    match outcomes {
        None => Acked::TimedOut,
        Some(o) if o.iter().all(|o| matches!(o, RowOutcome::Delivered { .. })) => {
            let committing = Instant::now();
            let committed = session.commit().await;
            rt.phase(Phase::Commit, committing);
            if let (Ok(()), Some(snapshot)) = (&committed, next_snapshot) {
                // While the follower still claims: its rows come next, and this session
                // will follow them.
                session.prepare_follow(snapshot).await;
            }
            Acked::Committed(committed.map(|()| o))
        }
        Some(o) => Acked::Failed(o),
    }
}

/// Logs a batch left in the outbox at shutdown.
pub(super) fn timed_out(rt: &TableRuntime, rows: usize) {
    tracing::warn!(
        table = %rt.config.table,
        rows,
        "shutting down: Kafka did not acknowledge the batch in time; rolled back, its rows stay in the outbox"
    );
}

/// One claim/publish/commit cycle. After a full batch the follower claims the next one,
/// chunk by chunk, until Kafka acknowledged this one; this one commits as soon as it is
/// acknowledged, while the follower may still claim. The follower's rows are sent only
/// once this batch committed (the next cycle goes on claiming the rest of its batch), and
/// rolled back unsent if this one failed, so they never overtake it. A batch that did not
/// fill goes on in [`pipeline::run`]: the rows committed while it waits are claimed around
/// its keys and sent at once.
async fn batch(cycle: &mut Cycle<'_>, sessions: &mut Sessions) -> Result<BatchEnd, StoreError> {
    let (rt, stop) = (cycle.rt, cycle.stop);
    let Sessions {
        current,
        other,
        ready,
    } = sessions;
    let batch_size = rt.tunables.batch_size();
    let producer = rt.producer.get();
    let mut publication = Publication::new(&producer, &rt.topics, stop, batch_size as usize);
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
    let full = rows.len() as u32 >= batch_size;
    let use_follower = full && !stop.is_cancelled();
    if !use_follower {
        // A transaction prepared for a follow that will not come ends now, not after the
        // wait for more rows.
        if let Some(other) = other.as_deref_mut() {
            other.release().await?;
        }
    }
    if rows.is_empty() {
        current.commit().await?;
        return Ok(if prefetched {
            BatchEnd::More
        } else {
            BatchEnd::Empty
        });
    }
    rt.metrics.relay_batch_rows.observe(rows.len() as f64);
    let done = if full || prefetched {
        BatchEnd::More
    } else {
        BatchEnd::Partial
    };
    if !use_follower {
        publication.send(&rows[sent..]).await;
        let flight = pipeline::Flight {
            rows,
            publication,
            sent: Instant::now(),
        };
        return pipeline::run(cycle, current, other, &producer, flight, done).await;
    }
    let session = current.as_mut();
    let mut follower = other.as_deref_mut();
    // The follower goes on right after this claim when the store can say where that is.
    // It takes this claim's snapshot before the rows claimed last are sent, so its first
    // claim is on its way to the database while they are enqueued. The snapshot it
    // exports in turn lets this session prepare the next follow once it committed.
    let (followed, next_snapshot) = match follower.as_deref_mut() {
        Some(f) => match session.handoff().await? {
            Some(handoff) => (true, f.follow(&handoff).await?),
            None => (false, None),
        },
        None => (false, None),
    };
    let acknowledged = AtomicBool::new(false);
    let finish = async {
        publication.send(&rows[sent..]).await;
        conclude(
            rt,
            session,
            publication,
            (stop, cycle.grace),
            Some(&acknowledged),
            next_snapshot.as_deref(),
        )
        .await
    };
    let prefetch = async {
        let f = follower.as_deref_mut()?;
        let start = if followed {
            Start::Claimed(Claimed {
                rows: Vec::new(),
                more: true,
            })
        } else {
            Start::New
        };
        let claimed = claim(f, batch_size, None, start, Some(&acknowledged)).await;
        Some(claimed.map(|(claimed, _)| claimed))
    };
    // The prefetch is polled first: its statement goes out before the sending starts.
    let (next, acked) = tokio::join!(prefetch, finish);
    let outcomes = match acked {
        Acked::TimedOut => {
            // The follower's connection closes, which rolls its claim back.
            *other = None;
            current.rollback().await?;
            timed_out(rt, rows.len());
            return Ok(BatchEnd::Empty);
        }
        // The lane ends; the follower's claim dies with its connection.
        Acked::Committed(Err(e)) => return Err(e),
        Acked::Committed(Ok(outcomes)) => {
            record_published(rt, rows.iter().zip(&outcomes));
            if let Some(next) = next.transpose()? {
                if let Some(follower) = other.as_mut() {
                    *ready = Some(next);
                    std::mem::swap(current, follower);
                }
            }
            return Ok(done);
        }
        Acked::Failed(outcomes) => outcomes,
    };
    // Something failed. The prefetched rows were never sent and come after this batch:
    // they go back first (if the follower itself failed, the lane ends and its claim dies
    // with its connection).
    if next.transpose()?.is_some() {
        if let Some(follower) = other.as_mut() {
            follower.rollback().await?;
        }
    }
    failed_batch(rt, current.as_mut(), &producer, &rows, &outcomes, done).await
}
