//! The benchmark harness: `scripts/bench.sh [--write] [--broker tansu|mock] [--rows N]
//! [--messages N]`. Every scenario runs its baseline in the same run and prints the ratio;
//! outboxd runs as a separate process (the release binary), the broker as another (Tansu)
//! or inside this harness (librdkafka's mock cluster).
//!
//! 1. relay drain: N backlog rows (about 200-byte JSON payloads, 1,000 keys), lanes 1 and 4,
//!    and lanes 1 without `prefetch`, each against the raw SQL claim rate on one connection
//!    measured just before it; each drain gets a fresh broker (Tansu slows down as its
//!    in-memory log grows);
//! 2. relay latency: rows inserted at 1,000/s and 10,000/s, 1 and 10 rows per
//!    transaction, with LISTEN and with polling only; p50/p99/max from commit to arrival
//!    at a consumer, and commit to delivery report from outboxd's publish-delay histogram;
//!    baseline: a bare producer sending at the same rate to the same broker;
//! 3. consumer dispatch: M messages on 6 partitions through the log, http and sql handlers,
//!    against bare rdkafka consumers that store each offset (with librdkafka's default
//!    queues and with outboxd's queue limits; the faster one is the baseline);
//! 4. memory: outboxd's peak RSS during the drains and the dispatches, and idle RSS;
//! 5. slow downstream (`slow`): an endpoint that answers after 10 ms; a backlog of 20,000
//!    messages (1,000 keys, 6 partitions) in key order against partition order, and the
//!    delay of healthy messages from produce to delivery at 400 msgs/s while 1 % fail
//!    three times first. The dispatch runs of 3. run in both orders too.
//! 6. event stores (`store`, only when named in `--only`): the seed's `events` table in
//!    cursor mode with a transaction-id column at 100,000 and 2,000,000 rows and without
//!    it at 100,000, against a delete-mode drain of 100,000 rows of the reference table;
//!    three rounds, alternated (`store.rs`);
//! 7. WAL capture (`wal`, only when named in `--only`): the event store read from a
//!    replication slot at 100,000 and 2,000,000 rows, stream and initial snapshot, against
//!    a delete-mode drain on the same server, and latency at 1,000 rows/s against LISTEN
//!    (`wal.rs`; needs $LOGICAL_DATABASE_URL with `wal_level = logical`);
//! 8. a read model (`sqlbatch`, only when named in `--only`): the account projection
//!    through the `sql` handler in key order, one transaction per event against batches of
//!    100, and a bare client writing the same statements 100 per transaction; three rounds,
//!    alternated (`projection.rs`).
//!
//! `--only relay,latency,dispatch,slow,store,wal,sqlbatch` runs a subset, `--drains 1,1-noprefetch,4` a subset of
//! the relay drains, `--handlers log,http,http-batch,sql` a subset of the dispatch handlers
//! (`http-batch`: the http handler with `batch_size = 100`), `--loads
//! 1000x1,1000x10-poll` a subset of the latency loads; `--latency-secs N` (default 30) sets the
//! length of each latency run; `--batch-size N` sets the relay drains' `batch_size`;
//! `--kafka-option key=value` (repeatable) adds a librdkafka property to every outboxd;
//! `--broker-rtt-ms N` makes the mock broker answer each request N ms late, like a remote
//! cluster; `--db-rtt-ms N` puts a proxy that holds every request N ms (rounded up to
//! tokio's millisecond timer) between the relay drains (and their raw claims) and
//! PostgreSQL, like a database on another host.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod charts;
mod delay;
mod dispatch;
mod drain;
mod latency;
mod processes;
mod projection;
mod slow;
mod store;
mod wal;

use anyhow::{bail, Context, Result};
use dispatch::{bare_consumer, dispatch, http_sink, produce, OUTBOXD_QUEUES};
use drain::{fill, raw_claim, relay_drain, Drain};
use processes::{kafka_section, postgres_cpu_seconds, tansu_binary, Broker, Outboxd};
use sqlx::Row;

