//! A paired lane's claim loop (`run_lane` with `Lane::Paired`: prefetch and overlapping
//! batches) on two sessions of an in-memory outbox, publishing to librdkafka's mock
//! cluster: every row once, per-key order (also after a row Kafka refuses), an early
//! batch never holding a key of the batch in flight, and a stop during a slow batch
//! rolling it back within the grace.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::lane::run_lane;
use super::publish::MessageShape;
use super::runtime::{TableRuntime, TableSettings};
use super::store::{
    self, ClaimedRow, Columns, Handoff, Lane, LaneSession, Membership, PairedSession, Settled,
    Settlement, Store, StoreError,
};
use crate::config::TableConfig;
use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;
use crate::systemd::Liveness;

const TOPIC: &str = "pairs";

/// The outbox both sessions share: rows in id order, who claimed which, what committed.
#[derive(Default)]
struct Outbox {
    /// `(id, key)`, pending, in id order.
    pending: Vec<(u64, String)>,
    /// id -> the session holding its open claim.
    claimed: HashMap<u64, usize>,
    /// Committed ids, in commit order.
    committed: Vec<u64>,
    /// What left the outbox, in order: `(id, dead)`.
    left: Vec<(u64, bool)>,
    /// Rows whose payload Kafka refuses (larger than `message.max.bytes`).
    oversized: HashSet<u64>,
    /// Refusals so far, by id.
    refusals: HashMap<String, i32>,
    /// Each claim around keys: keys held by the other session's open claim at the time,
    /// and the keys claimed.
    around: Vec<(HashSet<String>, HashSet<String>)>,
    rollbacks: usize,
}

impl Outbox {
    fn add(&mut self, id: u64, key: &str) {
        self.pending.push((id, key.to_owned()));
    }

    fn claim(&mut self, session: usize, limit: u32, skip: &HashSet<String>) -> Vec<ClaimedRow> {
        let mut taken = Vec::new();
        let mut held: HashSet<String> = skip.clone();
        for (id, key) in &self.pending {
            if taken.len() as u32 == limit {
                break;
            }
            if self.claimed.contains_key(id) || held.contains(key) {
                // A row skipped holds back every later row of its key.
                held.insert(key.clone());
                continue;
            }
            taken.push((*id, key.clone()));
        }
        for (id, _) in &taken {
            self.claimed.insert(*id, session);
        }
        let big = vec![b'x'; 2_000_000];
        taken
            .iter()
            .map(|(id, key)| {
                let payload: &[u8] = if self.oversized.contains(id) {
                    &big
                } else {
                    b"{}"
                };
                ClaimedRow::new(&Columns {
                    id: &id.to_string(),
                    key: Some(key),
                    payload: Some(payload),
                    ..Columns::default()
                })
            })
            .collect()
    }

    fn keys_of(&self, session: usize) -> HashSet<String> {
        self.pending
            .iter()
            .filter(|(id, _)| self.claimed.get(id) == Some(&session))
            .map(|(_, key)| key.clone())
            .collect()
    }
}

struct Session {
    me: usize,
    outbox: Arc<Mutex<Outbox>>,
}

impl Session {
    fn book(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap()
    }
}

#[async_trait]
impl LaneSession for Session {
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        let me = self.me;
        Ok(self.book().claim(me, limit, &HashSet::new()))
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        let me = self.me;
        let mut b = self.book();
        let mine: Vec<u64> = b
            .pending
            .iter()
            .filter(|(id, _)| b.claimed.get(id) == Some(&me))
            .map(|(id, _)| *id)
            .collect();
        b.pending.retain(|(id, _)| !mine.contains(id));
        for id in &mine {
            b.claimed.remove(id);
        }
        b.left.extend(mine.iter().map(|id| (*id, false)));
        b.committed.extend(mine);
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        let me = self.me;
        let mut b = self.book();
        b.claimed.retain(|_, s| *s != me);
        b.rollbacks += 1;
        Ok(())
    }

    /// As the stores do: the acknowledged rows leave, each refusal is counted, and the
    /// rows refused `max_attempts` times (and the bad ones) move to the dead rows.
    async fn settle(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        let mut b = self.book();
        for (id, _) in s.refused {
            *b.refusals.entry(id.to_string()).or_insert(0) += 1;
        }
        let (dead, still_refused) = s.dead_rows(&b.refusals);
        let finished: Vec<u64> = s.finished.iter().map(|id| id.parse().unwrap()).collect();
        let gone: Vec<u64> = dead.iter().map(|d| d.id.parse().unwrap()).collect();
        b.pending
            .retain(|(id, _)| !finished.contains(id) && !gone.contains(id));
        b.left.extend(finished.iter().map(|id| (*id, false)));
        b.left.extend(gone.iter().map(|id| (*id, true)));
        b.committed.extend(finished);
        Ok(Settled {
            moved: dead.len() as u64,
            dead,
            still_refused,
        })
    }
}

