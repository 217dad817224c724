//! The relay half: for every configured table, lanes claim outbox rows, publish them to
//! Kafka and delete (or mark) them in the same transaction once Kafka acknowledged them.
//!
//! - `lanes`: lane ownership across replicas (locks the store provides);
//! - `lane`: one lane's claim/publish/commit loop; `plan`: settling a partly failed batch;
//!   `phase`: where a batch's time goes (a metric);
//! - `publish`: rows to messages, the shared idempotent producer;
//! - `notify`: PostgreSQL LISTEN wake-up; `maintenance`: gauges, purge, cleanup;
//! - `store`: the SQL per backend;
//! - `wal`: WAL capture, a table's inserts read from PostgreSQL's write-ahead log.

mod cycle;
mod decide;
mod lane;
pub(crate) mod lanes;
mod maintenance;
pub(crate) mod notify;
mod pipeline;
mod plan;
pub mod publish;
mod runtime;
pub use runtime::TableSettings;
#[cfg(test)]
mod paired_lane_tests;
mod settle;
pub mod store;
pub mod wal;

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::{Capture, RelayConfig};
use crate::db::Database;
use crate::services::Services;
use publish::MessageShape;

/// A table that cannot be relayed as configured.
#[derive(Debug, thiserror::Error)]
#[error("relay.tables `{table}`")]
pub struct StartError {
    /// The table.
    pub table: String,
    /// Why.
    #[source]
    pub source: publish::TopicSourceError,
}

/// Starts one lane manager per table, returning their tasks and their reloadable settings
/// (in table order). Each task returns once `shutdown` is cancelled and its
/// lanes have finished their batches in flight. A batch Kafka has not acknowledged within
/// `drain_grace` after `shutdown` is rolled back (its rows stay in the outbox).
pub fn start(
    relay: &RelayConfig,
    drain_grace: Duration,
    database: &Database,
    services: &Services,
) -> Result<Started, StartError> {
    let shapes = relay
        .tables
        .iter()
        .map(|table| {
            MessageShape::new(table).map_err(|source| StartError {
                table: table.table.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(relay
        .tables
        .iter()
        .zip(shapes)
        .map(|(table, messages)| {
            let (settings, watched) = watch::channel(TableSettings::of(table));
            let ctx = lanes::TableContext {
                config: table.clone(),
                database: database.clone(),
                producer: services.producer.clone(),
                metrics: services.metrics.clone(),
                drain_grace,
                liveness: services.liveness.clone(),
                settings: watched,
                messages,
            };
            let span = tracing::info_span!("table", table = %table.table);
            let shutdown = services.shutdown.clone();
            let task = match table.capture {
                Capture::Poll => tokio::spawn(lanes::run_table(ctx, shutdown).instrument(span)),
                Capture::Wal => tokio::spawn(wal::run_table(ctx, shutdown).instrument(span)),
            };
            (task, settings)
        })
        .unzip())
}

/// The relay's tasks, and the senders of each table's reloadable settings.
pub type Started = (Vec<JoinHandle<()>>, Vec<watch::Sender<TableSettings>>);
