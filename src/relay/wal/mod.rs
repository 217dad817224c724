//! WAL capture (`capture = "wal"`): a table's inserts read from PostgreSQL's write-ahead
//! log through a logical replication slot (`pgoutput`), in commit order, without scanning
//! or changing the table.
//!
//! - `source`: the server's fitness, the publication, the slot and its session;
//! - `admin`: what `check-config --connect`, `status` and `relay drop-slot` do;
//! - `snapshot`: the rows the table held when the slot was created;
//! - `stream`: transactions to batches, and the slot's confirmed position;
//! - `deliver`: a batch to Kafka, failed rows again, dead rows recorded;
//! - `pgoutput`, `rows`: the stream's bytes to outbox rows.
//!
//! One replica reads a slot: the one holding the slot's advisory lock; the others stand
//! by and take over when its session ends. The slot's confirmed position moves only past
//! transactions whose every row Kafka acknowledged (or that were recorded as dead), so a
//! crash sends again at most what was read after the last confirmed transaction.

pub mod admin;
mod deliver;
mod pgoutput;
mod rows;
mod snapshot;
mod source;
mod stream;

use std::time::Duration;

use pgwire_replication::{Lsn, PgWireError, ReplicationClient};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, PgPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lanes::TableContext;
use super::store::stable_hash;
use crate::config::Snapshot;
use crate::db::{Database, ReplicationTarget};
use crate::metrics::Metrics;
use deliver::Deliverer;
use source::SlotState;

/// Why WAL capture of a table stopped (it starts again after a backoff).
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The database failed or is unreachable.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// outboxd's own tables are missing.
    #[error("outboxd's tables are missing (outboxd_relay_slots, outboxd_dead_rows): run `outboxd migrate`")]
    NotMigrated,
    /// The replication session failed.
    #[error("replication session: {}", crate::secrets::scrub(&.0.to_string()))]
    Replication(#[from] PgWireError),
    /// The server is older than PostgreSQL 14.
    #[error("the server is PostgreSQL {}.{}; capture = \"wal\" needs 14 or later", .0 / 10_000, .0 % 10_000)]
    ServerVersion(i32),
    /// The server does not write what logical decoding needs.
    #[error("wal_level is `{0}`; capture = \"wal\" needs `logical` (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)")]
    WalLevel(String),
    /// The role may not open a replication session.
    #[error(
        "role `{0}` may not replicate; capture = \"wal\" needs ALTER ROLE \"{0}\" REPLICATION"
    )]
    NoReplication(String),
    /// The publication exists without the table's inserts.
    #[error("publication `{publication}` does not publish inserts into `{table}`: ALTER PUBLICATION \"{publication}\" ADD TABLE {table}, or name another in relay.tables.wal.publication")]
    Publication {
        /// The publication.
        publication: String,
        /// The table.
        table: String,
    },
    /// The slot exists for another plugin or database.
    #[error("replication slot `{slot}` is for plugin {plugin} on database `{database}`, not pgoutput on this one: name another in relay.tables.wal.slot")]
    ForeignSlot {
        /// The slot.
        slot: String,
        /// Its plugin.
        plugin: String,
        /// Its database.
        database: String,
    },
    /// A session reads the slot.
    #[error("replication slot `{slot}` is in use by the server process {pid}: stop every outboxd relaying the table first")]
    SlotInUse {
        /// The slot.
        slot: String,
        /// The walsender's pid.
        pid: i32,
    },
    /// A replica relays the table (it holds the slot's lock).
    #[error("an outboxd relays the table from slot `{0}` (it holds the slot's lock): stop every outboxd relaying the table first")]
    Relayed(String),
    /// The connection holding the slot's lock stopped answering.
    #[error("the connection holding the slot's lock does not answer")]
    LockLost,
    /// The table does not exist.
    #[error("table `{0}` does not exist")]
    NoTable(String),
    /// A message of the stream does not decode.
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    /// The table lacks a mapped column.
    #[error(transparent)]
    Schema(#[from] rows::MissingColumn),
    /// The server answered what the protocol does not allow.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// The server ended the stream.
    #[error("the replication stream ended")]
    StreamEnded,
    /// Shutting down before Kafka acknowledged the rows in flight.
    #[error("stopped before Kafka acknowledged the rows in flight")]
    Stopped,
}

impl WalError {
    /// A failure on outboxd's own tables: the hint to migrate when they are missing.
    pub(crate) fn from_state(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => {
                WalError::NotMigrated
            }
            _ => WalError::Database(e),
        }
    }
}