struct Args {
    write: bool,
    broker: String,
    rows: i64,
    messages: Option<i64>,
    only: Vec<String>,
    /// Handlers of the dispatch scenario to run; empty: all.
    handlers: Vec<String>,
    /// Relay drains to run (`1`, `1-noprefetch`, `4`); empty: all.
    drains: Vec<String>,
    latency_secs: u64,
    /// Latency loads to run (`1000x1`, `1000x10-poll`, ...); empty: all.
    loads: Vec<String>,
    /// `batch_size` of the relay drains; None: outboxd's default.
    batch_size: Option<u32>,
    /// Extra `[kafka.options]` of every outboxd started.
    kafka_options: Vec<(String, String)>,
    /// Delay the mock broker adds to each request (a remote cluster's round trip).
    broker_rtt: Duration,
    /// Delay added to every request to the database in the relay drains and their raw
    /// claims (a database on another host).
    db_rtt: Duration,
    /// `fetch.wait.max.ms` of every consumer, the baselines' and outboxd's.
    fetch_wait_ms: u32,
}

impl Args {
    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }

    /// Whether the drain named `name` ("lanes = 1", "lanes = 1, prefetch off", "lanes = 4")
    /// runs: `--drains 1,1-noprefetch,4` picks some.
    fn runs_drain(&self, name: &str) -> bool {
        let short = name
            .trim_start_matches("lanes = ")
            .replace(", prefetch off", "-noprefetch");
        self.drains.is_empty() || self.drains.contains(&short)
    }

    /// Whether the latency load of `rate` rows/s, `per_txn` per transaction, runs:
    /// `--loads 1000x1,10000x10-poll` picks some.
    fn runs_load(&self, rate: u32, per_txn: u32, listen: bool) -> bool {
        let short = format!("{rate}x{per_txn}{}", if listen { "" } else { "-poll" });
        self.loads.is_empty() || self.loads.contains(&short)
    }

    fn runs_handler(&self, handler: &str) -> bool {
        self.handlers.is_empty() || self.handlers.iter().any(|s| s == handler)
    }
}

/// A comma-separated option value as its items.
fn list(value: Option<String>, usage: &'static str) -> Result<Vec<String>> {
    Ok(value
        .context(usage)?
        .split(',')
        .map(str::to_owned)
        .collect())
}

