//! What every lane of a table shares ([`TableRuntime`]), the settings a reload may change
//! while lanes run, how a batch ended ([`BatchEnd`]), and the phases of a batch's cycle as
//! `outboxd_relay_batch_phase_seconds` counts them: where a batch's time goes, so a rising
//! publish delay can be traced to the database or to Kafka.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::publish::MessageShape;
use super::store::Store;
use crate::config::TableConfig;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;

/// The settings of a table that a reload may change while its lanes run; lanes read
/// them from a `watch` channel at each batch, and an idle lane wakes when they change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSettings {
    /// `batch_size`.
    pub batch_size: u32,
    /// `poll_interval`.
    pub poll_interval: Duration,
}

impl TableSettings {
    /// The reloadable settings of `t`.
    pub fn of(t: &TableConfig) -> Self {
        TableSettings {
            batch_size: t.batch_size,
            poll_interval: t.poll_interval,
        }
    }

    /// Writes these settings into `t`, leaving its other keys as they are.
    pub fn write_into(self, t: &mut TableConfig) {
        t.batch_size = self.batch_size;
        t.poll_interval = self.poll_interval;
    }
}

/// Returns once `settings` changed; never when their sender is gone (no reload will come).
pub(super) async fn settings_changed(settings: &mut watch::Receiver<TableSettings>) {
    if settings.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What every lane of one table shares.
pub struct TableRuntime {
    /// The table's configuration.
    pub config: TableConfig,
    /// Its storage.
    pub store: Arc<dyn Store>,
    /// How a row becomes a message.
    pub messages: MessageShape,
    /// The shared producer.
    pub producer: Arc<ProducerSlot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Rows published since start, for the periodic progress log line.
    pub published: AtomicU64,
    /// How long a batch in flight may still wait for Kafka once the lane is stopped.
    pub drain_grace: Duration,
    /// Batch size and poll interval, changed by reloads.
    pub settings: watch::Receiver<TableSettings>,
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
    /// The batch size now in effect.
    pub(super) fn batch_size(&self) -> u32 {
        self.settings.borrow().batch_size
    }

    /// Counts a claim that found no row.
    pub(super) fn empty_claim(&self) {
        self.metrics
            .relay_empty_claims_total
            .with_label_values(&[self.config.table.as_str()])
            .inc();
    }

    /// Counts the time since `since` as a batch's time in `phase`.
    pub(super) fn phase(&self, phase: Phase, since: Instant) {
        self.metrics
            .relay_batch_phase_seconds
            .with_label_values(&[self.config.table.as_str(), phase.label()])
            .observe(since.elapsed().as_secs_f64());
    }
}
