//! What every lane of a table shares ([`TableRuntime`]), the settings a reload may change
//! while lanes run, how a batch ended ([`BatchEnd`]), and the phases of a batch's cycle as
//! `outboxd_relay_batch_phase_seconds` counts them: where a batch's time goes, so a rising
//! publish delay can be traced to the database or to Kafka.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::publish::TopicSource;
use super::store::Store;
use crate::config::TableConfig;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;

/// The settings of a table that a reload may change while lanes run.
#[derive(Debug)]
pub struct TableTunables {
    batch_size: AtomicU32,
    poll_interval_ms: AtomicU64,
    /// Wakes idle lanes so a shorter poll interval takes effect at once.
    pub(super) changed: Notify,
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

    pub(super) fn poll_interval(&self) -> Duration {
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

/// A phase of a batch's cycle.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    /// Its claim statements.
    Claim,
    /// From its last row sent to every delivery report in.
    Kafka,
    /// Its commit.
    Commit,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Claim => "claim",
            Phase::Kafka => "kafka",
            Phase::Commit => "commit",
        }
    }
}

impl TableRuntime {
    /// Counts the time since `since` as a batch's time in `phase`.
    pub(super) fn phase(&self, phase: Phase, since: Instant) {
        self.metrics
            .relay_batch_phase_seconds
            .with_label_values(&[self.config.table.as_str(), phase.label()])
            .observe(since.elapsed().as_secs_f64());
    }
}
