//! Relay latency: a writer inserts rows at a fixed rate (rows per second, rows per
//! transaction) for a while; a consumer assigned to every partition notes when each row
//! arrives. Latency is from the writer's COMMIT returning to the consumer receiving the
//! message, so it includes the consumer's fetch (set to return at once). outboxd's own
//! `outboxd_relay_publish_delay_seconds` histogram gives commit -> delivery report, from the
//! row's `created_at`, which the writer sets to the time its INSERT ran: an upper bound, by
//! at most the time from sending the INSERT to the COMMIT returning (its 99th percentile is
//! reported as the bound's slack). The baseline is a bare
//! producer in the harness that sends at the same rate to the same broker, read by the same
//! consumer.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::PgPool;
use sqlx::{ConnectOptions, Connection};

use crate::processes::{kafka_section, Broker, Outboxd};

/// One run's settings.
pub struct Load {
    pub rows_per_sec: u32,
    pub rows_per_txn: u32,
    pub listen: bool,
    /// WAL capture instead of polling (the database needs `wal_level = logical`).
    pub wal: bool,
    /// The writer's commits wait for their WAL flush (`synchronous_commit = on`).
    pub synchronous_commit: bool,
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
    /// Commit -> delivery report: the 99th percentile's histogram bucket (its upper bound,
    /// in ms) and the share of rows acknowledged within 20 ms. From outboxd's histogram for
    /// the relay run, from each delivery report for the bare producer.
    pub ack_p99_at_most: f64,
    pub ack_within_20ms: f64,
    /// The relay runs: the 99th percentile (ms) of the time from the writer sending its
    /// INSERT (which sets `created_at`) to its COMMIT returning, by which the delivery
    /// report's latency may be overstated.
    pub slack_p99: Option<f64>,
    /// The relay runs: the bucket (upper bound, ms) the 99th percentile of each phase of a
    /// batch falls in (`outboxd_relay_batch_phase_seconds`), by phase.
    pub phases_p99: Vec<(&'static str, f64)>,
    /// The distribution's tail: `(share of rows slower, start -> arrival ms)` for shares
    /// from 1 down to one row, ten points per decade.
    pub tail: Vec<(f64, f64)>,
}

/// The bounds (seconds) the bare producer's acknowledgements are counted in: those of
/// `outboxd_relay_publish_delay_seconds` up to a minute, so that both read alike.
const ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];

/// Writer connections: transactions in flight at once.
const WRITERS: usize = 16;

const PARTITIONS: i32 = 6;