#[async_trait]
impl PairedSession for Session {
    async fn claim_around(
        &mut self,
        limit: u32,
        keys: &[&str],
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let me = self.me;
        let skip: HashSet<String> = keys.iter().map(|k| k.to_string()).collect();
        let mut b = self.book();
        let other = b.keys_of(1 - me);
        let rows = b.claim(me, limit, &skip);
        let claimed = rows
            .iter()
            .filter_map(|r| r.key().map(str::to_owned))
            .collect();
        b.around.push((other, claimed));
        Ok(rows)
    }

    async fn handoff(&mut self) -> Result<Option<Handoff>, StoreError> {
        Ok(None)
    }

    async fn follow(&mut self, _handoff: &Handoff) -> Result<Option<String>, StoreError> {
        panic!("no handoff is given, so none is followed");
    }

    async fn prepare_follow(&mut self, _snapshot: &str) {}

    async fn release(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The store of a table whose lane the test holds already: nothing asks it anything.
struct Held;

#[async_trait]
impl Store for Held {
    async fn join(&self) -> Result<Box<dyn Membership>, StoreError> {
        unreachable!("the lane is held")
    }
    async fn acquire_lane(&self, _lane: u32) -> Result<Option<Lane>, StoreError> {
        unreachable!("the lane is held")
    }
    async fn stats(&self) -> Result<(i64, Option<f64>), StoreError> {
        unreachable!("no maintenance runs")
    }
    async fn purge(&self, _retention_secs: f64) -> Result<u64, StoreError> {
        unreachable!("no maintenance runs")
    }
    async fn cleanup_attempts(&self) -> Result<u64, StoreError> {
        unreachable!("no maintenance runs")
    }
    async fn dead_rows(&self) -> Result<i64, StoreError> {
        unreachable!("no maintenance runs")
    }
    async fn lane_owners(&self) -> Result<Vec<store::LaneOwner>, StoreError> {
        unreachable!("no status is asked")
    }
    async fn preflight(&self) -> Result<store::preflight::TableCheck, StoreError> {
        unreachable!("no preflight runs")
    }
}

struct Rig {
    cluster: MockCluster<'static, DefaultProducerContext>,
    outbox: Arc<Mutex<Outbox>>,
    wake: watch::Sender<()>,
    stop: CancellationToken,
    lane: tokio::task::JoinHandle<Result<(), StoreError>>,
}

fn rig(batch_size: u32, drain_grace: Duration) -> Rig {
    rig_refusing(batch_size, drain_grace, TableConfig::default().max_attempts)
}

/// A rig whose rows move to the dead rows after `max_attempts` refusals.
fn rig_refusing(batch_size: u32, drain_grace: Duration, max_attempts: u32) -> Rig {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let config = TableConfig {
        table: "pairs".into(),
        topic: Some(TOPIC.into()),
        batch_size,
        max_attempts,
        poll_interval: Duration::from_secs(3600),
        ..TableConfig::default()
    };
    let producer = ProducerSlot::new(crate::kafka::producer_config(
        &Default::default(),
        &cluster.bootstrap_servers(),
    ))
    .unwrap();
    let (_, settings) = watch::channel(TableSettings::of(&config));
    let rt = Arc::new(TableRuntime {
        messages: MessageShape::new(&config).unwrap(),
        config,
        store: Arc::new(Held),
        producer: Arc::new(producer),
        metrics: Arc::new(Metrics::new()),
        published: AtomicU64::new(0),
        drain_grace,
        settings,
    });
    let outbox = Arc::new(Mutex::new(Outbox::default()));
    let session = |me| {
        Box::new(Session {
            me,
            outbox: outbox.clone(),
        }) as Box<dyn PairedSession>
    };
    let (wake, woken) = watch::channel(());
    let stop = CancellationToken::new();
    let heartbeat = Arc::new(Liveness::default()).register("lane");
    let lane = tokio::spawn(run_lane(
        rt,
        Lane::Paired(session(0), session(1)),
        stop.clone(),
        woken,
        heartbeat,
    ));
    Rig {
        cluster,
        outbox,
        wake,
        stop,
        lane,
    }
}

impl Rig {
    /// Adds rows `ids` of `keys` (row i of key `keys[i % keys.len()]`) and wakes the lane.
    fn commit_rows(&self, ids: std::ops::Range<u64>, keys: &[&str]) {
        {
            let mut b = self.outbox.lock().unwrap();
            for id in ids {
                b.add(id, keys[id as usize % keys.len()]);
            }
        }
        self.wake.send_replace(());
    }

    async fn until_committed(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.outbox.lock().unwrap().committed.len() < n {
            assert!(Instant::now() < deadline, "rows never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Each key's ids in commit order are ascending, and every id committed once.
fn assert_once_in_key_order(committed: &[u64], keys: &[&str], total: u64) {
    let mut sorted = committed.to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..total).collect::<Vec<_>>(), "every row once");
    for (k, _) in keys.iter().enumerate() {
        let of_key: Vec<u64> = committed
            .iter()
            .copied()
            .filter(|id| *id as usize % keys.len() == k)
            .collect();
        assert!(
            of_key.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {of_key:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_during_a_slow_batch_go_early_around_its_keys() {
    let r = rig(100, Duration::from_secs(10));
    // Warm up: the lane learns how long Kafka usually takes (an average over batches, the
    // first of which also waited for the producer to start).
    for round in 0..30u64 {
        let keys = ["a", "b", "c"];
        {
            let mut b = r.outbox.lock().unwrap();
            b.add(round, keys[round as usize % 3]);
        }
        r.wake.send_replace(());
        r.until_committed(round as usize + 1).await;
    }
    // Kafka slows down; a short batch of keys a, b, c goes out and waits.
    r.cluster
        .broker_round_trip_time(-1, Duration::from_millis(400))
        .unwrap();
    r.commit_rows(30..36, &["a", "b", "c"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Meanwhile rows of keys in flight and of other keys are committed.
    let keys = ["a", "b", "c", "d", "e", "f"];
    {
        let mut b = r.outbox.lock().unwrap();
        for id in 36..96 {
            b.add(id, keys[id as usize % 6]);
        }
    }
    r.wake.send_replace(());
    r.until_committed(96).await;
    let (around, committed) = {
        let b = r.outbox.lock().unwrap();
        (b.around.clone(), b.committed.clone())
    };
    assert!(
        !around.is_empty(),
        "a batch was claimed around the slow one's keys"
    );
    for (held, claimed) in &around {
        assert!(
            held.is_disjoint(claimed),
            "an early batch took keys {claimed:?} of the batch in flight ({held:?})"
        );
    }
    // Rows 0..36 cycle over a, b, c; 36..96 over all six keys.
    let key_of = |id: u64| {
        if id < 36 {
            ["a", "b", "c"][id as usize % 3]
        } else {
            keys[id as usize % 6]
        }
    };
    let mut sorted = committed.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..96).collect::<Vec<_>>(), "every row once");
    for key in keys {
        let of_key: Vec<u64> = committed
            .iter()
            .copied()
            .filter(|id| key_of(*id) == key)
            .collect();
        assert!(
            of_key.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {of_key:?}"
        );
    }
    r.stop.cancel();
    r.lane.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_arrives_once_in_key_order() {
    let r = rig(50, Duration::from_secs(10));
    let keys = ["a", "b", "c", "d"];
    for chunk in 0..20u64 {
        r.commit_rows(chunk * 37..(chunk + 1) * 37, &keys);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    r.until_committed(740).await;
    let committed = r.outbox.lock().unwrap().committed.clone();
    assert_once_in_key_order(&committed, &keys, 740);
    r.stop.cancel();
    r.lane.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_slow_batch_rolls_it_back_within_the_grace() {
    let r = rig(100, Duration::from_millis(300));
    r.commit_rows(0..10, &["a"]);
    r.until_committed(10).await;
    r.cluster
        .broker_round_trip_time(-1, Duration::from_secs(5))
        .unwrap();
    r.commit_rows(10..20, &["a"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.outbox.lock().unwrap().claimed.is_empty() {
        assert!(Instant::now() < deadline, "the batch was never claimed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = Instant::now();
    r.stop.cancel();
    r.lane.await.unwrap().unwrap();
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the lane ended {took:?} after the stop; its grace is 300 ms"
    );
    let b = r.outbox.lock().unwrap();
    assert_eq!(b.committed.len(), 10, "the slow batch did not commit");
    assert!(b.claimed.is_empty(), "its claim was rolled back");
    assert!(b.rollbacks >= 1);
    assert_eq!(b.pending.len(), 10, "its rows stay in the outbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_holds_back_the_later_rows_of_its_key_until_it_is_dead() {
    let r = rig_refusing(100, Duration::from_secs(10), 3);
    let keys = ["a", "b"];
    {
        let mut b = r.outbox.lock().unwrap();
        // Row 4 (key a) is too large for Kafka, every time.
        b.oversized.insert(4);
        for id in 0..40 {
            b.add(id, keys[id as usize % 2]);
        }
    }
    r.wake.send_replace(());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let b = r.outbox.lock().unwrap();
            if b.left.len() == 40 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of 40 rows left the outbox: {:?}, refusals {:?}",
                b.left.len(),
                b.left,
                b.refusals
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = r.outbox.lock().unwrap().left.clone();
    assert_eq!(
        left.iter().filter(|(_, dead)| *dead).collect::<Vec<_>>(),
        [&(4, true)],
        "the refused row, and only it, is dead after max_attempts (3) refusals"
    );
    let dead_at = left.iter().position(|(id, _)| *id == 4).unwrap();
    for (at, (id, _)) in left.iter().enumerate() {
        if *id > 4 && id % 2 == 0 {
            assert!(
                at > dead_at,
                "row {id} of key a left before row 4 was settled: {left:?}"
            );
        }
    }
    let of_key_b: Vec<u64> = left
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| id % 2 == 1)
        .collect();
    assert!(of_key_b.windows(2).all(|w| w[0] < w[1]), "key b in order");
    assert_eq!(r.outbox.lock().unwrap().refusals.get("4").copied(), Some(3));
    r.stop.cancel();
    r.lane.await.unwrap().unwrap();
}
