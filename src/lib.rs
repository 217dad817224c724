//! outboxd: publishes transactional-outbox rows to Kafka, at least once and in order per
//! key, and removes them only after Kafka acknowledged them.
//!
//! Module map. Public, for the binary and the tests:
//! - [`cli`]: subcommands (`run`, `check-config`, `migrate`, ...) and their exit codes;
//! - [`config`]: typed configuration, loading, validation, redaction;
//! - [`db`]: database connections and embedded migrations;
//! - [`relay`]: the outbox relay (lanes, claim loop, publishing, wake-up, storage);
//! - [`reload`]: SIGHUP reloads; [`metrics`]: every Prometheus metric;
//! - [`secrets`]: scrubs secrets from outgoing text; [`error_text`]: an error and its
//!   sources as one line; [`faults`]: panics the test suite arms (empty without the
//!   `fault-hooks` feature).
//!
//! Internal:
//! - `kafka`: configuration -> librdkafka properties, the embedded broker; `logging`:
//!   stderr logging with a reloadable filter;
//! - `consumer`: the consumer (partition workers, routing, retry, dead letters);
//! - `handlers`: where consumed messages go (http, command, sql, kafka, log);
//! - `backoff`: the shared reconnect/retry backoff; `http`: `/metrics`, `/healthz`,
//!   `/readyz`; `shutdown`: signals -> cancellation token; `systemd`:
//!   READY/WATCHDOG/STOPPING notifications;
//! - `status`: what `outboxd status` reports; `dlq`: `outboxd dlq replay`;
//!   `preflight`: what `outboxd check-config --connect` checks;
//! - `reserved_headers`: the header names only outboxd may write; `glob`: topic globs;
//!   `topic`: topic templates and names; `services`: what the relay and the consumer
//!   share; `exit`: the classes of failure behind the exit codes.
//!
//! [`start`] runs everything a configuration asks for and returns a [`Running`] daemon;
//! the binary and the tests both use it.

mod backoff;
pub mod cli;
pub mod config;
mod consumer;
pub mod db;
mod dlq;
pub mod error_text;
mod exit;
pub mod faults;
mod glob;
mod handlers;
mod http;
mod kafka;
mod logging;
pub mod metrics;
mod preflight;
pub mod relay;
pub mod reload;
mod reserved_headers;
mod reset;
pub mod secrets;
mod services;
mod shutdown;
mod status;
mod systemd;
mod topic;