/// Runs `load` against a fresh table and topic; returns the latency of every row.
pub async fn run(pool: &PgPool, broker: &Broker, url: &str, load: &Load) -> Result<Latency> {
    let run = format!(
        "lat_{}_{}_{}",
        load.rows_per_sec,
        load.rows_per_txn,
        match (load.wal, load.listen) {
            (true, _) => "wal",
            (false, true) => "listen",
            (false, false) => "poll",
        }
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
    let slot = format!("outboxd_{table}");
    let capture = if load.wal {
        sqlx::raw_sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'; \
             DELETE FROM outboxd_relay_slots WHERE slot_name = '{slot}'; DROP PUBLICATION IF EXISTS {slot}"
        ))
        .execute(pool)
        .await?;
        "capture = \"wal\"\n[relay.tables.wal]\nsnapshot = \"new\"\n"
    } else {
        ""
    };
    let outboxd = Outboxd::start(&format!(
        "[database]\nurl = \"{url}\"\n{}[[relay.tables]]\ntable = \"{table}\"\ntopic = \"{topic}\"\nnotify_channel = \"{channel}\"\n{capture}",
        kafka_section(&broker.bootstrap(), &[])
    ))?;
    // Wait until the lane is owned (the slot read) so start-up is not measured.
    let deadline = Instant::now() + Duration::from_secs(20);
    let started = |scrape: String| {
        let owned = scrape
            .lines()
            .any(|l| l.starts_with("outboxd_relay_lanes_owned{") && l.ends_with(" 1"));
        owned && (!load.wal || scrape.contains("outboxd_relay_slot_lag_bytes{"))
    };
    while !started(outboxd.scrape().await) {
        if Instant::now() > deadline {
            bail!("outboxd did not take the lane: {}", outboxd.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let reader = Reader::start(&broker.bootstrap(), &topic);
    // Let the consumer connect before the first row.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The application's choice, not the relay's: without `synchronous_commit = off`, one
    // disk flush per commit caps the writer far below 10,000 transactions per second.
    let synchronous_commit = if load.synchronous_commit { "on" } else { "off" };
    let writer_options =
        PgConnectOptions::from_str(url)?.options([("synchronous_commit", synchronous_commit)]);
    let mut writers = Vec::with_capacity(WRITERS);
    for _ in 0..WRITERS {
        writers.push(writer_options.connect().await?);
    }
    let started = Instant::now();
    let (commits, slack) = write(writers, &table, load).await?;
    let achieved = commits.len() as f64 / started.elapsed().as_secs_f64();
    let arrivals = reader.finish(commits.len()).await;
    let scrape = outboxd.scrape().await;
    let table_label = format!("table=\"{table}\"");
    let buckets = histogram(
        &scrape,
        "outboxd_relay_publish_delay_seconds_bucket",
        &[&table_label],
    );
    let phases_p99 = ["claim", "kafka", "commit"]
        .into_iter()
        .filter_map(|phase| {
            let phase_label = format!("phase=\"{phase}\"");
            let buckets = histogram(
                &scrape,
                "outboxd_relay_batch_phase_seconds_bucket",
                &[&table_label, &phase_label],
            );
            Some((phase, ack_summary(&buckets)?.0))
        })
        .collect();
    outboxd.stop();
    if load.wal {
        sqlx::raw_sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'; \
             DELETE FROM outboxd_relay_slots WHERE slot_name = '{slot}'; DROP PUBLICATION IF EXISTS {slot}"
        ))
        .execute(pool)
        .await?;
    }
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await?;

    let arrivals = arrivals.with_context(|| run.clone())?;
    let (ack_p99_at_most, ack_within_20ms) = ack_summary(&buckets)
        .with_context(|| format!("{run}: outboxd reported no publish delays"))?;
    let mut latency = summary(
        &commits,
        &arrivals,
        achieved,
        ack_p99_at_most,
        ack_within_20ms,
    );
    latency.slack_p99 = Some(percentile_ms(slack, 0.99));
    latency.phases_p99 = phases_p99;
    Ok(latency)
}

/// The baseline for `load`: a producer in the harness with outboxd's fixed settings
/// (acks=all, idempotence, linger.ms 0) sends the same rows at the same rate to a fresh
/// topic; latency is from each send to its arrival, and to its delivery report.
pub async fn bare(broker: &Broker, load: &Load) -> Result<Latency> {
    let topic = format!(
        "bench.lat_bare_{}_{}.{}",
        load.rows_per_sec,
        load.rows_per_txn,
        std::process::id()
    );
    broker.create_topic(&topic, PARTITIONS).await?;
    let reader = Reader::start(&broker.bootstrap(), &topic);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()?;
    // Let the consumer and the producer connect before the first row.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let txns_per_sec = (load.rows_per_sec / load.rows_per_txn).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(txns_per_sec)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = u64::from(txns_per_sec) * load.secs * u64::from(load.rows_per_txn);
    let mut sends = Vec::with_capacity(total as usize);
    let mut reports = tokio::task::JoinSet::new();
    let started = Instant::now();
    for n in 0..total as i64 {
        if n % i64::from(load.rows_per_txn) == 0 {
            tick.tick().await;
        }
        let payload = format!("{{\"n\": {n}, \"note\": \"{}\"}}", "x".repeat(150));
        let key = format!("k{}", n % 1000);
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("bare produce: {e}"))?;
        let sent = Instant::now();
        sends.push((n, sent));
        reports.spawn(async move {
            let acked = delivery.await.is_ok_and(|r| r.is_ok());
            (acked, sent.elapsed())
        });
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let mut buckets = vec![(f64::INFINITY, 0.0); 1];
    buckets.extend(ACK_BUCKETS.iter().map(|le| (*le, 0.0)));
    while let Some(report) = reports.join_next().await {
        let (acked, took) = report?;
        if !acked {
            bail!("bare producer: a message was not acknowledged");
        }
        for (le, count) in &mut buckets {
            if took.as_secs_f64() <= *le {
                *count += 1.0;
            }
        }
    }
    let arrivals = reader.finish(sends.len()).await.context("bare producer")?;
    let (ack_p99_at_most, ack_within_20ms) =
        ack_summary(&buckets).context("bare producer: no reports")?;
    Ok(summary(
        &sends,
        &arrivals,
        achieved,
        ack_p99_at_most,
        ack_within_20ms,
    ))
}

