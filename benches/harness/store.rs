//! The event store scenario: the seed's `events` table (id, aggregate_id, event_type,
//! version, timestamp, data, metadata) relayed in cursor mode, with and without a
//! transaction-id column, at 100,000 and 2,000,000 rows, against a delete-mode drain of
//! the reference table of 100,000 rows; three rounds, alternated.

use anyhow::Result;
use sqlx::PgPool;

use crate::drain::{fill, relay_drain, Drain};
use crate::processes::{kafka_section, Broker, Outboxd};

pub const TABLE: &str = "bench_events";

/// One drain of the scenario.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    /// Delete mode on the reference table (the baseline).
    Delete(i64),
    /// Cursor mode on the event store; whether it has the transaction-id column.
    Cursor(i64, bool),
}

impl Run {
    fn name(self) -> String {
        match self {
            Run::Delete(rows) => format!("delete mode, reference table, {rows} rows"),
            Run::Cursor(rows, true) => format!("cursor mode with xid_column, {rows} rows"),
            Run::Cursor(rows, false) => format!("cursor mode without xid_column, {rows} rows"),
        }
    }
}

/// The event store with `rows` rows, written 1,000 per transaction, with the column and
/// its index when `xid`.
pub async fn fill_store(pool: &PgPool, rows: i64, xid: bool) -> Result<()> {
    create_store(pool, xid).await?;
    add_rows(pool, rows).await
}

/// An empty event store, with the transaction-id column and its index when `xid`.
pub async fn create_store(pool: &PgPool, xid: bool) -> Result<()> {
    let column = if xid {
        ", txid xid8 NOT NULL DEFAULT pg_current_xact_id()"
    } else {
        ""
    };
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {TABLE}; \
         CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, aggregate_id text NOT NULL, \
         event_type text NOT NULL, version integer NOT NULL, timestamp double precision NOT NULL, \
         data jsonb NOT NULL, metadata jsonb{column}); \
         DELETE FROM outboxd_relay_cursors WHERE source_table = '{TABLE}'"
    ))
    .execute(pool)
    .await?;
    if xid {
        sqlx::raw_sql(&format!("CREATE INDEX {TABLE}_xid ON {TABLE} (txid, id)"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Writes `rows` rows into the event store, 1,000 per transaction, then vacuums and
/// checkpoints.
pub async fn add_rows(pool: &PgPool, rows: i64) -> Result<()> {
    let insert = format!(
        "INSERT INTO {TABLE} (aggregate_id, event_type, version, timestamp, data, metadata) \
         SELECT 'account-' || (g % 1000), 'BenchEvent', g / 1000, extract(epoch from now()), \
         jsonb_build_object('n', g, 'amount', g % 977, 'currency', 'EUR', 'note', repeat('x', 100)), \
         '{{\"tenant\": \"t1\"}}' FROM generate_series($1::int8, $1::int8 + 999) g"
    );
    for first in (0..rows).step_by(1000) {
        sqlx::query(&insert).bind(first).execute(pool).await?;
    }
    // One statement each: VACUUM runs outside a transaction block.
    for statement in [format!("VACUUM ANALYZE {TABLE}"), "CHECKPOINT".to_owned()] {
        sqlx::raw_sql(&statement).execute(pool).await?;
    }
    Ok(())
}

/// Drains the event store of `rows` rows in cursor mode; rows/s from the first published
/// row to the last.
async fn cursor_drain(broker: &Broker, url: &str, rows: i64, xid: bool) -> Result<f64> {
    let config = format!(
        "[database]\nurl = \"{url}\"\n{}[[relay.tables]]\ntable = \"{TABLE}\"\n\
         topic = \"bench.{{event_type}}\"\non_published = \"cursor\"\n\
         key_column = \"aggregate_id\"\npayload_column = \"data\"\nheaders_column = \"metadata\"\n\
         created_at_column = \"timestamp\"\nevent_id_column = \"\"\naggregate_type_column = \"\"\n\
         xid_column = \"{}\"\nnotify_channel = \"\"\npoll_interval = \"50ms\"\n",
        kafka_section(&broker.bootstrap(), &[]),
        if xid { "txid" } else { "" },
    );
    let mut outboxd = Outboxd::start(&config)?;
    let rate = outboxd
        .rate_until("outboxd_relay_published_total", rows as f64)
        .await?;
    eprintln!("  peak RSS {:.1} MiB", outboxd.rss().0);
    outboxd.stop();
    Ok(rate)
}

/// Runs the scenario; returns `(drain, rates of the rounds)` in the order run.
pub async fn run(
    pool: &PgPool,
    url: &str,
    broker_kind: &str,
    rounds: usize,
) -> Result<Vec<(String, Vec<f64>)>> {
    let runs = [
        Run::Delete(100_000),
        Run::Cursor(100_000, true),
        Run::Cursor(2_000_000, true),
        Run::Cursor(100_000, false),
    ];
    let mut rates: Vec<(String, Vec<f64>)> = runs.iter().map(|r| (r.name(), vec![])).collect();
    for round in 1..=rounds {
        for (i, run) in runs.iter().enumerate() {
            let broker = Broker::start(broker_kind)?;
            broker.create_topic("bench.BenchEvent", 6).await?;
            let rate = match *run {
                Run::Delete(rows) => {
                    fill(pool, "bench_outbox", rows).await?;
                    let drain = Drain {
                        lanes: 1,
                        prefetch: true,
                        batch_size: None,
                    };
                    relay_drain(pool, &broker, "bench_outbox", rows, url, &drain)
                        .await?
                        .0
                }
                Run::Cursor(rows, xid) => {
                    fill_store(pool, rows, xid).await?;
                    cursor_drain(&broker, url, rows, xid).await?
                }
            };
            eprintln!(
                "event store, round {round}: {}: {rate:.0} rows/s",
                run.name()
            );
            rates[i].1.push(rate);
        }
    }
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .execute(pool)
        .await?;
    Ok(rates)
}
