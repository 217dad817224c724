//! Lane ownership of one table: this process registers as a member (an advisory lock on a
//! coordinator connection), takes its fair share of lanes (one advisory lock each, on the
//! lane's own connection), hands surplus lanes back when others join, and takes over lanes
//! that others dropped.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::lane::{run_lane, TableRuntime, TableTunables};
use super::publish::TopicSource;
use super::store::postgres::{self as pg, TableSql};
use super::store::StoreError;
use super::{maintenance, notify};
use crate::config::TableConfig;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;
use crate::systemd::Liveness;

/// What a table's lane manager needs.
pub struct TableContext {
    /// The table's configuration.
    pub config: TableConfig,
    /// Options for dedicated connections (lanes, coordinator, LISTEN).
    pub connect: PgConnectOptions,
    /// The shared pool (maintenance).
    pub pool: PgPool,
    /// The shared producer.
    pub producer: Arc<ProducerSlot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How long a batch in flight may still wait for Kafka once shutdown began.
    pub drain_grace: Duration,
    /// Where the manager and its lanes report progress (systemd watchdog).
    pub liveness: Arc<Liveness>,
    /// Batch size and poll interval, changed by reloads.
    pub tunables: Arc<TableTunables>,
}

/// Advisory lock classes (first key) of a table: its lanes and its members.
pub(crate) fn lock_classes(table: &str) -> (i32, i32) {
    (
        stable_hash(&format!("outboxd:lane:{table}")),
        stable_hash(&format!("outboxd:member:{table}")),
    )
}

/// FNV-1a, masked to a positive i32: the same in every process and version.
fn stable_hash(s: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

fn random_slot() -> i32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    (h.finish() & 0x7fff_ffff) as i32
}

