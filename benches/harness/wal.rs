//! WAL capture (`wal`, only when named in `--only`): the seed's `events` table read from a
//! replication slot on a PostgreSQL with `wal_level = logical` ($LOGICAL_DATABASE_URL,
//! default 127.0.0.1:5433/test). At 100,000 and 2,000,000 rows: the stream (rows written
//! while outboxd was stopped, read from the slot's backlog) and the initial snapshot
//! (rows already in the table when the slot is created), against a delete-mode drain of
//! 100,000 rows of the reference table on the same server; three rounds, alternated. Then
//! latency from COMMIT to arrival at 1,000 rows/s, WAL capture against LISTEN polling.

use anyhow::{bail, Result};
use sqlx::PgPool;

use crate::drain::{fill, relay_drain, Drain};
use crate::latency::{self, Latency, Load};
use crate::processes::{cpu_seconds, kafka_section, postgres_cpu_seconds, Broker, Outboxd};
use crate::store::{add_rows, create_store, fill_store, TABLE};

const SLOT: &str = "outboxd_bench_events";

/// One run of the scenario.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    /// Delete mode on the reference table (the baseline).
    Delete(i64),
    /// The slot's backlog of this many rows.
    Stream(i64),
    /// The initial snapshot of this many rows.
    Snapshot(i64),
}

impl Run {
    fn name(self) -> String {
        match self {
            Run::Delete(rows) => format!("delete mode, reference table, {rows} rows"),
            Run::Stream(rows) => format!("WAL capture, stream, {rows} rows"),
            Run::Snapshot(rows) => format!("WAL capture, initial snapshot, {rows} rows"),
        }
    }
}

