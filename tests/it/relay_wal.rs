//! WAL capture on a PostgreSQL with `wal_level = logical` (LOGICAL_DATABASE_URL, default
//! 127.0.0.1:5433/test, which scripts/test.sh brings up): the seed's event store read from
//! the slot in commit order with a transaction that commits late, the initial snapshot
//! and its hand-over to the stream, a slot that keeps up while only other tables change,
//! and a clear refusal where logical decoding is off.

use std::time::Duration;

use outboxd::config::{Capture, Config, Snapshot};
use sqlx::{Connection, Executor, PgPool};

use crate::helpers::*;

/// The database with `wal_level = logical`.
pub fn logical_url() -> String {
    std::env::var("LOGICAL_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5433/test".into())
}

/// A migrated pool on the logical database.
pub(crate) async fn logical_db() -> PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&logical_url())
        .await
        .expect("a PostgreSQL with wal_level = logical at LOGICAL_DATABASE_URL (scripts/test.sh starts one)");
    outboxd::db::migrator(outboxd::db::Backend::Postgres)
        .run(&pool)
        .await
        .expect("migrations apply");
    pool
}

/// The seed's event store: id, aggregate_id, event_type, version, timestamp, data,
/// metadata.
pub(crate) async fn event_store(pool: &PgPool) -> String {
    let table = unique("wal_events");
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (id bigserial PRIMARY KEY, aggregate_id text NOT NULL, \
         event_type text NOT NULL, version integer NOT NULL, \
         timestamp timestamptz NOT NULL DEFAULT now(), data jsonb NOT NULL, metadata jsonb)"
    ))
    .execute(pool)
    .await
    .unwrap();
    table
}

pub(crate) fn insert(table: &str, n: i64) -> String {
    format!(
        "INSERT INTO {table} (aggregate_id, event_type, version, data, metadata) \
         VALUES ('a{}', '{table}', {}, '{{\"n\": {n}}}', '{{\"tenant\": \"t{n}\"}}')",
        n % 5,
        n / 5
    )
}

pub(crate) fn wal_config(table: &str, bootstrap: &str, snapshot: Snapshot) -> Config {
    let mut cfg = config(table, bootstrap);
    cfg.database.url = Some(logical_url());
    let t = &mut cfg.relay.tables[0];
    t.capture = Capture::Wal;
    t.wal.snapshot = snapshot;
    t.wal.status_interval = Duration::from_millis(200);
    t.notify_channel = None;
    t.key_column = col("aggregate_id");
    t.payload_column = col("data");
    t.headers_column = Some(col("metadata"));
    t.created_at_column = Some(col("timestamp"));
    t.event_id_column = None;
    t.aggregate_type_column = None;
    t.batch_size = 40;
    cfg
}

/// Waits until no session reads `slot` (or it does not exist).
async fn released(pool: &PgPool, slot: &str) {
    eventually("the slot is released", Duration::from_secs(10), || async {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(pool)
                .await
                .unwrap();
        active != Some(true)
    })
    .await;
}

/// Drops the test's slot and publication once the daemon is gone.
pub(crate) async fn retire(pool: &PgPool, cfg: &Config) {
    let t = &cfg.relay.tables[0];
    let slot = t.wal_slot();
    released(pool, &slot).await;
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .execute(pool)
    .await
    .unwrap();
    sqlx::raw_sql(&format!(
        "DROP PUBLICATION IF EXISTS {}; DELETE FROM outboxd_relay_slots WHERE slot_name = '{slot}'",
        t.wal_publication()
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Waits until the table's slot exists, its snapshot published, and a session reads it.
/// Creating a slot waits for every transaction open on the server to end, so this can
/// take as long as another test holds one open.
pub(crate) async fn streaming(pool: &PgPool, cfg: &Config) {
    let slot = cfg.relay.tables[0].wal_slot();
    eventually("the slot is streamed", Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots s \
             JOIN outboxd_relay_slots o USING (slot_name) \
             WHERE slot_name = $1 AND s.active AND o.snapshot_done)",
        )
        .bind(&slot)
        .fetch_one(pool)
        .await
        .unwrap()
    })
    .await;
}

