//! The read-model scenario (`sqlbatch`): the seed's account projection (`UPDATE
//! account_summary SET balance = balance + $1, events = events + 1 WHERE account_id =
//! $2`, 1,000 accounts) fed by the dispatch topic through outboxd's `sql` handler in key
//! order, one transaction per event against batches of up to 100, and a bare client
//! writing the same statements and inbox inserts on four connections side by side in
//! transactions of 40 (the batches outboxd's handler runs at once and their size in
//! this scenario: the database's rate for this work); three rounds, alternated.

use std::time::Instant;

use anyhow::Result;
use sqlx::PgPool;

use crate::dispatch::consumer_config;
use crate::processes::{Broker, Outboxd};

const STATEMENT: &str =
    "UPDATE bench_summary SET balance = balance + $1, events = events + 1 WHERE account_id = $2";

async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_summary; \
         CREATE TABLE bench_summary (account_id text PRIMARY KEY, balance numeric NOT NULL, events integer NOT NULL); \
         INSERT INTO bench_summary SELECT 'acc-' || g, 0, 0 FROM generate_series(0, 999) g; \
         DELETE FROM outboxd_inbox WHERE handler IN ('h', 'bare')",
    )
    .execute(pool)
    .await?;
    // One statement each: VACUUM runs outside a transaction block.
    for statement in [
        "VACUUM ANALYZE bench_summary",
        "VACUUM outboxd_inbox",
        "CHECKPOINT",
    ] {
        sqlx::raw_sql(statement).execute(pool).await?;
    }
    Ok(())
}

/// outboxd's sql handler with `batch_size`, key order, `max_in_flight` 256.
async fn outboxd(
    broker: &Broker,
    url: &str,
    topic: &str,
    messages: i64,
    name: &str,
    batch_size: u32,
) -> Result<f64> {
    let handler = format!(
        "kind = \"sql\"\nstatement = \"{STATEMENT}\"\nparams = [\"/amount\", \"/account\"]\nbatch_size = {batch_size}\n"
    );
    let extra = "ordering = \"key\"\nmax_in_flight = 256\n";
    let config = consumer_config(broker, url, topic, name, &handler, extra);
    let mut outboxd = Outboxd::start(&config)?;
    let rate = outboxd
        .rate_until("outboxd_consumer_messages_total", messages as f64)
        .await?;
    let scrape = outboxd.scrape().await;
    let value = |metric: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(metric))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    eprintln!(
        "  mean events per transaction {:.1}",
        value("outboxd_consumer_batch_size_sum") / value("outboxd_consumer_batch_size_count")
    );
    outboxd.stop();
    Ok(rate)
}

/// The same statements and inbox inserts from `connections` connections side by side
/// (each a share of the accounts, as outboxd's batches are of different keys), `batch`
/// events per transaction, for the same messages' values (computed as the producer writes
/// them).
async fn bare(pool: &PgPool, messages: i64, batch: usize, connections: i64) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for share in 0..connections {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut conn = pool.acquire().await?;
            let mine: Vec<i64> = (0..messages)
                .filter(|n| (n % 1000) % connections == share)
                .collect();
            for events in mine.chunks(batch) {
                let ids: Vec<String> = events.iter().map(|n| format!("bench-{n}")).collect();
                let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
                let fresh: Vec<String> = sqlx::query_scalar(
                    "INSERT INTO outboxd_inbox (handler, event_id) SELECT 'bare', unnest($1::text[]) \
                     ON CONFLICT DO NOTHING RETURNING event_id",
                )
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
                anyhow::ensure!(fresh.len() == ids.len(), "the inbox held some ids already");
                for n in events {
                    sqlx::query(STATEMENT)
                        .bind(rust_decimal::Decimal::from(n % 977))
                        .bind(format!("acc-{}", n % 1000))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Runs the scenario on `topic` (holding `messages` dispatch messages); returns `(run,
/// rates of the rounds)`.
pub async fn run(
    pool: &PgPool,
    broker: &Broker,
    url: &str,
    topic: &str,
    messages: i64,
) -> Result<Vec<(String, Vec<f64>)>> {
    let names = [
        "outboxd sql, one transaction per event",
        "outboxd sql, batch_size 100",
        "bare client, 4 connections, 40 events per transaction",
    ];
    let mut rates: Vec<(String, Vec<f64>)> =
        names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    for round in 1..=3 {
        for (i, name) in names.iter().enumerate() {
            reset(pool).await?;
            let rate = match i {
                0 => outboxd(broker, url, topic, messages, &format!("single{round}"), 1).await?,
                1 => outboxd(broker, url, topic, messages, &format!("batch{round}"), 100).await?,
                _ => bare(pool, messages, 40, 4).await?,
            };
            let total: i64 = sqlx::query_scalar("SELECT sum(events)::int8 FROM bench_summary")
                .fetch_one(pool)
                .await?;
            anyhow::ensure!(total == messages, "{name}: {total} of {messages} applied");
            eprintln!("read model, round {round}: {name}: {rate:.0} msgs/s");
            rates[i].1.push(rate);
        }
    }
    sqlx::raw_sql("DROP TABLE IF EXISTS bench_summary; DELETE FROM outboxd_inbox WHERE handler IN ('h', 'bare')")
        .execute(pool)
        .await?;
    Ok(rates)
}
