//! Shared test helpers: a fresh outbox table per test, a mock Kafka cluster, a consumer
//! that collects what was published, and an in-process daemon.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboxd::config::{Config, TableConfig};
use outboxd::metrics::Metrics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub type Cluster = MockCluster<'static, DefaultProducerContext>;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A pool on the test database with outboxd's migrations applied.
pub async fn db() -> PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .expect("PostgreSQL reachable at DATABASE_URL");
    outboxd::db::migrator(outboxd::db::Backend::Postgres)
        .run(&pool)
        .await
        .expect("migrations apply");
    pool
}

/// A unique name for this test's table, topic and channel.
/// `name` as a column of a table mapping.
pub fn col(name: &str) -> outboxd::config::Column {
    name.parse().expect("a column name")
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t_{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 100_000
    )
}

/// Creates a copy of the reference outbox table, with the NOTIFY trigger on a channel
/// named after the table.
pub async fn outbox_table(pool: &PgPool, prefix: &str) -> String {
    let table = unique(prefix);
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
         CREATE TRIGGER {table}_notify AFTER INSERT ON {table}
             FOR EACH STATEMENT EXECUTE FUNCTION outboxd_notify('{table}');"
    ))
    .execute(pool)
    .await
    .unwrap();
    table
}

/// Inserts rows `first..first+count` with keys `k{n % keys}` and payload `{"n": n}`; the
/// event type is the table name, so the topic is `t.<table>`.
pub async fn insert_rows(pool: &PgPool, table: &str, first: i64, count: i64, keys: i64) {
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'account', 'k' || (g % $3), '{table}', jsonb_build_object('n', g)
         FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) AS g ORDER BY g"
    ))
    .bind(first)
    .bind(count)
    .bind(keys)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn count_rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The topic rows of `table` go to.
pub fn topic_of(table: &str) -> String {
    format!("t.{table}")
}

/// A mock cluster with `topic` created with `partitions` partitions.
pub fn cluster(topic: &str, partitions: i32) -> Cluster {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(topic, partitions, 1).unwrap();
    cluster
}

/// What most relay tests start from: the database, a fresh outbox table, its topic and
/// a mock cluster that has the topic.
pub struct Relayed {
    pub pool: PgPool,
    pub table: String,
    pub topic: String,
    pub cluster: Cluster,
}

pub async fn relayed(prefix: &str, partitions: i32) -> Relayed {
    let pool = db().await;
    let table = outbox_table(&pool, prefix).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, partitions);
    Relayed {
        pool,
        table,
        topic,
        cluster,
    }
}

/// Waits until `table` is empty.
pub async fn drained(pool: &PgPool, table: &str, timeout: Duration) {
    eventually(&format!("{table} drained"), timeout, || async {
        count_rows(pool, table).await == 0
    })
    .await;
}

/// A config relaying `table` to `bootstrap` with test-friendly intervals.
pub fn config(table: &str, bootstrap: &str) -> Config {
    let mut c = Config {
        shutdown_timeout: Duration::from_secs(20),
        ..Config::default()
    };
    c.database.url = Some(database_url());
    c.kafka.brokers = Some(bootstrap.into());
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.relay.tables.push(TableConfig {
        table: table.into(),
        topic: Some("t.{event_type}".into()),
        notify_channel: Some(table.into()),
        poll_interval: Duration::from_millis(200),
        rebalance_interval: Duration::from_millis(300),
        maintenance_interval: Duration::from_millis(300),
        ..TableConfig::default()
    });
    c
}

/// A daemon running in this process.
pub struct Daemon {
    pub metrics: Arc<Metrics>,
    pub reloader: Arc<outboxd::reload::Reloader>,
    pub stop: CancellationToken,
    pub http_addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<Result<(), outboxd::RunError>>,
}

impl Daemon {
    pub async fn start(config: Config) -> Daemon {
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let running = outboxd::start(config, metrics.clone(), stop.clone())
            .await
            .expect("daemon starts");
        let http_addr = running.http_addr;
        let reloader = running.reloader.clone();
        let task = tokio::spawn(running.wait());
        Daemon {
            metrics,
            reloader,
            stop,
            http_addr,
            task,
        }
    }

    /// Drains and returns how the daemon ended.
    pub async fn stop(self) -> Result<(), outboxd::RunError> {
        self.stop.cancel();
        self.task.await.unwrap()
    }

    pub fn metric(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.metrics.sum(name, filter)
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub n: i64,
    pub partition: i32,
    pub headers: HashMap<String, String>,
    pub raw_headers: HashMap<String, Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn event_id(&self) -> &str {
        &self.headers["event-id"]
    }
}

/// Reads `topic` from the beginning until at least `expected` messages arrived and no
/// more arrive for `settle`, or `timeout` passes. Runs on a blocking thread.
pub async fn consume(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    timeout: Duration,
) -> Vec<Received> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        consume_blocking(&bootstrap, &topic, expected, settle, timeout)
    })
    .await
    .unwrap()
}