/// Existing rows come from the slot's snapshot, new ones from the stream; a transaction
/// that holds its row open while later ones commit arrives in its commit place, once; no
/// row changes; a restart sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_store_is_relayed_from_the_wal_in_commit_order() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    for n in 0..100 {
        sqlx::raw_sql(&insert(&table, n))
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::All);
    // Reports only every 30 s: the position reached at the stop comes from the stop.
    cfg.relay.tables[0].wal.status_interval = Duration::from_secs(30);
    let daemon = Daemon::start(cfg.clone()).await;
    streaming(&pool, &cfg).await;
    let mut late = sqlx::PgConnection::connect(&logical_url()).await.unwrap();
    late.execute("BEGIN").await.unwrap();
    late.execute(insert(&table, 100).as_str()).await.unwrap();
    let writer = {
        let (pool, table) = (pool.clone(), table.clone());
        tokio::spawn(async move {
            for n in 101..300 {
                sqlx::raw_sql(&insert(&table, n))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        })
    };
    writer.await.unwrap();
    let before = consume(
        &cluster.bootstrap_servers(),
        &topic,
        299,
        Duration::from_millis(700),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        before.iter().all(|r| r.n != 100),
        "the open transaction's row is not sent before it commits"
    );
    let before_last_commit: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    late.execute("COMMIT").await.unwrap();
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        300,
        Duration::from_millis(700),
        Duration::from_secs(30),
    )
    .await;
    assert_each_once(&received, 300);
    // Commit order per key: row 100 (key a0) committed after every other a0 row.
    assert_first_deliveries_in_key_order(
        &received
            .iter()
            .filter(|r| r.n != 100)
            .cloned()
            .collect::<Vec<_>>(),
    );
    let a0: Vec<i64> = received
        .iter()
        .filter(|r| r.key == "a0")
        .map(|r| r.n)
        .collect();
    assert_eq!(
        a0.last(),
        Some(&100),
        "the late row is its key's last: {a0:?}"
    );
    let r = received.iter().find(|r| r.n == 17).unwrap();
    assert_eq!(r.headers["tenant"], "t17", "metadata entries are headers");
    assert_eq!(count_rows(&pool, &table).await, 300, "no row deleted");
    daemon.stop().await.unwrap();
    let slot = cfg.relay.tables[0].wal_slot();
    let confirmed: bool = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn > $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .bind(&before_last_commit)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        confirmed,
        "a clean stop leaves the slot past the last published commit"
    );

    // A restart goes on from the slot's confirmed position.
    let daemon = Daemon::start(cfg.clone()).await;
    sqlx::raw_sql(&insert(&table, 300))
        .execute(&pool)
        .await
        .unwrap();
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        301,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .await;
    assert_each_once(&received, 301);
    daemon.stop().await.unwrap();
    retire(&pool, &cfg).await;
}

/// `snapshot = "new"`: rows already there are left alone, rows committed after the slot
/// was created arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_created_for_new_rows_only_skips_the_existing_ones() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 1);
    for n in 0..20 {
        sqlx::raw_sql(&insert(&table, n))
            .execute(&pool)
            .await
            .unwrap();
    }
    let cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::New);
    let daemon = Daemon::start(cfg.clone()).await;

    streaming(&pool, &cfg).await;
    for n in 20..30 {
        sqlx::raw_sql(&insert(&table, n))
            .execute(&pool)
            .await
            .unwrap();
    }
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        10,
        Duration::from_millis(1000),
        Duration::from_secs(30),
    )
    .await;
    let mut ns: Vec<i64> = received.iter().map(|r| r.n).collect();
    ns.sort_unstable();
    assert_eq!(ns, (20..30).collect::<Vec<_>>());
    daemon.stop().await.unwrap();
    retire(&pool, &cfg).await;
}