/// Relays table `ctx.config` from its slot until `shutdown`; failures restart it after a
/// backoff, never the process.
pub async fn run_table(ctx: TableContext, shutdown: CancellationToken) {
    let Database::Postgres {
        opts,
        pool,
        replication,
    } = &ctx.database
    else {
        tracing::error!("capture = \"wal\" needs PostgreSQL; the table is not relayed");
        return;
    };
    let heartbeat = ctx
        .liveness
        .register(format!("relay wal of {}", ctx.config.table));
    let mut deliverer = Deliverer::new(&ctx, pool.clone(), heartbeat.clone());
    let mut restart = Restart::new();
    while !shutdown.is_cancelled() {
        let target = Target {
            opts,
            pool,
            replication,
        };
        let run = Run {
            ctx: &ctx,
            target,
            heartbeat: &heartbeat,
            stop: &shutdown,
        };
        let mut streamed = None;
        match run.lead_and_stream(&mut deliverer, &mut streamed).await {
            Ok(()) => {}
            Err(WalError::Stopped) => return,
            Err(e) => {
                let pause = restart.failed(&e, streamed.map(|since: Instant| since.elapsed()));
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        ctx.metrics
            .relay_lanes_owned
            .with_label_values(&[ctx.config.table.as_str()])
            .set(0);
    }
}

/// The backoff between two attempts to read the slot, and the error last logged. The
/// backoff starts afresh after a session that streamed for a while, so that an error that
/// comes back at once (a table that no longer fits its mapping, say) keeps its growing pause.
struct Restart {
    backoff: backon::ExponentialBackoff,
    reported: Option<String>,
}

/// How long a session must have streamed for the next failure to start a fresh backoff:
/// longer than the longest pause.
const STREAMED_A_WHILE: Duration = Duration::from_secs(60);

impl Restart {
    fn new() -> Self {
        Restart {
            backoff: crate::backoff::exponential(),
            reported: None,
        }
    }

    /// Logs `e` (at debug when it repeats the last one) and returns the pause before the
    /// next attempt; `streamed` is how long the failed session streamed.
    fn failed(&mut self, e: &WalError, streamed: Option<Duration>) -> Duration {
        if streamed.is_some_and(|d| d >= STREAMED_A_WHILE) {
            self.backoff = crate::backoff::exponential();
        }
        let pause = self.backoff.next().unwrap_or_default();
        let text = e.to_string();
        if self.reported.as_deref() == Some(&text) {
            tracing::debug!(error = %text, ?pause, "wal capture still failing");
        } else {
            tracing::error!(error = %text, ?pause, "wal capture stopped; restarting");
        }
        self.reported = Some(text);
        pause
    }
}

/// The database of a WAL table.
#[derive(Clone, Copy)]
struct Target<'a> {
    opts: &'a PgConnectOptions,
    pool: &'a PgPool,
    replication: &'a ReplicationTarget,
}

/// One leadership of a slot: wait for its lock, prepare it, stream it.
struct Run<'a> {
    ctx: &'a TableContext,
    target: Target<'a>,
    heartbeat: &'a crate::systemd::Heartbeat,
    stop: &'a CancellationToken,
}