pub use exit::ExitClass;
pub use services::{DrainBudget, Services};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use config::Config;
use kafka::ProducerSlot;
use metrics::Metrics;

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// librdkafka rejected the producer's properties.
    #[error("kafka.options")]
    Producer(#[source] rdkafka::error::KafkaError),
    /// `database.url` cannot be used.
    #[error(transparent)]
    Database(#[from] db::OpenError),
    /// The Kafka client or embedded broker could not be set up.
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
    /// A relay table could not start.
    #[error(transparent)]
    Relay(#[from] relay::StartError),
    /// The consumer could not start.
    #[error(transparent)]
    Consumer(#[from] consumer::StartError),
    /// The operations endpoint could not bind.
    #[error("http endpoint {addr}: {source}")]
    Http {
        /// The configured address.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// A part that cannot be restarted on its own ended (or panicked) before shutdown, or
    /// panicked during the drain; the rest was drained.
    #[error("{part} {how}; the rest was drained")]
    PartFailed {
        /// Which part: `relay table T`, `consumer`, `operations endpoint`.
        part: String,
        /// `panicked` or `ended before shutdown`.
        how: &'static str,
    },
    /// The drain did not finish within `shutdown_timeout`; open transactions are rolled
    /// back by the database when the process exits, so their rows stay in the outbox.
    #[error("drain did not finish within shutdown_timeout ({0:?}); unfinished batches roll back and their rows stay in the outbox")]
    DrainTimeout(Duration),
}

impl RunError {
    /// What kind of failure it is.
    pub fn class(&self) -> ExitClass {
        match self {
            RunError::Producer(_) | RunError::Database(_) | RunError::Relay(_) => ExitClass::Config,
            RunError::Consumer(e) => e.class(),
            RunError::Kafka(_) | RunError::Http { .. } | RunError::DrainTimeout(_) => {
                ExitClass::Failure
            }
            RunError::PartFailed { .. } => ExitClass::Software,
        }
    }
}

/// A started daemon.
pub struct Running {
    /// Where the operations endpoint listens (useful with port 0).
    pub http_addr: SocketAddr,
    /// The producer, shared by every relay lane.
    pub producer: Arc<ProducerSlot>,
    /// Applies configuration reloads (SIGHUP).
    pub reloader: Arc<reload::Reloader>,
    /// How the drain splits `shutdown_timeout`; the whole of it bounds `wait`'s drain.
    budget: DrainBudget,
    shutdown: CancellationToken,
    /// The relay's tables and the consumer, by name: none of them ends before shutdown.
    tasks: Vec<(String, JoinHandle<()>)>,
    http_stop: CancellationToken,
    http: JoinHandle<()>,
    metrics: Arc<Metrics>,
    _brokers: kafka::Brokers,
}

/// Starts the relay for every configured table, the consumer when configured, and the
/// operations endpoint. Everything
/// stops when `shutdown` is cancelled; await [`Running::wait`] for the drain.
pub async fn start(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<Running, RunError> {
    secrets::learn(&config);
    let brokers = kafka::Brokers::start(&config.kafka, &config.consumed_topics())?;
    let producer_config = kafka::producer_config(&config.kafka, &brokers.bootstrap);
    let producer = Arc::new(ProducerSlot::new(producer_config).map_err(RunError::Producer)?);
    let liveness = Arc::new(systemd::Liveness::default());
    let services = Services {
        producer: producer.clone(),
        metrics: metrics.clone(),
        liveness: liveness.clone(),
        shutdown: shutdown.clone(),
    };
    let database = if config.needs_database() {
        let database = db::Database::open(&config.database)?;
        if config.database.migrate {
            migrate_with_retry(&database, &shutdown).await;
        }
        Some(database)
    } else {
        None
    };
    let http_stop = CancellationToken::new();
    let state = http::HttpState {
        metrics: metrics.clone(),
        database: database.clone(),
        producer: producer.clone(),
        last_probe: Default::default(),
        liveness: liveness.clone(),
    };
    let (http_addr, http) = http::serve(config.http.listen, state, http_stop.clone())
        .await
        .map_err(|source| RunError::Http {
            addr: config.http.listen,
            source,
        })?;
    let budget = DrainBudget {
        total: config.shutdown_timeout,
    };
    let (relay_tasks, tunables) = match &database {
        Some(database) => relay::start(&config.relay, budget.relay_grace(), database, &services)?,
        None => (Vec::new(), Vec::new()),
    };
    let mut tasks: Vec<(String, JoinHandle<()>)> = config
        .relay
        .tables
        .iter()
        .map(|t| format!("relay table {}", t.table))
        .zip(relay_tasks)
        .collect();
    let consumer = consumer::start(&config, &brokers.bootstrap, database, &services, budget)?;
    let consumer = consumer.map(|(task, handle)| {
        tasks.push(("consumer".to_owned(), task));
        handle
    });
    let reloader = Arc::new(reload::Reloader::new(config.clone(), tunables, consumer));
    metrics.up.set(1);
    systemd::ready(&systemd::summary(&metrics));
    systemd::spawn_watchdog(liveness, metrics.clone(), http_stop.clone());
    tracing::info!(
        %http_addr,
        tables = config.relay.tables.len(),
        consumer = config.consumer.is_some(),
        embedded_broker = brokers.is_embedded(),
        "outboxd running"
    );
    Ok(Running {
        http_addr,
        reloader,
        producer,
        budget,
        shutdown,
        tasks,
        http_stop,
        http,
        metrics,
        _brokers: brokers,
    })
}

impl Running {
    /// Waits for `shutdown`, or for a part to end before it (which starts the shutdown of
    /// the rest), then drains: lanes finish their batches in flight, committing each, or
    /// rolling it back if Kafka has not acknowledged it within half the timeout. Fails if
    /// a part ended early or panicked (exit code 70), or the drain takes longer than
    /// `shutdown_timeout`.
    pub async fn wait(self) -> Result<(), RunError> {
        let mut parts: FuturesUnordered<_> = self
            .tasks
            .into_iter()
            .map(|(name, task)| async move { (name, task.await) })
            .collect();
        let mut http = self.http;
        let mut http_ended = false;
        let mut failed = tokio::select! {
            // First: a part that ended because the shutdown came is not a failure.
            biased;
            _ = self.shutdown.cancelled() => None,
            Some((part, ended)) = parts.next(), if !parts.is_empty() => {
                Some(part_failed(&self.metrics, part, ended))
            }
            ended = &mut http => {
                http_ended = true;
                Some(part_failed(&self.metrics, "operations endpoint".into(), ended))
            }
        };
        if let Some(e) = &failed {
            tracing::error!(error = %e, "stopping: a part of outboxd that cannot be restarted alone is gone");
            self.shutdown.cancel();
        }
        systemd::stopping();
        let started = tokio::time::Instant::now();
        let deadline = self.budget.total;
        let drained = tokio::time::timeout(deadline, async {
            while let Some((part, ended)) = parts.next().await {
                if let Err(e) = ended {
                    let e = part_failed(&self.metrics, part, Err(e));
                    tracing::error!(error = %e, "during the drain");
                    failed.get_or_insert(e);
                }
            }
        })
        .await;
        // Every committed batch was acknowledged in full, so the producer holds only
        // messages of rolled-back batches, whose rows stay in the outbox: drop them rather
        // than deliver them late (each would become one more duplicate).
        self.producer.discard_queued();
        self.metrics.up.set(0);
        self.http_stop.cancel();
        if !http_ended {
            // It stops gracefully; how it ended after the drain changes nothing.
            let _ = http.await;
        }
        match (failed, drained) {
            (Some(e), _) => Err(e),
            (None, Ok(())) => {
                tracing::info!(took = ?started.elapsed(), "drained; bye");
                Ok(())
            }
            (None, Err(_)) => Err(RunError::DrainTimeout(deadline)),
        }
    }
}

/// A part that cannot be restarted alone ended: counted when it panicked.
fn part_failed(
    metrics: &Metrics,
    part: String,
    ended: Result<(), tokio::task::JoinError>,
) -> RunError {
    let how = match ended {
        Err(e) if e.is_panic() => {
            metrics.task_panics_total.with_label_values(&[&part]).inc();
            "panicked"
        }
        Err(_) => "was cancelled",
        Ok(()) => "ended before shutdown",
    };
    RunError::PartFailed { part, how }
}

/// Starts and waits: the whole life of the daemon.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    start(config, metrics, shutdown).await?.wait().await
}

async fn migrate_with_retry(database: &db::Database, shutdown: &CancellationToken) {
    let mut retry = backoff::exponential();
    loop {
        match database.migrate().await {
            Ok(()) => return,
            Err(e) => {
                let pause = retry.next().unwrap_or_default();
                tracing::error!(error = %e, ?pause, "migrations failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}
