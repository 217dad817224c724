//! What the relay and the consumer get from the daemon: the shared producer, metrics and
//! heartbeats, the shutdown signal, and how long each may drain.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;
use crate::systemd;

/// How the drain splits `shutdown_timeout`, the one place that does. The relay's batches
/// in flight wait for Kafka at most half of it and then roll back (their rows stay in the
/// outbox); the consumer's calls in flight get three quarters, leaving the rest for the
/// final offset commit and closing the client; whatever is still running at the whole of
/// it is abandoned. Every part learns of the stop from one shutdown token (lanes and
/// partition workers through child tokens of it) and counts its share from then.
#[derive(Debug, Clone, Copy)]
pub struct DrainBudget {
    /// `shutdown_timeout`.
    pub total: Duration,
}

impl DrainBudget {
    /// How long a relay batch in flight may still wait for Kafka once stopping.
    pub fn relay_grace(self) -> Duration {
        self.total / 2
    }

    /// How long the consumer's calls in flight may still run once stopping.
    pub fn consumer_calls(self) -> Duration {
        self.total.mul_f32(0.75)
    }

    /// By when, from the stop, the consumer has left its group (or gives up waiting for
    /// a rebalance in flight to end).
    pub fn consumer_leave_by(self) -> Duration {
        self.total.mul_f32(0.8)
    }

    /// By when, from the stop, the consumer's client has closed (or is left to close
    /// while the process ends).
    pub fn consumer_close_by(self) -> Duration {
        self.total.mul_f32(0.9)
    }
}

/// What the relay and the consumer share.
pub struct Services {
    /// The idempotent producer (relay, dead letters, kafka handlers).
    pub producer: Arc<ProducerSlot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Loop heartbeats for the systemd watchdog.
    pub liveness: Arc<systemd::Liveness>,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
}