fn consume_blocking(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    timeout: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut last = Instant::now();
    while Instant::now() < deadline {
        if out.len() >= expected && last.elapsed() >= settle {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let payload = m.payload().unwrap_or_default().to_vec();
                let n = serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|v| v["n"].as_i64())
                    .unwrap_or(-1);
                let mut headers = HashMap::new();
                let mut raw_headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for header in h.iter() {
                        let value = header.value.unwrap_or_default();
                        headers.insert(
                            header.key.to_owned(),
                            String::from_utf8_lossy(value).into_owned(),
                        );
                        raw_headers.insert(header.key.to_owned(), value.to_vec());
                    }
                }
                out.push(Received {
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    n,
                    partition: m.partition(),
                    headers,
                    raw_headers,
                    payload,
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Asserts that, per key, first deliveries come in increasing `n` (row) order: every copy
/// of a row arrives after some copy of every earlier row of its key.
pub fn assert_first_deliveries_in_key_order(received: &[Received]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for r in received {
        if !seen.insert(r.n) {
            continue;
        }
        if let Some(prev) = last.insert(&r.key, r.n) {
            assert!(
                prev < r.n,
                "key {}: row {} first delivered after row {}",
                r.key,
                r.n,
                prev
            );
        }
    }
}

/// Asserts that, per key, last deliveries come in increasing `n` order: what a consumer
/// that applies every copy ends with respects row order. This is the guarantee when
/// Kafka rejected an earlier row of a key but accepted a later one: the later row stays
/// in the outbox and is published again after the earlier one.
pub fn assert_last_deliveries_in_key_order(received: &[Received]) {
    let mut last_position: HashMap<i64, usize> = HashMap::new();
    for (i, r) in received.iter().enumerate() {
        last_position.insert(r.n, i);
    }
    let mut lasts: Vec<&Received> = received
        .iter()
        .enumerate()
        .filter(|(i, r)| last_position[&r.n] == *i)
        .map(|(_, r)| r)
        .collect();
    lasts.sort_by_key(|r| last_position[&r.n]);
    let mut previous: HashMap<&str, i64> = HashMap::new();
    for r in lasts {
        if let Some(prev) = previous.insert(&r.key, r.n) {
            assert!(
                prev < r.n,
                "key {}: the last copy of row {} arrived after the last copy of row {}",
                r.key,
                r.n,
                prev
            );
        }
    }
}

/// Asserts every `n` in `first..first+count` arrived exactly once.
pub fn assert_exactly_once(received: &[Received], first: i64, count: i64) {
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for r in received {
        *counts.entry(r.n).or_default() += 1;
    }
    let missing: Vec<i64> = (first..first + count)
        .filter(|n| !counts.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} rows never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let dups: Vec<i64> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        dups.is_empty(),
        "{} rows arrived more than once, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(10)]
    );
    assert_eq!(received.len() as i64, count, "unexpected extra messages");
}

/// Reads `topic` until rows `0..total` all arrived, asserting they did and that first
/// deliveries kept per-key order; returns what was read (duplicates included).
pub async fn consume_all_in_order(bootstrap: &str, topic: &str, total: i64) -> Vec<Received> {
    let received = consume(
        bootstrap,
        topic,
        total as usize,
        Duration::from_secs(1),
        Duration::from_secs(120),
    )
    .await;
    assert_at_least_once(&received, 0, total);
    assert_first_deliveries_in_key_order(&received);
    received
}

/// Asserts every `n` in `first..first+count` arrived at least once.
pub fn assert_at_least_once(received: &[Received], first: i64, count: i64) {
    let got: HashSet<i64> = received.iter().map(|r| r.n).collect();
    let missing: Vec<i64> = (first..first + count)
        .filter(|n| !got.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} rows never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// A plain HTTP/1.0 GET: `(status, body)`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sends SIGTERM to `child` and waits for it to exit within `limit`: `(exit code, stderr)`.
pub async fn terminate(child: &mut std::process::Child, limit: Duration) -> (Option<i32>, String) {
    let signalled = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < limit,
            "no exit within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    if let Some(pipe) = child.stderr.as_mut() {
        std::io::Read::read_to_string(pipe, &mut stderr).unwrap();
    }
    (status.code(), stderr)
}

/// Asserts every `n` of `0..count` arrived exactly once.
pub fn assert_each_once(received: &[Received], count: i64) {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for r in received {
        *seen.entry(r.n).or_default() += 1;
    }
    for n in 0..count {
        assert_eq!(
            seen.get(&n),
            Some(&1),
            "row {n} arrived {:?} times",
            seen.get(&n)
        );
    }
    assert_eq!(received.len() as i64, count, "nothing else arrived");
}