/// While only another table changes, the slot's confirmed position follows the server's
/// (so the slot pins no WAL), and the lag gauge says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_keeps_up_while_only_other_tables_change() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let other = unique("wal_other");
    sqlx::raw_sql(&format!("CREATE TABLE {other} (n bigint)"))
        .execute(&pool)
        .await
        .unwrap();
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 1);
    let mut cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::New);
    cfg.relay.tables[0].maintenance_interval = Duration::from_millis(200);
    let daemon = Daemon::start(cfg.clone()).await;
    let slot = cfg.relay.tables[0].wal_slot();
    streaming(&pool, &cfg).await;
    for n in 0..50 {
        sqlx::raw_sql(&format!(
            "INSERT INTO {other} SELECT g FROM generate_series(1, 1000) g; SELECT {n}"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    eventually("the slot confirmed past the other table's writes", Duration::from_secs(30), || async {
        let behind: bool = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn < $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .bind(&written)
        .fetch_one(&pool)
        .await
        .unwrap();
        !behind
    })
    .await;
    let gauge = format!("outboxd_relay_slot_lag_bytes{{table=\"{table}\"}}");
    eventually(
        "the lag gauge reads under 1 MB",
        Duration::from_secs(30),
        || async {
            daemon.metrics.render().contains(&gauge)
                && daemon.metric("outboxd_relay_slot_lag_bytes", &[("table", table.as_str())]) < 1e6
        },
    )
    .await;
    daemon.stop().await.unwrap();
    retire(&pool, &cfg).await;
}

/// A table-less outbox: logical decoding messages under the configured prefix. A
/// transaction that emits three and rolls back emits nothing; one that commits emits its
/// three, in order; other prefixes are not relayed; content that is not a JSON object is
/// recorded as a dead row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_decoding_messages_are_an_outbox_without_a_table() {
    let pool = logical_db().await;
    let name = unique("wal_messages");
    let topic = topic_of(&name);
    let cluster = cluster(&topic, 1);
    let mut cfg = wal_config(&name, &cluster.bootstrap_servers(), Snapshot::New);
    let t = &mut cfg.relay.tables[0];
    t.wal.inserts = false;
    t.wal.message_prefix = Some("orders".into());
    t.topic = Some(topic.clone());
    t.allowed_topics = vec![topic.clone()];
    t.headers_column = Some(col("headers"));
    t.payload_column = col("payload");
    t.created_at_column = None;
    let daemon = Daemon::start(cfg.clone()).await;
    streaming(&pool, &cfg).await;
    let emit = |n: i64, prefix: &str| {
        format!(
            "SELECT pg_logical_emit_message(true, '{prefix}', \
             jsonb_build_object('aggregate_id', 'k', 'event_type', 'Placed', \
             'payload', jsonb_build_object('n', {n}), 'headers', '{{\"tenant\": \"a\"}}'::jsonb)::text)"
        )
    };
    let mut conn = sqlx::PgConnection::connect(&logical_url()).await.unwrap();
    conn.execute("BEGIN").await.unwrap();
    for n in 100..103 {
        conn.execute(emit(n, "orders").as_str()).await.unwrap();
    }
    conn.execute("ROLLBACK").await.unwrap();
    conn.execute("BEGIN").await.unwrap();
    for n in 0..3 {
        conn.execute(emit(n, "orders").as_str()).await.unwrap();
    }
    conn.execute(emit(50, "other").as_str()).await.unwrap();
    conn.execute("SELECT pg_logical_emit_message(true, 'orders', 'not json')")
        .await
        .unwrap();
    conn.execute("COMMIT").await.unwrap();
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        3,
        Duration::from_millis(1000),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(received.iter().map(|r| r.n).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(received[0].headers["tenant"], "a");
    assert_eq!(received[0].headers["event-type"], "Placed");
    eventually(
        "the bad message is a dead row",
        Duration::from_secs(10),
        || async {
            let reason: Option<String> =
                sqlx::query_scalar("SELECT reason FROM outboxd_dead_rows WHERE source_table = $1")
                    .bind(&name)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            reason.is_some_and(|r| r.contains("not a JSON object"))
        },
    )
    .await;
    daemon.stop().await.unwrap();
    retire(&pool, &cfg).await;
}

/// `outboxd` on `toml` with `args`: `(exit code, stdout + stderr)`.
fn outboxd(args: &[&str], toml: &str) -> (i32, String) {
    let (code, out, err) = crate::cli::run_with(args, toml, &[]);
    (code, format!("{out}{err}"))
}

/// A WAL table's TOML on `url`.
fn wal_toml(url: &str, bootstrap: &str, table: &str) -> String {
    format!(
        "[database]\nurl = \"{url}\"\n[kafka]\nbrokers = \"{bootstrap}\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\ncapture = \"wal\"\n\
         key_column = \"aggregate_id\"\npayload_column = \"data\"\nheaders_column = \"metadata\"\n\
         created_at_column = \"timestamp\"\nevent_id_column = \"\"\naggregate_type_column = \"\"\n\
         notify_channel = \"\"\n"
    )
}

/// `check-config --connect` names what WAL capture needs: `wal_level = logical` on a
/// server without it (exit 78), and on one with it the publication and slot it will
/// create; `status` shows the slot's lag and reader; `relay drop-slot` is refused while
/// the slot is read and drops it once outboxd stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_commands_know_the_slot() {
    let cluster = cluster("orders", 1);
    let bootstrap = cluster.bootstrap_servers();
    // The machine's main PostgreSQL has wal_level = replica.
    let replica = db().await;
    let table = event_store(&replica).await;
    let (code, out) = outboxd(
        &["check-config", "--connect"],
        &wal_toml(&database_url(), &bootstrap, &table),
    );
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("capture = \"wal\" needs `logical`"), "{out}");

    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let toml = wal_toml(&logical_url(), &bootstrap, &table);
    let (code, out) = outboxd(&["check-config", "--connect"], &toml);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ok       relay table {table}: WAL capture: wal_level = logical, role may replicate, mapped columns, publication `outboxd_{table}` is created at start, slot `outboxd_{table}` is created at start")), "{out}");

    let mut cfg = wal_config(&table, &bootstrap, Snapshot::New);
    cfg.relay.tables[0].topic = Some("orders".into());
    let daemon = Daemon::start(cfg.clone()).await;
    streaming(&pool, &cfg).await;
    let (code, out) = outboxd(&["status", "--json"], &toml);
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let relay = &status["relay"][0];
    assert!(relay["pending"].is_null(), "{relay}");
    assert!(relay["slot_lag_bytes"].as_i64().is_some(), "{relay}");
    assert_eq!(relay["owners"][0]["application"], "outboxd", "{relay}");

    let (code, out) = outboxd(&["relay", "drop-slot", "--table", &table], &toml);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("an outboxd relays the table"), "{out}");
    daemon.stop().await.unwrap();
    let slot = cfg.relay.tables[0].wal_slot();
    released(&pool, &slot).await;
    let (code, out) = outboxd(
        &["relay", "drop-slot", "--table", &table, "--publication"],
        &toml,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!("dropped replication slot {slot}\ndropped publication {slot}\n")
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1) \
              + (SELECT count(*) FROM pg_publication WHERE pubname = $1) \
              + (SELECT count(*) FROM outboxd_relay_slots WHERE slot_name = $1)",
    )
    .bind(&slot)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
}
