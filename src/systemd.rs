//! systemd integration: `READY=1` once every configured half runs, `STOPPING=1` on drain,
//! and `WATCHDOG=1` pings at half of `WATCHDOG_USEC` for as long as every registered loop
//! (relay lanes and their managers, the consumer dispatcher, and on each partition
//! worker's behalf the dispatcher while that worker's turns move) keeps beating and none
//! died by a panic: a stuck or dead loop stops the pings and systemd
//! restarts the service (`/healthz` reads the same). Without `NOTIFY_SOCKET` the
//! notifications are no-ops.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The loops that must keep beating for the watchdog to be fed, and those that died.
#[derive(Default)]
pub struct Liveness {
    loops: Mutex<Vec<(String, Weak<Mutex<Instant>>)>>,
    /// Loops whose heartbeat was dropped by a panic, until one of the same name registers
    /// again (a lane re-acquired, say).
    died: Mutex<Vec<String>>,
}

/// One loop's heartbeat; dropping it unregisters the loop, unless it is dropped by a
/// panic: then the loop counts as dead, which fails the watchdog and `/healthz`.
#[derive(Clone)]
pub struct Heartbeat {
    beat: Arc<Mutex<Instant>>,
    name: Arc<str>,
    liveness: Weak<Liveness>,
}

impl Heartbeat {
    /// The loop is making progress.
    pub fn beat(&self) {
        *lock(&self.beat) = Instant::now();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(liveness) = self.liveness.upgrade() {
                lock(&liveness.died).push(self.name.to_string());
            }
        }
    }
}

/// Locks `m` even if a panic poisoned it: every value behind these locks is whole after
/// any single assignment.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loops that died or stopped making progress.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unwell {
    /// Loops that ended by a panic and were not started again.
    pub died: Vec<String>,
    /// Loops silent for longer than allowed.
    pub stalled: Vec<String>,
}

impl Unwell {
    /// Nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.died.is_empty() && self.stalled.is_empty()
    }
}

impl std::fmt::Display for Unwell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.died.is_empty() {
            writeln!(f, "died: {}", self.died.join(", "))?;
        }
        if !self.stalled.is_empty() {
            writeln!(f, "stalled: {}", self.stalled.join(", "))?;
        }
        Ok(())
    }
}

impl Liveness {
    /// Registers a loop, beating now.
    pub fn register(self: &Arc<Self>, name: impl Into<String>) -> Heartbeat {
        let name: String = name.into();
        let beat = Arc::new(Mutex::new(Instant::now()));
        lock(&self.died).retain(|died| *died != name);
        let mut loops = lock(&self.loops);
        loops.retain(|(_, w)| w.strong_count() > 0);
        loops.push((name.clone(), Arc::downgrade(&beat)));
        Heartbeat {
            beat,
            name: name.into(),
            liveness: Arc::downgrade(self),
        }
    }

    /// A supervisor restarted (or will restart) the loop `name` that died: it no longer
    /// counts as dead.
    pub fn recovered(&self, name: &str) {
        lock(&self.died).retain(|died| died != name);
    }

    /// Names of registered loops that have not beaten for `max_silence`.
    pub fn stalled(&self, max_silence: Duration) -> Vec<String> {
        let loops = lock(&self.loops);
        loops
            .iter()
            .filter_map(|(name, w)| {
                let beat = w.upgrade()?;
                let last = *lock(&beat);
                (last.elapsed() > max_silence).then(|| name.clone())
            })
            .collect()
    }

    /// Loops that died, and those silent for `max_silence`.
    pub fn unwell(&self, max_silence: Duration) -> Unwell {
        Unwell {
            died: lock(&self.died).clone(),
            stalled: self.stalled(max_silence),
        }
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
            let unwell = liveness.unwell(interval);
            if unwell.is_empty() {
                let status = summary(&metrics);
                notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                tracing::error!(died = ?unwell.died, stalled = ?unwell.stalled, "loops died or stopped making progress; withholding the watchdog ping so systemd restarts outboxd");
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
    async fn a_loop_that_panics_is_dead_until_it_registers_again() {
        let liveness = Arc::new(Liveness::default());
        let beat = liveness.register("relay manager of t");
        let ended = liveness.register("relay lane t/0");
        drop(ended);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _beat = beat;
            panic!("a loop panics");
        }));
        assert!(panicked.is_err());
        let unwell = liveness.unwell(Duration::from_secs(60));
        assert_eq!(
            unwell.died,
            ["relay manager of t"],
            "a normal end unregisters"
        );
        assert_eq!(unwell.to_string(), "died: relay manager of t\n");
        let _again = liveness.register("relay manager of t");
        assert!(liveness.unwell(Duration::from_secs(60)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_loop_is_reported_until_it_beats_or_goes_away() {
        let liveness = Arc::new(Liveness::default());
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
