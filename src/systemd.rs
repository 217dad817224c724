//! systemd integration: `READY=1` once every configured half runs, `STOPPING=1` on drain,
//! and `WATCHDOG=1` pings at half of `WATCHDOG_USEC` for as long as every registered loop
//! (relay lanes and their managers, the consumer dispatcher) keeps beating: a stuck loop
//! stops the pings and systemd restarts the service. Without `NOTIFY_SOCKET` all of this
//! is a no-op.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The loops that must keep beating for the watchdog to be fed.
#[derive(Default)]
pub struct Liveness {
    loops: Mutex<Vec<(String, Weak<Mutex<Instant>>)>>,
}

/// One loop's heartbeat; dropping it unregisters the loop.
#[derive(Clone)]
pub struct Heartbeat(Arc<Mutex<Instant>>);

impl Heartbeat {
    /// The loop is making progress.
    pub fn beat(&self) {
        *self.0.lock().expect("heartbeat lock poisoned") = Instant::now();
    }
}

impl Liveness {
    /// Registers a loop, beating now.
    pub fn register(&self, name: impl Into<String>) -> Heartbeat {
        let beat = Arc::new(Mutex::new(Instant::now()));
        let mut loops = self.loops.lock().expect("liveness lock poisoned");
        loops.retain(|(_, w)| w.strong_count() > 0);
        loops.push((name.into(), Arc::downgrade(&beat)));
        Heartbeat(beat)
    }

    /// Names of registered loops that have not beaten for `max_silence`.
    pub fn stalled(&self, max_silence: Duration) -> Vec<String> {
        let loops = self.loops.lock().expect("liveness lock poisoned");
        loops
            .iter()
            .filter_map(|(name, w)| {
                let last = *w.upgrade()?.lock().expect("heartbeat lock poisoned");
                (last.elapsed() > max_silence).then(|| name.clone())
            })
            .collect()
    }
}

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// Everything configured is running.
pub fn ready(summary: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(summary)]);
}

/// The drain began.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// When systemd asked for a watchdog (`WatchdogSec=`), pings it at half the interval while
/// no loop has been silent for the whole interval, with a `STATUS=` summary, until `stop`.
pub fn spawn_watchdog(liveness: Arc<Liveness>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tracing::info!(?interval, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let stalled = liveness.stalled(interval);
            if stalled.is_empty() {
                let status = summary(&metrics);
                notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                tracing::error!(?stalled, "loops stopped making progress; withholding the watchdog ping so systemd restarts outboxd");
            }
        }
    });
}

/// A one-line state summary for `STATUS=`.
pub fn summary(m: &Metrics) -> String {
    let n = |name: &str, filter: &[(&str, &str)]| m.sum(name, filter) as u64;
    format!(
        "relay: {} lanes, {} published, {} dead rows; consumer: {} handled, {} dead letters",
        n("outboxd_relay_lanes_owned", &[]),
        n("outboxd_relay_published_total", &[]),
        n("outboxd_relay_dead_rows_total", &[]),
        n("outboxd_consumer_messages_total", &[("outcome", "done")]),
        n("outboxd_consumer_dead_letter_total", &[]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_loop_is_reported_until_it_beats_or_goes_away() {
        let liveness = Liveness::default();
        let lane = liveness.register("lane outbox/0");
        let manager = liveness.register("manager outbox");
        tokio::time::advance(Duration::from_secs(10)).await;
        manager.beat();
        assert_eq!(liveness.stalled(Duration::from_secs(5)), ["lane outbox/0"]);
        lane.beat();
        assert!(liveness.stalled(Duration::from_secs(5)).is_empty());
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(lane);
        drop(manager);
        assert!(
            liveness.stalled(Duration::from_secs(5)).is_empty(),
            "ended loops do not count"
        );
    }
}