/// Relays one table until `shutdown`; database failures restart the manager after a
/// backoff, never the process.
pub async fn run_table(ctx: TableContext, shutdown: CancellationToken) {
    let mut retry = crate::backoff::exponential();
    let table = ctx.config.table.clone();
    while !shutdown.is_cancelled() {
        match manage(&ctx, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                let pause = retry.next().unwrap_or_default();
                tracing::error!(%table, error = %e, ?pause, "relay for table stopped; restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

struct OwnedLane {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct Manager<'a> {
    ctx: &'a TableContext,
    rt: Arc<TableRuntime>,
    coordinator: PgConnection,
    lane_class: i32,
    member_class: i32,
    slot: i32,
    owned: BTreeMap<u32, OwnedLane>,
    wake: watch::Sender<()>,
    exited: mpsc::UnboundedSender<u32>,
}

async fn manage(ctx: &TableContext, shutdown: &CancellationToken) -> Result<(), StoreError> {
    let mut coordinator = pg::connect(&ctx.connect).await?;
    let shape = pg::introspect(&mut coordinator, &ctx.config).await?;
    let topics = TopicSource::new(&ctx.config).map_err(StoreError::Schema)?;
    let rt = Arc::new(TableRuntime {
        sql: TableSql::new(&ctx.config, &shape),
        config: ctx.config.clone(),
        topics,
        producer: ctx.producer.clone(),
        metrics: ctx.metrics.clone(),
        published: Default::default(),
        drain_grace: ctx.drain_grace,
        tunables: ctx.tunables.clone(),
    });
    let (lane_class, member_class) = lock_classes(&ctx.config.table);
    let slot = loop {
        let slot = random_slot();
        if pg::try_lock(&mut coordinator, member_class, slot).await? {
            break slot;
        }
    };
    let helpers = CancellationToken::new();
    let _stop_helpers = helpers.clone().drop_guard();
    let (wake, _) = watch::channel(());
    if !ctx.config.notify_channel.is_empty() {
        tokio::spawn(notify::listen(
            ctx.connect.clone(),
            ctx.config.table.clone(),
            ctx.config.notify_channel.clone(),
            wake.clone(),
            helpers.clone(),
        ));
    }
    tokio::spawn(maintenance::run(
        rt.clone(),
        ctx.pool.clone(),
        helpers.clone(),
    ));

    let (exited, mut exits) = mpsc::unbounded_channel();
    let mut m = Manager {
        ctx,
        rt,
        coordinator,
        lane_class,
        member_class,
        slot,
        owned: BTreeMap::new(),
        wake,
        exited,
    };
    let mut tick = tokio::time::interval(ctx.config.rebalance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat = ctx
        .liveness
        .register(format!("relay manager of {}", ctx.config.table));
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            // A lane ended (error or connection loss): forget it; it is re-acquired at the
            // next tick, which also spaces out retries.
            Some(lane) = exits.recv() => {
                if m.owned.get(&lane).is_some_and(|l| l.task.is_finished()) {
                    m.owned.remove(&lane);
                    m.publish_gauge();
                }
            }
            _ = tick.tick() => {
                heartbeat.beat();
                if let Err(e) = m.rebalance().await {
                    break Err(e);
                }
            }
        }
    };
    m.release_all().await;
    result
}

impl Manager<'_> {
    async fn rebalance(&mut self) -> Result<(), StoreError> {
        let lanes = self.ctx.config.lanes;
        let held =
            pg::held_locks(&mut self.coordinator, [self.lane_class, self.member_class]).await?;
        let members = held
            .iter()
            .filter(|(c, _)| *c == self.member_class)
            .count()
            .max(1) as u32;
        let taken: HashSet<u32> = held
            .iter()
            .filter(|(c, _)| *c == self.lane_class)
            .map(|(_, lane)| *lane as u32)
            .collect();
        let share = lanes.div_ceil(members);
        while self.owned.len() as u32 > share {
            let (lane, owned) = self.owned.pop_last().expect("owned is not empty");
            tracing::info!(table = %self.ctx.config.table, lane, members, "handing lane over to another replica");
            owned.stop.cancel();
            let _ = owned.task.await;
        }
        let start = self.slot as u32 % lanes;
        for lane in (0..lanes).map(|i| (start + i) % lanes) {
            if self.owned.len() as u32 >= share {
                break;
            }
            if self.owned.contains_key(&lane) || taken.contains(&lane) {
                continue;
            }
            // A failure here only delays this lane: lanes already owned keep running.
            let acquired = async {
                let mut conn = pg::connect(&self.ctx.connect).await?;
                let locked = pg::try_lock(&mut conn, self.lane_class, lane as i32).await?;
                Ok::<_, StoreError>(locked.then_some(conn))
            };
            match acquired.await {
                Ok(Some(conn)) => self.spawn_lane(lane, conn),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(table = %self.ctx.config.table, lane, error = %e, "cannot acquire lane now; retrying at the next rebalance");
                    break;
                }
            }
        }
        self.publish_gauge();
        Ok(())
    }

    fn spawn_lane(&mut self, lane: u32, conn: PgConnection) {
        let stop = CancellationToken::new();
        let rt = self.rt.clone();
        let wake = self.wake.subscribe();
        let exited = self.exited.clone();
        let token = stop.clone();
        let heartbeat = self
            .ctx
            .liveness
            .register(format!("relay lane {}/{lane}", self.ctx.config.table));
        let task = tokio::spawn(async move {
            let table = rt.config.table.clone();
            if let Err(e) = run_lane(rt, lane, conn, token, wake, heartbeat).await {
                tracing::error!(%table, lane, error = %e, "lane failed; its lock is released and it will be re-acquired");
            }
            let _ = exited.send(lane);
        });
        self.owned.insert(lane, OwnedLane { stop, task });
    }

    fn publish_gauge(&self) {
        self.rt
            .metrics
            .relay_lanes_owned
            .with_label_values(&[&self.ctx.config.table])
            .set(self.owned.len() as i64);
    }

    /// Stops every lane after its batch in flight and waits for them.
    async fn release_all(&mut self) {
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        while let Some((_, owned)) = self.owned.pop_first() {
            let _ = owned.task.await;
        }
        self.publish_gauge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_classes_are_stable_and_distinct() {
        let (a, b) = lock_classes("outbox");
        assert_eq!((a, b), lock_classes("outbox"));
        assert_ne!(a, b);
        assert!(a >= 0 && b >= 0);
        assert_ne!(lock_classes("other").0, a);
    }
}