fn args() -> Result<Args> {
    let mut a = Args {
        write: false,
        broker: String::new(),
        rows: 300_000,
        messages: None,
        only: Vec::new(),
        handlers: Vec::new(),
        drains: Vec::new(),
        latency_secs: 30,
        loads: Vec::new(),
        batch_size: None,
        kafka_options: Vec::new(),
        broker_rtt: Duration::ZERO,
        db_rtt: Duration::ZERO,
        fetch_wait_ms: 1,
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--write" => a.write = true,
            "--broker" => a.broker = it.next().context("--broker tansu|mock")?,
            "--rows" => a.rows = it.next().context("--rows N")?.parse()?,
            "--messages" => a.messages = Some(it.next().context("--messages N")?.parse()?),
            "--only" => {
                a.only = list(
                    it.next(),
                    "--only relay,latency,dispatch,slow,store,wal,sqlbatch",
                )?
            }
            "--handlers" => a.handlers = list(it.next(), "--handlers log,http,http-batch,sql")?,
            "--drains" => a.drains = list(it.next(), "--drains 1,1-noprefetch,4")?,
            "--loads" => a.loads = list(it.next(), "--loads 1000x1,1000x10-poll,...")?,
            "--latency-secs" => a.latency_secs = it.next().context("--latency-secs N")?.parse()?,
            "--batch-size" => a.batch_size = Some(it.next().context("--batch-size N")?.parse()?),
            "--kafka-option" => {
                let option = it.next().context("--kafka-option key=value")?;
                let (key, value) = option.split_once('=').context("--kafka-option key=value")?;
                a.kafka_options.push((key.to_owned(), value.to_owned()));
            }
            "--db-rtt-ms" => {
                let ms = it.next().context("--db-rtt-ms N")?.parse()?;
                a.db_rtt = Duration::from_millis(ms);
            }
            "--fetch-wait-ms" => {
                a.fetch_wait_ms = it.next().context("--fetch-wait-ms N")?.parse()?;
            }
            "--broker-rtt-ms" => {
                let ms = it.next().context("--broker-rtt-ms N")?.parse()?;
                a.broker_rtt = Duration::from_millis(ms);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.broker.is_empty() {
        a.broker = if tansu_binary().is_some() {
            "tansu".into()
        } else {
            "mock".into()
        };
    }
    Ok(a)
}

struct Line {
    scenario: String,
    result: String,
    baseline: String,
    ratio: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    processes::set_kafka_options(a.kafka_options.clone());
    processes::set_broker_rtt(a.broker_rtt);
    processes::set_fetch_wait(a.fetch_wait_ms);
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    outboxd::db::migrator(outboxd::db::Backend::Postgres)
        .run(&pool)
        .await?;
    let broker = Broker::start(&a.broker)?;
    let messages = a
        .messages
        .unwrap_or(if a.broker == "mock" { 100_000 } else { 500_000 });
    let mut lines = Vec::new();
    let mut results = charts::Results::default();
    let mut rss: BTreeMap<String, f64> = BTreeMap::new();
    let table = "bench_outbox";
    broker.create_topic("bench.BenchEvent", 6).await?;

    // Idle memory.
    fill(&pool, table, 0).await?;
    {
        let idle = Outboxd::start(&format!("[database]\nurl = \"{url}\"\n{}[[relay.tables]]\ntable = \"{table}\"\ntopic = \"bench.{{event_type}}\"\n", kafka_section(&broker.bootstrap(), &[])))?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        rss.insert("idle (relay, empty table)".into(), idle.rss().1);
        idle.stop();
    }

    // 1. Relay drain. Each drain gets its own raw claim just before it, on a table filled
    // the same way, so a drift of the machine between them moves both.
    if a.runs("relay") {
        let (claim_url, claim_pool) = if a.db_rtt.is_zero() {
            (url.clone(), pool.clone())
        } else {
            let options: sqlx::postgres::PgConnectOptions = url.parse()?;
            let direct = format!("{}:{}", options.get_host(), options.get_port());
            if !url.contains(&direct) {
                bail!("--db-rtt-ms needs DATABASE_URL with host:port, got {url}");
            }
            let target = tokio::net::lookup_host(&direct)
                .await?
                .next()
                .context("database host")?;
            let proxy = delay::proxy(target, a.db_rtt).await?;
            let claim_url = url.replacen(&direct, &proxy.to_string(), 1);
            let claim_pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&claim_url)
                .await?;
            (claim_url, claim_pool)
        };
        for (lanes, prefetch) in [(1, true), (1, false), (4, true)] {
            let name = format!(
                "lanes = {lanes}{}",
                if prefetch { "" } else { ", prefetch off" }
            );
            if !a.runs_drain(&name) {
                continue;
            }
            fill(&pool, table, a.rows).await?;
            let pg_before = postgres_cpu_seconds();
            let raw = raw_claim(&claim_pool, table).await?;
            eprintln!(
                "raw claim: {raw:.0} rows/s; postgres CPU s per 100k rows {:.2}",
                (postgres_cpu_seconds() - pg_before) * 100_000.0 / a.rows as f64
            );
            fill(&pool, table, a.rows).await?;
            let drain_broker = Broker::start(&a.broker)?;
            drain_broker.create_topic("bench.BenchEvent", 6).await?;
            let drain = Drain {
                lanes,
                prefetch,
                batch_size: a.batch_size,
            };
            let (rate, peak) =
                relay_drain(&pool, &drain_broker, table, a.rows, &claim_url, &drain).await?;
            eprintln!("relay {name}: {rate:.0} rows/s, peak RSS {peak:.1} MiB");
            rss.insert(format!("relay drain, {name} (peak)"), peak);
            results.drains.push((name.clone(), rate, raw));
            lines.push(Line {
                scenario: format!("relay drain, {} rows, {name}", a.rows),
                result: format!("{rate:.0} rows/s"),
                baseline: format!("raw SQL claim {raw:.0} rows/s"),
                ratio: format!("{:.2}", rate / raw),
            });
        }
    }

    // WAL capture (only when asked for: it fills 2,000,000 rows twice a round, on the
    // server with wal_level = logical).
    if a.only.iter().any(|s| s == "wal") {
        let (rates, wal_latencies) = wal::run(&a.broker, 3, a.latency_secs).await?;
        for (name, rates) in rates {
            let text: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            lines.push(Line {
                scenario: format!("event store: {name}"),
                result: format!("{} rows/s", text.join(" / ")),
                baseline: "the delete-mode drain above it".into(),
                ratio: "-".into(),
            });
        }
        for (what, l) in wal_latencies {
            eprintln!("{}", latency_line(&what, &l));
        }
    }

    // Event stores in cursor mode (only when asked for: it fills 2,000,000 rows three
    // times).
    if a.only.iter().any(|s| s == "store") {
        for (name, rates) in store::run(&pool, &url, &a.broker, 3).await? {
            let text: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            lines.push(Line {
                scenario: format!("event store: {name}"),
                result: format!("{} rows/s", text.join(" / ")),
                baseline: "the delete-mode drain above it".into(),
                ratio: "-".into(),
            });
        }
    }

    // 2. Relay latency.
    let mut latencies = Vec::new();
    if a.runs("latency") {
        // A fresh broker: Tansu's in-memory log of the drains above slows it down.
        let latency_broker = Broker::start(&a.broker)?;
        for (rows_per_sec, rows_per_txn, listen) in [
            (1000, 1, true),
            (1000, 10, true),
            (10_000, 1, true),
            (10_000, 10, true),
            (1000, 1, false),
            (1000, 10, false),
            (10_000, 1, false),
            (10_000, 10, false),
        ] {
            if !a.runs_load(rows_per_sec, rows_per_txn, listen) {
                continue;
            }
            let load = latency::Load {
                rows_per_sec,
                rows_per_txn,
                listen,
                wal: false,
                synchronous_commit: false,
                secs: a.latency_secs,
            };
            let l = latency::run(&pool, &latency_broker, &url, &load).await?;
            let how = if listen {
                "LISTEN"
            } else {
                "polling (poll_interval 500ms)"
            };
            let what = format!("{rows_per_sec} rows/s, {rows_per_txn} per transaction, {how}");
            latencies.push(latency_line(&what, &l));
            if listen {
                let name = format!("outboxd, {rows_per_sec} rows/s, {rows_per_txn} per txn");
                results.curves.push((name, l.tail.clone()));
            }
            // The baseline once per rate: a bare producer does not listen or poll.
            if listen {
                let b = latency::bare(&latency_broker, &load).await?;
                let what = format!(
                    "baseline: bare producer, {rows_per_sec} messages/s, {rows_per_txn} at a time"
                );
                latencies.push(latency_line(&what, &b));
                let name = format!("bare producer, {rows_per_sec}/s, {rows_per_txn} at a time");
                results.curves.push((name, b.tail.clone()));
            }
        }
    }

    // 3. Consumer dispatch.
    if a.runs("dispatch") {
        let topic = format!("bench.dispatch.{}", std::process::id());
        broker.create_topic(&topic, 6).await?;
        produce(&broker, &topic, messages).await?;
        // Three bare consumers: librdkafka's default queues; the same without their 1 s
        // pause (`fetch.queue.backoff.ms`) after a fetch fills the queue past its limits,
        // which stalls that baseline in some runs and not in others; and outboxd's
        // per-partition queue limits (which decide how the broker is fetched from). The
        // fastest one is the baseline.
        let mut bares = Vec::new();
        for (name, queues) in [
            ("defaults", &[][..]),
            (
                "defaults-no-backoff",
                &[("fetch.queue.backoff.ms", "10")][..],
            ),
            ("outboxd-queues", OUTBOXD_QUEUES),
        ] {
            let (bootstrap, t, m) = (broker.bootstrap(), topic.clone(), messages);
            let options = [&broker.consumer_options()[..], queues].concat();
            let pid = broker.pid();
            let rate = tokio::task::spawn_blocking(move || {
                bare_consumer(name, pid, &bootstrap, &options, &t, m)
            })
            .await??;
            eprintln!("bare consumer ({name}): {rate:.0} msgs/s");
            bares.push((name, rate));
        }
        let (bare_name, bare) = bares
            .iter()
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("three bare runs");
        results.bare = Some(bare);
        sqlx::raw_sql("DROP TABLE IF EXISTS bench_effects; CREATE TABLE bench_effects (n bigint)")
            .execute(&pool)
            .await?;
        let sink = http_sink().await?;
        for (name, handler) in [
        ("log", "kind = \"log\"".to_owned()),
        ("http", format!("kind = \"http\"\nurl = \"{sink}\"")),
        ("http-batch", format!("kind = \"http\"\nurl = \"{sink}\"\nbatch_size = 100")),
        ("sql", "kind = \"sql\"\nstatement = \"INSERT INTO bench_effects (n) VALUES ($1)\"\nparams = [\"/n\"]".to_owned()),
    ] {
        if !a.runs_handler(name) {
            continue;
        }
        for ordering in ["partition", "key"] {
            let (rate, peak) =
                dispatch(&broker, &topic, messages, name, &handler, &url, ordering).await?;
            eprintln!("dispatch {name} ({ordering}): {rate:.0} msgs/s, peak RSS {peak:.1} MiB");
            rss.insert(format!("dispatch, {name}, ordering {ordering} (peak)"), peak);
            results.dispatches.push((name.into(), ordering.into(), rate));
            lines.push(Line {
                scenario: format!(
                    "consumer dispatch, {messages} msgs / 6 partitions, {name} handler, ordering {ordering}"
                ),
                result: format!("{rate:.0} msgs/s"),
                baseline: format!("bare consumer ({bare_name}) {bare:.0} msgs/s"),
                ratio: format!("{:.2}", rate / bare),
            });
        }
    }
    }

    // A read model built by the sql handler (only when asked for).
    if a.only.iter().any(|s| s == "sqlbatch") {
        let topic = format!("bench.projection.{}", std::process::id());
        broker.create_topic(&topic, 6).await?;
        produce(&broker, &topic, messages).await?;
        for (name, rates) in projection::run(&pool, &broker, &url, &topic, messages).await? {
            let text: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            lines.push(Line {
                scenario: format!("read model, {messages} msgs / 6 partitions / 1000 keys: {name}"),
                result: format!("{} msgs/s", text.join(" / ")),
                baseline: "the bare client below".into(),
                ratio: "-".into(),
            });
        }
    }

    // 4. A slow downstream (10 ms per call): a backlog's throughput, and the delay of
    // healthy messages while 1 % fail three times first; key order against partition
    // order, each the other's baseline.
    if a.runs("slow") {
        let n = a.messages.unwrap_or(20_000).min(20_000);
        let mut rates = HashMap::new();
        for ordering in ["partition", "key"] {
            let (rate, peak) = slow::backlog(&broker, &url, ordering, n).await?;
            eprintln!("slow downstream ({ordering}): {rate:.0} msgs/s, peak RSS {peak:.1} MiB");
            rss.insert(format!("slow downstream, ordering {ordering} (peak)"), peak);
            rates.insert(ordering, rate);
            results.slow.push((ordering.into(), rate));
        }
        lines.push(Line {
            scenario: format!("consumer, 10 ms endpoint, {n} msgs / 6 partitions / 1000 keys, max_in_flight 256, ordering key"),
            result: format!("{:.0} msgs/s", rates["key"]),
            baseline: format!("ordering partition {:.0} msgs/s", rates["partition"]),
            ratio: format!("{:.1}", rates["key"] / rates["partition"]),
        });
        let mut p99 = HashMap::new();
        for ordering in ["partition", "key"] {
            let (p50, p, max) = slow::head_of_line(&broker, &url, ordering, 400, 15).await?;
            eprintln!("head-of-line ({ordering}): healthy p50 {p50:.0} ms, p99 {p:.0} ms, max {max:.0} ms");
            p99.insert(ordering, (p50, p, max));
        }
        let (k, p) = (p99["key"], p99["partition"]);
        lines.push(Line {
            scenario: "consumer, 10 ms endpoint, 400 msgs/s for 15 s, 1 % failing 3 times first: healthy messages' delay produce to delivery, ordering key".into(),
            result: format!("p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", k.0, k.1, k.2),
            baseline: format!("ordering partition: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", p.0, p.1, p.2),
            ratio: format!("{:.2}", k.1 / p.1),
        });
    }
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS bench_effects"
    ))
    .execute(&pool)
    .await?;

    let mut table_md =
        String::from("| scenario | outboxd | baseline (same run) | ratio |\n|---|---|---|---|\n");
    for l in &lines {
        table_md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            l.scenario, l.result, l.baseline, l.ratio
        ));
    }
    if !latencies.is_empty() {
        table_md.push_str(&format!(
            "\n| relay latency ({} s each) | written rows/s | rows | to arrival p50 ms | p99 ms | max ms | to delivery report: p99 at most, ms | within 20 ms | writer INSERT to COMMIT p99 ms |\n|---|---|---|---|---|---|---|---|---|\n",
            a.latency_secs
        ));
        for l in &latencies {
            table_md.push_str(l);
        }
    }
    table_md.push_str("\n| outboxd resident memory | MiB |\n|---|---|\n");
    for (what, mib) in &rss {
        table_md.push_str(&format!("| {what} | {mib:.1} |\n"));
    }
    println!("{table_md}");
    if a.write {
        let pg: String = sqlx::query("SELECT version()")
            .fetch_one(&pool)
            .await?
            .get(0);
        let machine = format!(
            "{} cores, {:.1} GiB, {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| m
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok()))
                .unwrap_or(0.0)
                / 1024.0
                / 1024.0,
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(
                    |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                        .split(':')
                        .nth(1)
                        .unwrap_or("")
                        .trim()
                        .to_owned())
                )
                .unwrap_or_default()
        );
        let broker_desc = match &broker {
            Broker::Tansu { .. } => format!(
                "Tansu (separate process, memory storage; every consumer of it, baselines and \
                 outboxd alike, with `fetch.wait.max.ms = {}`)",
                a.fetch_wait_ms
            ),
            Broker::Mock(_) => {
                format!(
                    "librdkafka mock cluster (in the harness process; outboxd is separate; \
                     every consumer of it with `fetch.wait.max.ms = {}`)",
                    a.fetch_wait_ms
                )
            }
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let charts_md = charts::write(&root.join("docs"), &results)?;
        let doc = format!(
            "# Benchmarks\n\nMade by `scripts/bench.sh --write` on {}.\n\n- machine: {machine}\n- outboxd {} (release build), {}\n- PostgreSQL: {pg}\n- broker: {broker_desc}\n- settings: default relay settings (batch_size 1000, prefetch on, linger.ms 0), drains polling (no LISTEN); consumer defaults (max_in_flight 16); log level warn\n\nEvery scenario runs its baseline in the same run (each relay drain right after a raw claim of its own, each on a freshly filled table after a `CHECKPOINT`); compare ratios rather than absolute numbers between runs. Relay drain rates count from the first published row to the last (read from outboxd's `/metrics` every 20 ms); dispatch rates likewise from the first handled message to the last; the raw claim and the bare consumer from their first row or message to their last. Latency to arrival is from the writer's COMMIT returning to a consumer (assigned to every partition, `fetch.wait.max.ms=1`) receiving the row; latency to the delivery report is outboxd's `outboxd_relay_publish_delay_seconds` histogram (from the row's `created_at`, which the writer, one autocommit INSERT statement per transaction, sets to the time its INSERT ran, so an upper bound; by how much at most is the last column, the 99th percentile of the time from sending the INSERT to the COMMIT returning), given as the bucket the 99th percentile falls in and the share within 20 ms. The latency baseline is a bare producer with outboxd's fixed settings sending at the same rate, timed from each send.\n\n{table_md}\n{charts_md}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            env!("CARGO_PKG_VERSION"),
            rustc_version(),
        );
        let path = root.join("BENCHMARKS.md");
        let previous = std::fs::read_to_string(&path).unwrap_or_default();
        let history = previous
            .split_once("\n## Notes\n")
            .map(|(_, notes)| format!("\n## Notes\n{notes}"))
            .unwrap_or_default();
        std::fs::write(&path, format!("{doc}{history}"))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn rustc_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// One latency table row, also printed as it is measured.
fn latency_line(what: &str, l: &latency::Latency) -> String {
    eprintln!(
        "latency {what}: arrival p50 {:.1} p99 {:.1} max {:.1} ms; delivery report p99 <= {} ms, {:.2} % within 20 ms ({} rows, written at {:.0}/s){}",
        l.p50,
        l.p99,
        l.max,
        l.ack_p99_at_most,
        l.ack_within_20ms * 100.0,
        l.rows,
        l.achieved,
        l.slack_p99
            .map(|s| format!("; writer INSERT to COMMIT p99 {s:.1} ms"))
            .unwrap_or_default()
            + &l
                .phases_p99
                .iter()
                .map(|(phase, ms)| format!("; batch {phase} p99 <= {ms} ms"))
                .collect::<String>()
    );
    format!(
        "| {what} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {} | {:.2} % | {} |\n",
        l.achieved,
        l.rows,
        l.p50,
        l.p99,
        l.max,
        l.ack_p99_at_most,
        l.ack_within_20ms * 100.0,
        l.slack_p99.map_or("-".to_owned(), |s| format!("{s:.1}"))
    )
}