/// Drops the slot, its record and its publication.
async fn forget_slot(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{SLOT}'; \
         DELETE FROM outboxd_relay_slots WHERE slot_name = '{SLOT}'; \
         DROP PUBLICATION IF EXISTS {SLOT}"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

fn config(url: &str, broker: &Broker, snapshot: &str) -> String {
    format!(
        "[database]\nurl = \"{url}\"\n{}[[relay.tables]]\ntable = \"{TABLE}\"\n\
         topic = \"bench.{{event_type}}\"\ncapture = \"wal\"\n\
         key_column = \"aggregate_id\"\npayload_column = \"data\"\nheaders_column = \"metadata\"\n\
         created_at_column = \"timestamp\"\nevent_id_column = \"\"\naggregate_type_column = \"\"\n\
         notify_channel = \"\"\n[relay.tables.wal]\nsnapshot = \"{snapshot}\"\n",
        kafka_section(&broker.bootstrap(), &[]),
    )
}

/// Publishes `rows` with outboxd; rows/s from the first published row to the last. Also
/// prints the CPU seconds per 100,000 rows of outboxd and of PostgreSQL (the walsender,
/// or the snapshot's backend), which a short run's wall clock hides.
async fn capture(url: &str, broker: &Broker, rows: i64, snapshot: &str) -> Result<f64> {
    let pg_before = postgres_cpu_seconds();
    let mut outboxd = Outboxd::start(&config(url, broker, snapshot))?;
    let rate = outboxd
        .rate_until("outboxd_relay_published_total", rows as f64)
        .await?;
    let per_100k = 100_000.0 / rows as f64;
    eprintln!(
        "  CPU s per 100k rows: outboxd {:.2}, postgres {:.2}; peak RSS {:.1} MiB",
        cpu_seconds(outboxd.pid()) * per_100k,
        (postgres_cpu_seconds() - pg_before) * per_100k,
        outboxd.rss().0
    );
    outboxd.stop();
    Ok(rate)
}

/// A backlog of `rows` in the slot: the slot (and its publication) made first, then the
/// rows written, as if outboxd had been stopped meanwhile.
async fn backlog(pool: &PgPool, rows: i64) -> Result<()> {
    forget_slot(pool).await?;
    create_store(pool, false).await?;
    // One statement each: a slot cannot be created in a transaction that wrote.
    for statement in [
        format!("CREATE PUBLICATION {SLOT} FOR TABLE {TABLE} WITH (publish = 'insert')"),
        format!("SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"),
        format!(
            "INSERT INTO outboxd_relay_slots (slot_name, source_table, snapshot_done) \
             VALUES ('{SLOT}', '{TABLE}', true)"
        ),
    ] {
        sqlx::raw_sql(&statement).execute(pool).await?;
    }
    add_rows(pool, rows).await
}

/// Runs the scenario; returns `(run, rates of the rounds)` in the order run, and the
/// latency pairs.
pub async fn run(
    broker_kind: &str,
    rounds: usize,
    latency_secs: u64,
) -> Result<(Vec<(String, Vec<f64>)>, Vec<(String, Latency)>)> {
    let url = std::env::var("LOGICAL_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5433/test".into());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&pool)
        .await?;
    if level != "logical" {
        bail!("{url} has wal_level = {level}; the wal scenario needs logical");
    }
    outboxd::db::migrator(outboxd::db::Backend::Postgres)
        .run(&pool)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS outbox (id bigserial PRIMARY KEY, event_id uuid NOT NULL DEFAULT gen_random_uuid(), \
         aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL, \
         headers jsonb NOT NULL DEFAULT '{}', created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let runs = [
        Run::Delete(100_000),
        Run::Stream(100_000),
        Run::Snapshot(100_000),
        Run::Stream(2_000_000),
        Run::Snapshot(2_000_000),
    ];
    let mut rates: Vec<(String, Vec<f64>)> = runs.iter().map(|r| (r.name(), vec![])).collect();
    for round in 1..=rounds {
        for (i, run) in runs.iter().enumerate() {
            let broker = Broker::start(broker_kind)?;
            broker.create_topic("bench.BenchEvent", 6).await?;
            let rate = match *run {
                Run::Delete(rows) => {
                    fill(&pool, "bench_outbox", rows).await?;
                    let drain = Drain {
                        lanes: 1,
                        prefetch: true,
                        batch_size: None,
                    };
                    relay_drain(&pool, &broker, "bench_outbox", rows, &url, &drain)
                        .await?
                        .0
                }
                Run::Stream(rows) => {
                    backlog(&pool, rows).await?;
                    capture(&url, &broker, rows, "new").await?
                }
                Run::Snapshot(rows) => {
                    // The stream's table is still there, full: a new slot snapshots it.
                    forget_slot(&pool).await?;
                    let have: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {TABLE}"))
                        .fetch_one(&pool)
                        .await?;
                    if have != rows {
                        fill_store(&pool, rows, false).await?;
                    }
                    capture(&url, &broker, rows, "all").await?
                }
            };
            eprintln!(
                "wal capture, round {round}: {}: {rate:.0} rows/s",
                run.name()
            );
            rates[i].1.push(rate);
        }
    }
    forget_slot(&pool).await?;
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .execute(&pool)
        .await?;

    let mut latencies = Vec::new();
    for round in 1..=rounds {
        for wal in [true, false] {
            let broker = Broker::start(broker_kind)?;
            // Commits that wait for their WAL flush, as an outbox's writer's should: the
            // slot streams only flushed WAL, so with `synchronous_commit = off` a row
            // waits for the WAL writer (`wal_writer_delay`, 200 ms) before it can be read.
            let load = Load {
                rows_per_sec: 1000,
                rows_per_txn: 1,
                listen: !wal,
                wal,
                synchronous_commit: true,
                secs: latency_secs,
            };
            let l = latency::run(&pool, &broker, &url, &load).await?;
            let how = if wal { "WAL capture" } else { "LISTEN" };
            eprintln!(
                "wal latency, round {round}: {how}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                l.p50, l.p99, l.max
            );
            latencies.push((format!("1,000 rows/s, 1 row/txn, {how}"), l));
        }
    }
    Ok((rates, latencies))
}