/// Percentiles of start -> arrival over `starts`.
fn summary(
    starts: &[(i64, Instant)],
    arrivals: &HashMap<i64, Instant>,
    achieved: f64,
    ack_p99_at_most: f64,
    ack_within_20ms: f64,
) -> Latency {
    let mut ms: Vec<f64> = starts
        .iter()
        .map(|(n, start)| arrivals[n].saturating_duration_since(*start).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| at(&ms, q);
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: *ms.last().unwrap_or(&0.0),
        rows: ms.len(),
        achieved,
        ack_p99_at_most,
        ack_within_20ms,
        slack_p99: None,
        phases_p99: Vec::new(),
        tail: (0..)
            .map(|k| 10f64.powf(-f64::from(k) / 10.0))
            .take_while(|share| *share * ms.len() as f64 >= 1.0)
            .map(|share| (share, at(1.0 - share)))
            .collect(),
    }
}

/// The value at quantile `q` of `sorted`.
fn at(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Quantile `q` of `times`, in milliseconds.
fn percentile_ms(times: Vec<Duration>, q: f64) -> f64 {
    let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    at(&ms, q)
}

/// The cumulative buckets `(le, count)` of histogram `name` in a scrape, on the lines that
/// carry every one of `labels` (`name="value"`).
fn histogram(scrape: &str, name: &str, labels: &[&str]) -> Vec<(f64, f64)> {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| {
            // `le` comes last (`table="` ends in `le="` too).
            let le = l.rsplit(",le=\"").next()?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// From cumulative buckets: the upper bound (ms) of the bucket the 99th percentile falls in,
/// and the share counted within 20 ms. None without observations.
fn ack_summary(buckets: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let p99 = buckets.iter().find(|(_, n)| *n >= 0.99 * total)?.0 * 1000.0;
    let within = buckets
        .iter()
        .find(|(le, _)| (*le - 0.02).abs() < 1e-9)
        .map_or(f64::NAN, |(_, n)| n / total);
    Some((p99, within))
}

/// A transaction's first row, its row count, when its COMMIT returned and how long after
/// sending its INSERT.
type Committed = (i64, i64, Instant, Duration);

/// Inserts `rows_per_txn` rows per transaction at `rows_per_sec` for `secs`, on
/// `connections` (commits need not wait for each other; when all are busy the writer
/// waits, and the achieved rate shows it); returns each row's commit time, and for each
/// transaction the time from sending its INSERT to its COMMIT returning.
///
/// Each transaction is one statement on its own (autocommit): one round trip, as an
/// application that writes only the outbox row would do. An explicit transaction from a
/// sqlx pool took six (the pool's pings when a connection is taken and given back,
/// `BEGIN`, `SET LOCAL`, the `INSERT`, `COMMIT`), all of them load on the database the
/// relay shares, and on a busy 2-core machine the time from its INSERT to its COMMIT
/// returning (p99 3.6-17 ms) was counted by the delivery report's latency although the
/// row was not yet committed. Each row's `created_at` is the time its INSERT ran
/// (`clock_timestamp()`), not the statement's start (`now()`, the column's default).
async fn write(
    connections: Vec<PgConnection>,
    table: &str,
    load: &Load,
) -> Result<(Vec<(i64, Instant)>, Vec<Duration>)> {
    let txns_per_sec = (load.rows_per_sec / load.rows_per_txn).max(1);
    let period = Duration::from_secs_f64(1.0 / f64::from(txns_per_sec));
    let total_txns = u64::from(txns_per_sec) * load.secs;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let sql = format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload, created_at) \
         SELECT 'account', 'k' || (g % 1000), 'Latency', jsonb_build_object('n', g, 'note', repeat('x', 150)), clock_timestamp() \
         FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) g"
    );
    let mut tasks = tokio::task::JoinSet::new();
    // The idle connections: a transaction takes one and gives it back when it committed.
    let (idle, mut next_idle) = tokio::sync::mpsc::unbounded_channel();
    for connection in connections {
        idle.send(connection)?;
    }
    let mut commits = Vec::with_capacity((total_txns * u64::from(load.rows_per_txn)) as usize);
    let mut slack = Vec::with_capacity(total_txns as usize);
    let mut record = |done: Result<Result<Committed, sqlx::Error>, tokio::task::JoinError>| {
        let (first, rows, at, took) = done??;
        commits.extend((first..first + rows).map(|n| (n, at)));
        slack.push(took);
        Ok::<_, anyhow::Error>(())
    };
    for t in 0..total_txns {
        tick.tick().await;
        // When every connection is busy, the next transaction to end gives its one back.
        let mut connection = loop {
            if let Ok(connection) = next_idle.try_recv() {
                break connection;
            }
            let done = tasks
                .join_next()
                .await
                .context("no writer connection left")?;
            record(done)?;
        };
        let first = (t * u64::from(load.rows_per_txn)) as i64;
        let (idle, sql, rows) = (idle.clone(), sql.clone(), i64::from(load.rows_per_txn));
        tasks.spawn(async move {
            let inserting = Instant::now();
            sqlx::query(&sql)
                .bind(first)
                .bind(rows)
                .execute(&mut connection)
                .await?;
            let at = Instant::now();
            // The receiver lives until every transaction is joined.
            let _ = idle.send(connection);
            Ok((first, rows, at, at - inserting))
        });
        while let Some(done) = tasks.try_join_next() {
            record(done)?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(done)?;
    }
    drop(idle);
    while let Some(connection) = next_idle.recv().await {
        connection.close().await?;
    }
    Ok((commits, slack))
}

/// A consumer on a thread of its own, noting when each row (`n` in the payload) arrives.
struct Reader {
    arrivals: Arc<Mutex<HashMap<i64, Instant>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Reader {
    fn start(bootstrap: &str, topic: &str) -> Reader {
        let arrivals: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
            let (arrivals, stop) = (arrivals.clone(), stop.clone());
            std::thread::spawn(move || read(&bootstrap, &topic, &arrivals, &stop))
        };
        Reader {
            arrivals,
            stop,
            thread,
        }
    }

    /// Waits up to 30 s for `expected` arrivals, stops the consumer and returns them; fails
    /// when fewer arrived.
    async fn finish(self, expected: usize) -> Result<HashMap<i64, Instant>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.arrivals.lock().unwrap().len() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("reader thread")?;
        let arrivals = std::mem::take(&mut *self.arrivals.lock().unwrap());
        if arrivals.len() < expected {
            bail!("{} of {expected} rows arrived", arrivals.len());
        }
        Ok(arrivals)
    }
}

/// Reads `topic` from the beginning on every partition until `stop`, noting each row's arrival.
fn read(
    bootstrap: &str,
    topic: &str,
    arrivals: &Mutex<HashMap<i64, Instant>>,
    stop: &AtomicBool,
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
    while !stop.load(Ordering::Relaxed) {
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
