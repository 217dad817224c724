//! What one cycle of a lane works with: the shutdown grace shared by its batches in
//! flight, the usual wait for Kafka, and concluding a sent batch (await its delivery
//! reports, then commit its claim).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::publish::{Publication, RowOutcome};
use super::runtime::{Phase, TableRuntime};
use super::store::{LaneSession, StoreError};
use crate::systemd::Heartbeat;

/// How much longer than usual a batch waits for Kafka before the rows committed meanwhile
/// are claimed early.
const SLOW: u32 = 2;

/// How long a short batch usually takes from its sending to its commit (a moving
/// average), so that only a slow acknowledgement makes the lane claim early, as a hedged
/// request goes out only once the first one is late. A usual one then costs no extra
/// transaction: under a steady high rate, whole batches are cheaper per row than pairs of
/// overlapping ones.
#[derive(Debug, Default)]
pub(super) struct AckWait {
    usual: Option<Duration>,
}

impl AckWait {
    pub(super) fn record(&mut self, waited: Duration) {
        self.usual = Some(match self.usual {
            None => waited,
            Some(usual) => usual.mul_f64(0.875) + waited.mul_f64(0.125),
        });
    }

    /// How long after its sending a batch is slow.
    pub(super) fn slow_after(&self) -> Duration {
        self.usual.unwrap_or_default() * SLOW
    }
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
    pub(super) fn new(period: Duration) -> Self {
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
    pub(super) acks: &'a mut AckWait,
}

/// Awaits the delivery reports of the rows `publication` sent, until the grace period
/// once stopped, and sets `acknowledged` when they are in. Commits `session`'s claim when
/// Kafka acknowledged every row. The wait and the commit count as the batch's `kafka` and
/// `commit` phases in `rt`.
pub(super) async fn conclude(
    rt: &TableRuntime,
    session: &mut dyn LaneSession,
    publication: Publication<'_>,
    stopping: (&CancellationToken, &Grace),
    acknowledged: Option<&AtomicBool>,
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
            Acked::Committed(committed.map(|()| o))
        }
        Some(o) => Acked::Failed(o),
    }
}

/// Logs a batch left in the outbox at shutdown.
pub(super) fn timed_out(rows: usize) {
    tracing::warn!(
        rows,
        "shutting down: Kafka did not acknowledge the batch in time; rolled back, its rows stay in the outbox"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_grace_is_one_period_from_the_first_wait_after_the_stop() {
        let grace = Grace::new(Duration::from_secs(10));
        let stop = CancellationToken::new();
        let begun = Instant::now();
        let waiting = tokio::time::timeout(Duration::from_secs(60), grace.over(&stop)).await;
        assert!(waiting.is_err(), "no grace runs out before the stop");
        stop.cancel();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let first = Instant::now();
        grace.over(&stop).await;
        assert_eq!(first.elapsed(), Duration::from_secs(10));
        // A later batch of the lane shares the period rather than getting one of its own.
        let second = Instant::now();
        grace.over(&stop).await;
        assert_eq!(second.elapsed(), Duration::ZERO);
        assert_eq!(begun.elapsed(), Duration::from_secs(73));
    }

    #[test]
    fn a_batch_is_slow_after_twice_the_usual_wait_and_the_first_at_once() {
        let mut acks = AckWait::default();
        assert_eq!(acks.slow_after(), Duration::ZERO, "nothing usual yet");
        acks.record(Duration::from_millis(8));
        assert_eq!(acks.slow_after(), Duration::from_millis(16));
        acks.record(Duration::from_millis(16));
        // An eighth of the way to the new wait.
        assert_eq!(acks.slow_after(), Duration::from_millis(18));
    }
}
