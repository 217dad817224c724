//! Relay latency: a writer inserts rows at a fixed rate (rows per second, rows per
//! transaction) for a while; a consumer assigned to every partition notes when each row
//! arrives. Latency is from the writer's COMMIT returning to the consumer receiving the
//! message, so it includes the consumer's fetch (set to return at once): an upper bound of
//! commit -> delivery report.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::processes::{kafka_section, Broker, Outboxd};

/// One run's settings.
pub struct Load {
    pub rows_per_sec: u32,
    pub rows_per_txn: u32,
    pub listen: bool,
    pub secs: u64,
}

/// Latency percentiles in milliseconds, how many rows were measured and the insert rate
/// the writer achieved.
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub rows: usize,
    pub achieved: f64,
}

/// Writer connections: transactions in flight at once.
const WRITERS: usize = 16;

const PARTITIONS: i32 = 6;

/// Runs `load` against a fresh table and topic; returns the latency of every row.
pub async fn run(pool: &PgPool, broker: &Broker, url: &str, load: &Load) -> Result<Latency> {
    let run = format!(
        "lat_{}_{}_{}",
        load.rows_per_sec,
        load.rows_per_txn,
        if load.listen { "listen" } else { "poll" }
    );
    let table = format!("bench_{run}");
    let topic = format!("bench.{run}.{}", std::process::id());
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
         CREATE TRIGGER {table}_notify AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION outboxd_notify('{table}');"
    ))
    .execute(pool)
    .await?;
    broker.create_topic(&topic, PARTITIONS).await?;
    let channel = if load.listen { table.as_str() } else { "" };
    let outboxd = Outboxd::start(&format!(
        "[database]\nurl = \"{url}\"\n{}[[relay.tables]]\ntable = \"{table}\"\ntopic = \"{topic}\"\nnotify_channel = \"{channel}\"\n",
        kafka_section(&broker.bootstrap(), &[])
    ))?;
    // Wait until the lane is owned so start-up is not measured.
    let deadline = Instant::now() + Duration::from_secs(20);
    while outboxd.metric("outboxd_relay_lanes_owned").await < 1.0 {
        if Instant::now() > deadline {
            bail!("outboxd did not take the lane: {}", outboxd.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let arrivals: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (bootstrap, topic) = (broker.bootstrap(), topic.clone());
        let (arrivals, stop) = (arrivals.clone(), stop.clone());
        std::thread::spawn(move || read(&bootstrap, &topic, &arrivals, &stop))
    };
    // Let the consumer connect before the first row.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let writers = sqlx::postgres::PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .connect(url)
        .await?;
    let started = Instant::now();
    let commits = write(&writers, &table, load).await?;
    let achieved = commits.len() as f64 / started.elapsed().as_secs_f64();
    writers.close().await;
    let expected = commits.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().unwrap().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().expect("reader thread")?;
    outboxd.stop();
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await?;

    let arrivals = arrivals.lock().unwrap();
    if arrivals.len() < expected {
        bail!("{run}: {} of {expected} rows arrived", arrivals.len());
    }
    let mut ms: Vec<f64> = commits
        .iter()
        .map(|(n, committed)| {
            arrivals[n]
                .saturating_duration_since(*committed)
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Ok(Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: *ms.last().unwrap_or(&0.0),
        rows: ms.len(),
        achieved,
    })
}

/// Inserts `rows_per_txn` rows per transaction at `rows_per_sec` for `secs`, on up to
/// `WRITERS` connections at once (commits need not wait for each other; when all are busy
/// the writer waits, and the achieved rate shows it); returns each row's commit time.
async fn write(pool: &PgPool, table: &str, load: &Load) -> Result<Vec<(i64, Instant)>> {
    let txns_per_sec = (load.rows_per_sec / load.rows_per_txn).max(1);
    let period = Duration::from_secs_f64(1.0 / f64::from(txns_per_sec));
    let total_txns = u64::from(txns_per_sec) * load.secs;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let sql = format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'account', 'k' || (g % 1000), 'Latency', jsonb_build_object('n', g, 'note', repeat('x', 150)) \
         FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) g"
    );
    let mut tasks = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(WRITERS));
    let mut commits = Vec::with_capacity((total_txns * u64::from(load.rows_per_txn)) as usize);
    for t in 0..total_txns {
        tick.tick().await;
        let slot = slots.clone().acquire_owned().await?;
        let first = (t * u64::from(load.rows_per_txn)) as i64;
        let (pool, sql, rows) = (pool.clone(), sql.clone(), i64::from(load.rows_per_txn));
        tasks.spawn(async move {
            let _slot = slot;
            let mut tx = pool.begin().await?;
            // The application's choice, not the relay's: without it one disk flush per
            // commit caps the writer far below 10,000 transactions per second.
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&sql)
                .bind(first)
                .bind(rows)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>((first, rows, Instant::now()))
        });
        while let Some(done) = tasks.try_join_next() {
            let (first, rows, at) = done??;
            commits.extend((first..first + rows).map(|n| (n, at)));
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (first, rows, at) = done??;
        commits.extend((first..first + rows).map(|n| (n, at)));
    }
    Ok(commits)
}

/// Reads `topic` from its end on every partition until `stop`, noting each row's arrival.
fn read(
    bootstrap: &str,
    topic: &str,
    arrivals: &Mutex<HashMap<i64, Instant>>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-latency-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let message = message?;
        let at = Instant::now();
        let n = message
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| v["n"].as_i64());
        if let Some(n) = n {
            arrivals.lock().unwrap().entry(n).or_insert(at);
        }
    }
    Ok(())
}
