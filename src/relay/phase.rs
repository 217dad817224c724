//! The phases of a batch's cycle, as `outboxd_relay_batch_phase_seconds` counts them: where a
//! batch's time goes, so a rising publish delay can be traced to the database or to Kafka.

use tokio::time::Instant;

use super::lane::TableRuntime;

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
