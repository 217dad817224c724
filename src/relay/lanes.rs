//! Lane ownership of one table: this process registers as a member (a lock the store
//! holds on a coordinator connection), takes its fair share of lanes (one lock each, on the
//! lane's own connection), hands surplus lanes back when others join, and takes over lanes
//! that others dropped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::lane::run_lane;
use super::maintenance;
use super::publish::MessageShape;
use super::runtime::{TableRuntime, TableSettings};
use super::store::{self, Lane, Membership, StoreError};
use crate::config::TableConfig;
use crate::db::Database;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;
use crate::systemd::Liveness;

/// What a table's lane manager needs.
pub struct TableContext {
    /// The table's configuration.
    pub config: TableConfig,
    /// The database (pool and options for dedicated connections).
    pub database: Database,
    /// The shared producer.
    pub producer: Arc<ProducerSlot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How long a batch in flight may still wait for Kafka once shutdown began.
    pub drain_grace: Duration,
    /// Where the manager and its lanes report progress (systemd watchdog).
    pub liveness: Arc<Liveness>,
    /// Batch size and poll interval, changed by reloads.
    pub settings: watch::Receiver<TableSettings>,
    /// How a row becomes a message.
    pub messages: MessageShape,
}

/// Relays one table until `shutdown`; database failures restart the manager after a
/// backoff, never the process. A table that does not fit its mapping (a missing column, a
/// column of an unusable type) is reported once and checked again after each backoff, so
/// that fixing the table is enough.
pub async fn run_table(ctx: TableContext, shutdown: CancellationToken) {
    let mut retry = crate::backoff::exponential();
    let mut reported: Option<String> = None;
    while !shutdown.is_cancelled() {
        match manage(&ctx, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                let pause = retry.next().unwrap_or_default();
                let text = e.to_string();
                let misfit = matches!(
                    e,
                    TableError::Store(StoreError::Schema(_) | StoreError::NoTable(_))
                );
                if misfit && reported.as_deref() == Some(&text) {
                    tracing::debug!(error = %e, ?pause, "table still does not fit its mapping");
                } else {
                    tracing::error!(error = %e, ?pause, "relay for table stopped; restarting");
                }
                reported = Some(text);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Why a table's manager stopped (and starts again after a backoff).
#[derive(Debug, thiserror::Error)]
enum TableError {
    /// The database or the table's mapping.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The table's LISTEN wake-up or maintenance task ended while the table ran.
    #[error("the table's {0}")]
    Helper(String),
}

struct OwnedLane {
    stop: CancellationToken,
    task: tokio::task::Id,
}

struct Manager<'a> {
    ctx: &'a TableContext,
    rt: Arc<TableRuntime>,
    membership: Box<dyn Membership>,
    slot: u32,
    owned: BTreeMap<u32, OwnedLane>,
    /// The daemon's shutdown: each lane's stop is a child of it.
    shutdown: CancellationToken,
    /// Every lane task; a lane's end is learned from its join, whatever way it ended.
    tasks: JoinSet<()>,
    wake: watch::Sender<()>,
}

async fn manage(ctx: &TableContext, shutdown: &CancellationToken) -> Result<(), TableError> {
    let store = store::open(&ctx.database, &ctx.config).await?;
    let rt = Arc::new(TableRuntime {
        store: store.clone(),
        config: ctx.config.clone(),
        messages: ctx.messages.clone(),
        producer: ctx.producer.clone(),
        metrics: ctx.metrics.clone(),
        published: Default::default(),
        drain_grace: ctx.drain_grace,
        settings: ctx.settings.clone(),
    });
    let membership = store.join().await?;
    // The table's helpers: the LISTEN wake-up and the maintenance ticks. Owned here, so
    // they end with the table's task (aborted if it ends any other way).
    let helpers = CancellationToken::new();
    let mut helper_tasks = tokio::task::JoinSet::new();
    let (wake, _) = watch::channel(());
    {
        let (store, wake, stop) = (store.clone(), wake.clone(), helpers.clone());
        helper_tasks.spawn(
            async move {
                store.listen(wake, stop.clone()).await;
                // A store without notifications returns at once: its task waits for the
                // table's end like the others.
                stop.cancelled().await;
                "LISTEN wake-up"
            }
            .in_current_span(),
        );
    }
    {
        let (rt, stop) = (rt.clone(), helpers.clone());
        helper_tasks.spawn(
            async move {
                maintenance::run(rt, stop).await;
                "maintenance"
            }
            .in_current_span(),
        );
    }

    let mut m = Manager {
        ctx,
        rt,
        membership,
        slot: store::random_slot() as u32,
        owned: BTreeMap::new(),
        shutdown: shutdown.clone(),
        tasks: JoinSet::new(),
        wake,
    };
    let mut tick = tokio::time::interval(ctx.config.rebalance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat = ctx
        .liveness
        .register(format!("relay manager of {}", ctx.config.table));
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            // A lane ended (error, connection loss or panic): forget it; it is
            // re-acquired at the next tick, which also spaces out retries.
            Some(joined) = m.tasks.join_next_with_id(), if !m.tasks.is_empty() => {
                // A panic was logged and counted; the lane is re-acquired.
                let _ = m.ended(joined);
            }
            // The helpers run until the table ends: one that ended first (a panic, say)
            // restarts the table's manager, which starts them again.
            Some(joined) = helper_tasks.join_next() => {
                let what = match joined {
                    Ok(helper) => format!("{helper} ended"),
                    Err(e) if e.is_panic() => {
                        ctx.metrics
                            .task_panics_total
                            .with_label_values(&["relay helper"])
                            .inc();
                        "LISTEN wake-up or maintenance panicked".to_owned()
                    }
                    Err(_) => "LISTEN wake-up or maintenance was cancelled".to_owned(),
                };
                break Err(TableError::Helper(what));
            }
            _ = tick.tick() => {
                heartbeat.beat();
                crate::faults::manager(&ctx.config.table);
                if let Err(e) = m.rebalance().await {
                    break Err(e.into());
                }
            }
        }
    };
    let panicked = m.release_all().await;
    // Once the lanes are done, nothing needs the helpers: a maintenance statement in
    // flight (a gauge query, a purge batch) is not waited for.
    helpers.cancel();
    helper_tasks.abort_all();
    while helper_tasks.join_next().await.is_some() {}
    if let (Some(panic), true) = (panicked, shutdown.is_cancelled()) {
        // No re-acquiring now: the panic goes on to the daemon, which exits non-zero.
        std::panic::resume_unwind(panic);
    }
    result
}

/// A lane's name as liveness reports it.
fn lane_loop(table: &str, lane: u32) -> String {
    format!("relay lane {table}/{lane}")
}

/// What a task panicked with.
type Panic = Box<dyn std::any::Any + Send + 'static>;

impl Manager<'_> {
    async fn rebalance(&mut self) -> Result<(), StoreError> {
        let lanes = self.ctx.config.lanes;
        let census = self.membership.census(lanes).await?;
        let conflict = self
            .rt
            .metrics
            .relay_lanes_conflict
            .with_label_values(&[&self.ctx.config.table]);
        if let Some(other) = &census.other_lanes {
            if conflict.get() == 0 {
                tracing::error!(
                    lanes, other = %other,
                    "another relay of this table runs with a different lanes setting, which cuts the keys differently: this relay holds no lane and claims nothing until one setting is left"
                );
            }
            conflict.set(1);
            // A panic among them was counted; the lanes are re-acquired once one lanes
            // setting is left.
            let _ = self.release_all().await;
            self.publish_gauge();
            return Ok(());
        }
        if conflict.get() == 1 {
            tracing::warn!(lanes, "one lanes setting is left; taking lanes again");
            conflict.set(0);
        }
        let (members, taken) = (census.members, census.taken);
        let share = lanes.div_ceil(members);
        while self.owned.len() as u32 > share {
            let (&lane, owned) = self.owned.last_key_value().expect("owned is not empty");
            tracing::info!(lane, members, "handing lane over to another replica");
            owned.stop.cancel();
            self.join(lane).await;
        }
        let start = self.slot % lanes;
        for lane in (0..lanes).map(|i| (start + i) % lanes) {
            if self.owned.len() as u32 >= share {
                break;
            }
            if self.owned.contains_key(&lane) || taken.contains(&lane) {
                continue;
            }
            // A failure here only delays this lane: lanes already owned keep running.
            match self.rt.store.acquire_lane(lane).await {
                Ok(Some(held)) => self.spawn_lane(lane, held),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(lane, error = %e, "cannot acquire lane now; retrying at the next rebalance");
                    break;
                }
            }
        }
        self.publish_gauge();
        Ok(())
    }

    fn spawn_lane(&mut self, lane: u32, held: Lane) {
        let stop = self.shutdown.child_token();
        let rt = self.rt.clone();
        let wake = self.wake.subscribe();
        let token = stop.clone();
        let heartbeat = self
            .ctx
            .liveness
            .register(lane_loop(&self.ctx.config.table, lane));
        let task = self.tasks.spawn(
            async move {
                if crate::faults::lane(&rt.config.table, lane) {
                    return;
                }
                if let Err(e) = run_lane(rt, held, token, wake, heartbeat).await {
                    tracing::error!(error = %e, "lane failed; its lock is released and it will be re-acquired");
                }
            }
            .instrument(tracing::info_span!("lane", lane)),
        );
        self.owned.insert(
            lane,
            OwnedLane {
                stop,
                task: task.id(),
            },
        );
    }

    /// A lane task ended: it is no longer owned (a panic is logged and counted; the lane
    /// is re-acquired at the next rebalance like any lane that ended, and its heartbeat
    /// no longer counts as dead). Returns what it panicked with, if it did.
    fn ended(
        &mut self,
        joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) -> Option<Panic> {
        let (id, panic) = match joined {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), e.try_into_panic().ok()),
        };
        let lane = self
            .owned
            .iter()
            .find_map(|(lane, owned)| (owned.task == id).then_some(*lane));
        if let Some(lane) = lane {
            self.owned.remove(&lane);
            self.publish_gauge();
        }
        if panic.is_some() {
            self.rt
                .metrics
                .task_panics_total
                .with_label_values(&["relay lane"])
                .inc();
            tracing::error!(table = %self.ctx.config.table, lane, "a relay lane panicked; its connection and lock are gone and it will be re-acquired");
            if let Some(lane) = lane {
                self.ctx
                    .liveness
                    .recovered(&lane_loop(&self.ctx.config.table, lane));
            }
        }
        panic
    }

    /// Waits until `lane`'s task (stopped by the caller) has ended; other lanes that end
    /// meanwhile are forgotten too.
    async fn join(&mut self, lane: u32) {
        while self.owned.contains_key(&lane) {
            match self.tasks.join_next_with_id().await {
                Some(joined) => {
                    self.ended(joined);
                }
                None => {
                    self.owned.remove(&lane);
                }
            }
        }
    }

    fn publish_gauge(&self) {
        self.rt
            .metrics
            .relay_lanes_owned
            .with_label_values(&[&self.ctx.config.table])
            .set(self.owned.len() as i64);
    }

    /// Stops every lane after its batch in flight and waits for them; returns the first
    /// panic among them.
    async fn release_all(&mut self) -> Option<Panic> {
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        let mut first = None;
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let panic = self.ended(joined);
            first = first.or(panic);
        }
        self.owned.clear();
        self.publish_gauge();
        first
    }
}