impl Run<'_> {
    async fn lead_and_stream(
        &self,
        deliverer: &mut Deliverer,
        streamed: &mut Option<Instant>,
    ) -> Result<(), WalError> {
        let t = &self.ctx.config;
        let slot = t.wal_slot();
        let mut lock = self.target.opts.connect().await?;
        let (class, object) = lock_keys(&slot);
        loop {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(class)
                .bind(object)
                .fetch_one(&mut lock)
                .await?;
            if held {
                break;
            }
            self.heartbeat.beat();
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(t.rebalance_interval) => {}
            }
        }
        self.ctx
            .metrics
            .relay_lanes_owned
            .with_label_values(&[t.table.as_str()])
            .set(1);
        source::check_server(&mut lock).await?;
        source::ensure_publication(&mut lock, t).await?;
        let config = source::replication_config(self.target.replication, t);
        let state = source::slot_state(&mut lock, t).await?;
        let mut client = match state {
            SlotState::Ready | SlotState::Foreign => {
                if state == SlotState::Foreign && t.wal.snapshot == Snapshot::All {
                    tracing::warn!(%slot, "the slot was not created by outboxd: no initial snapshot, only the stream");
                }
                ReplicationClient::connect(config).await?
            }
            SlotState::Missing | SlotState::Unfinished => {
                if state == SlotState::Unfinished {
                    tracing::warn!(%slot, "the slot's initial snapshot was not published in full; dropping the slot and starting over (rows of it are sent again)");
                    source::drop_slot(&mut lock, &slot).await?;
                }
                self.create(&mut lock, config, deliverer).await?
            }
        };
        client.wait_started().await?;
        *streamed = Some(Instant::now());
        tracing::info!(%slot, "streaming from the replication slot");
        let mut watch = Watch {
            lock,
            slot: slot.clone(),
            table: t.table.clone(),
            metrics: self.ctx.metrics.clone(),
            every: t.rebalance_interval.min(t.maintenance_interval),
            last: None,
        };
        let streamed = stream::run(
            &mut client,
            stream::Stream {
                deliverer,
                heartbeat: self.heartbeat,
                stop: self.stop,
                watch: &mut watch,
            },
        )
        .await;
        let closed = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        if let (Ok(Some(at)), Ok(Ok(()))) = (&streamed, closed) {
            // The session's last report may not have reached the server: advance the slot
            // to what was confirmed, so a restart does not send it again.
            advance(self.target.pool, &slot, *at).await;
        }
        match streamed {
            Ok(_) if self.stop.is_cancelled() => Err(WalError::Stopped),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates the slot (marked unfinished until its snapshot is published), publishes
    /// the snapshot when asked, and starts the stream right after it.
    async fn create(
        &self,
        lock: &mut PgConnection,
        config: pgwire_replication::ReplicationConfig,
        deliverer: &mut Deliverer,
    ) -> Result<ReplicationClient, WalError> {
        let t = &self.ctx.config;
        source::mark_created(lock, t).await?;
        let export = t.wal.snapshot == Snapshot::All && t.wal.inserts;
        // Creating a slot waits for every transaction open on the server to end.
        let creating = source::create_slot(config, export);
        tokio::pin!(creating);
        let created = loop {
            tokio::select! {
                created = &mut creating => break created?,
                () = self.stop.cancelled() => return Err(WalError::Stopped),
                () = tokio::time::sleep(Duration::from_secs(10)) => {
                    self.heartbeat.beat();
                    tracing::info!("waiting for the transactions open on the server to end, to create the slot");
                }
            }
        };
        let mut client = created.client;
        if let Some(snapshot) = created.snapshot {
            let mut conn = self.target.opts.connect().await?;
            let started = Instant::now();
            let rows =
                snapshot::publish_existing(&mut conn, &snapshot, deliverer, self.stop).await?;
            tracing::info!(
                rows,
                seconds = started.elapsed().as_secs_f64(),
                "initial snapshot published"
            );
        }
        source::mark_ready(lock, t).await?;
        client.start().await?;
        Ok(client)
    }
}

/// The advisory lock `(class, object)` of a slot's reader.
fn lock_keys(slot: &str) -> (i32, i32) {
    (stable_hash("outboxd:wal"), stable_hash(slot))
}

/// Moves the slot's confirmed position to `at` once its session released it (best effort,
/// within 5 s: the next start sends again what was confirmed after the last report).
async fn advance(pool: &PgPool, slot: &str, at: Lsn) {
    let attempt = async {
        loop {
            // One statement: the slot is read and advanced as it is at that moment.
            let found = sqlx::query_as::<_, (bool, bool)>(
                "SELECT active, CASE WHEN NOT active AND confirmed_flush_lsn < $2::pg_lsn \
                 THEN pg_replication_slot_advance(slot_name, $2::pg_lsn) IS NOT NULL \
                 ELSE false END FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(slot)
            .bind(at.to_string())
            .fetch_optional(pool)
            .await?;
            match found {
                Some((true, _)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Some((false, advanced)) => return Ok::<bool, sqlx::Error>(advanced),
                None => return Ok(false),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(true)) => tracing::debug!(%at, "slot advanced to the last confirmed position at stop"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "slot not advanced at stop; the next start sends the rows confirmed since its last report again"),
        Err(_) => tracing::warn!("the slot's session did not end within 5 s; not advanced at stop, the next start sends the rows confirmed since its last report again"),
    }
}

/// What the stream checks now and then: that the slot's lock is still held (its
/// connection alive) and how far the slot lags behind the server's WAL.
pub struct Watch {
    lock: PgConnection,
    slot: String,
    table: String,
    metrics: std::sync::Arc<Metrics>,
    every: Duration,
    last: Option<Instant>,
}

impl Watch {
    async fn tick(&mut self) -> Result<(), WalError> {
        if self.last.is_some_and(|l| l.elapsed() < self.every) {
            return Ok(());
        }
        self.last = Some(Instant::now());
        let lag: Option<i64> = tokio::time::timeout(
            self.every.max(Duration::from_secs(5)),
            sqlx::query_scalar(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .fetch_optional(&mut self.lock),
        )
        .await
        .map_err(|_| WalError::LockLost)??
        .flatten();
        if let Some(lag) = lag {
            self.metrics
                .relay_slot_lag_bytes
                .with_label_values(&[self.table.as_str()])
                .set(lag);
        }
        Ok(())
    }
}
