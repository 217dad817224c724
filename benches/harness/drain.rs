//! The relay drain scenario's parts: the backlog table, the raw SQL claim baseline, and one
//! drain by outboxd, timed from its metrics.

use std::time::Instant;

use anyhow::{bail, Result};
use sqlx::PgPool;

use crate::processes::{cpu_seconds, kafka_section, postgres_cpu_seconds, Broker, Outboxd};

const PAYLOAD_SQL: &str = "jsonb_build_object('n', g, 'account', 'acc-' || (g % 1000), 'amount', g % 977, 'currency', 'EUR', 'note', repeat('x', 100))";

pub async fn fill(pool: &PgPool, table: &str, rows: i64) -> Result<()> {
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);")).execute(pool).await?;
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload) SELECT 'account', 'k' || (g % 1000), 'BenchEvent', {PAYLOAD_SQL} FROM generate_series(1, $1) g"
    ))
    .bind(rows)
    .execute(pool)
    .await?;
    sqlx::raw_sql(&format!("VACUUM ANALYZE {table}"))
        .execute(pool)
        .await?;
    // Each measured drain starts right after a checkpoint: otherwise one triggered by the
    // fills' WAL (every `max_wal_size`) lands in whichever drain, raw or relay, is running.
    // It takes a superuser (or the `pg_checkpoint` role); without one the drains still run.
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(pool).await {
        eprintln!("  no checkpoint before the drain ({e}): one may land in a measured drain");
    }
    Ok(())
}

async fn count(pool: &PgPool, table: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await?)
}

/// Baseline 1: the claim statement alone, in a loop on one connection, rows fetched.
pub async fn raw_claim(pool: &PgPool, table: &str) -> Result<f64> {
    let mut conn = pool.acquire().await?;
    let sql = format!("WITH c AS (SELECT id FROM {table} ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) DELETE FROM {table} o USING c WHERE o.id = c.id RETURNING o.*");
    let started = Instant::now();
    let mut total = 0;
    loop {
        let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
        if rows.is_empty() {
            break;
        }
        total += rows.len();
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// One relay drain's settings.
pub struct Drain {
    pub lanes: u32,
    pub prefetch: bool,
    pub batch_size: Option<u32>,
}

pub async fn relay_drain(
    pool: &PgPool,
    broker: &Broker,
    table: &str,
    rows: i64,
    url: &str,
    drain: &Drain,
) -> Result<(f64, f64)> {
    let mut config = format!(
        "[database]\nurl = \"{url}\"\n{}[[relay.tables]]\ntable = \"{table}\"\ntopic = \"bench.{{event_type}}\"\nlanes = {}\nprefetch = {}\nnotify_channel = \"\"\npoll_interval = \"50ms\"\n",
        kafka_section(&broker.bootstrap(), &[]),
        drain.lanes,
        drain.prefetch,
    );
    if let Some(n) = drain.batch_size {
        config.push_str(&format!("batch_size = {n}\n"));
    }
    let broker_cpu = || broker.pid().map_or(0.0, cpu_seconds);
    let (pg_before, broker_before) = (postgres_cpu_seconds(), broker_cpu());
    let mut outboxd = Outboxd::start(&config)?;
    // Read from outboxd's /metrics (polling the table with count(*) would compete with the
    // relay for the database).
    let rate = outboxd
        .rate_until("outboxd_relay_published_total", rows as f64)
        .await?;
    let per_100k = 100_000.0 / rows as f64;
    eprintln!(
        "  CPU s per 100k rows: outboxd {:.2}, broker {:.2}, postgres {:.2}",
        cpu_seconds(outboxd.pid()) * per_100k,
        (broker_cpu() - broker_before) * per_100k,
        (postgres_cpu_seconds() - pg_before) * per_100k,
    );
    eprintln!(
        "  batch phases, mean: {}",
        phase_means(&outboxd.scrape().await)
    );
    if count(pool, table).await? != 0 {
        bail!("rows left in {table} after the drain");
    }
    let (peak, _) = outboxd.rss();
    outboxd.stop();
    Ok((rate, peak))
}

/// Each batch phase's mean (ms) and count from a scrape of
/// `outboxd_relay_batch_phase_seconds`: what a drain's batch spent where. The claims
/// that overlap an acknowledgement (prefetches) are not among them.
fn phase_means(scrape: &str) -> String {
    let total = |name: &str, phase: &str| -> f64 {
        let label = format!("phase=\"{phase}\"");
        scrape
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(&label))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    ["claim", "kafka", "commit"]
        .map(|phase| {
            let n = total("outboxd_relay_batch_phase_seconds_count", phase);
            let sum = total("outboxd_relay_batch_phase_seconds_sum", phase);
            format!("{phase} {:.2} ms x {n}", sum * 1000.0 / n.max(1.0))
        })
        .join(", ")
}
