//! Existing tables as they are, each with an independent writer: a hand-written relay's
//! table (boolean mark, epoch-seconds creation time, rows kept), an append-only event store
//! in cursor mode (with a transaction that commits late behind later rows, with and
//! without a transaction-id column, and the column added to a store already relayed), and
//! Debezium's outbox reference table read as a Debezium consumer reads the router's output.

use std::time::Duration;

use outboxd::config::OnPublished;
use sqlx::{Connection, Executor};

use crate::backends::{on_backends, Kind, TestDb};
use crate::helpers::*;

/// Inserts rows `first..first + count` one statement each, as an application would,
/// while the relay runs.
async fn write_in_background(db: &TestDb, insert: impl Fn(i64) -> String) {
    for n in 0..200 {
        db.exec(&insert(n)).await;
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

on_backends!(a_hand_written_relays_table_is_relayed_as_is_in_mark_mode: postgres, mysql, sqlite);
async fn a_hand_written_relays_table_is_relayed_as_is_in_mark_mode(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = unique("outbox_events");
    let (id, text, number, flag) = db.pick(
        ("uuid PRIMARY KEY", "text", "double precision", "boolean"),
        ("CHAR(36) PRIMARY KEY", "VARCHAR(64)", "DOUBLE", "BOOLEAN"),
        ("TEXT PRIMARY KEY", "TEXT", "REAL", "BOOLEAN"),
    );
    db.exec(&format!(
        "CREATE TABLE {table} (event_id {id}, aggregate_id {text}, event_type {text}, \
         payload text, created_at {number}, published {flag} DEFAULT false)"
    ))
    .await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    let t = &mut cfg.relay.tables[0];
    t.id_column = col("event_id");
    t.event_id_column = None;
    t.order_column = Some(col("created_at"));
    t.headers_column = None;
    t.aggregate_type_column = None;
    t.on_published = OnPublished::Mark;
    t.published_column = col("published");
    t.batch_size = 50;
    let daemon = Daemon::start(cfg).await;
    let (uuid, now) = db.pick(
        ("gen_random_uuid()", "extract(epoch from clock_timestamp())"),
        ("UUID()", "UNIX_TIMESTAMP(NOW(6))"),
        (
            "lower(hex(randomblob(16)))",
            "(julianday('now') - 2440587.5) * 86400.0",
        ),
    );
    write_in_background(&db, |n| {
        format!(
            "INSERT INTO {table} (event_id, aggregate_id, event_type, payload, created_at) \
             VALUES ({uuid}, 'k{}', '{table}', '{{\"n\": {n}}}', {now} + {n} * 0.000001)",
            n % 7
        )
    })
    .await;
    let marked = format!("SELECT count(*) FROM {table} WHERE published = true");
    eventually("every row marked", Duration::from_secs(20), || async {
        db.scalar(&marked).await == 200
    })
    .await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        200,
        Duration::from_millis(700),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 200);
    assert_first_deliveries_in_key_order(&received);
    assert_eq!(db.count_rows(&table).await, 200, "the rows are kept");
    // The epoch seconds were read as seconds: delays are short, not decades.
    let labels = [("table", table.as_str())];
    let count = daemon.metric("outboxd_relay_publish_delay_seconds_count", &labels);
    let sum = daemon.metric("outboxd_relay_publish_delay_seconds_sum", &labels);
    assert!(count >= 200.0 && sum / count < 30.0, "{sum} s over {count}");
    daemon.stop().await.unwrap();
}

/// The event store of an application that never updates or deletes its events.
async fn event_store(db: &TestDb) -> String {
    let table = unique("events");
    let (id, json) = db.pick(
        ("bigserial PRIMARY KEY", "jsonb"),
        ("", ""),
        ("INTEGER PRIMARY KEY", "TEXT"),
    );
    db.exec(&format!(
        "CREATE TABLE {table} (id {id}, aggregate_id text NOT NULL, event_type text NOT NULL, \
         version integer NOT NULL, timestamp double precision NOT NULL, data {json} NOT NULL, \
         metadata {json})"
    ))
    .await;
    table
}

fn cursor_config(db: &TestDb, table: &str, bootstrap: &str) -> outboxd::config::Config {
    let mut cfg = db.config(table, bootstrap);
    let t = &mut cfg.relay.tables[0];
    t.on_published = OnPublished::Cursor;
    t.key_column = col("aggregate_id");
    t.payload_column = col("data");
    t.headers_column = Some(col("metadata"));
    t.created_at_column = Some(col("timestamp"));
    t.event_id_column = None;
    t.aggregate_type_column = None;
    t.batch_size = 40;
    cfg
}

fn event_insert(db: &TestDb, table: &str, n: i64) -> String {
    let now = db.pick(
        "extract(epoch from clock_timestamp())",
        "",
        "(julianday('now') - 2440587.5) * 86400.0",
    );
    format!(
        "INSERT INTO {table} (aggregate_id, event_type, version, timestamp, data, metadata) \
         VALUES ('a{}', '{table}', {}, {now}, '{{\"n\": {n}}}', '{{\"tenant\": \"t{n}\"}}')",
        n % 5,
        n / 5
    )
}

on_backends!(an_event_store_is_relayed_in_cursor_mode_without_changing_a_row: postgres, sqlite);
async fn an_event_store_is_relayed_in_cursor_mode_without_changing_a_row(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = event_store(&db).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let cfg = cursor_config(&db, &table, &cluster.bootstrap_servers());
    let daemon = Daemon::start(cfg.clone()).await;
    write_in_background(&db, |n| event_insert(&db, &table, n)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        200,
        Duration::from_millis(700),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 200);
    assert_first_deliveries_in_key_order(&received);
    let r = received.iter().find(|r| r.n == 17).unwrap();
    assert_eq!(r.headers["tenant"], "t17", "metadata entries are headers");
    assert_eq!(db.count_rows(&table).await, 200, "no row deleted");
    // A restart goes on from the lane's position: nothing is sent again.
    daemon.stop().await.unwrap();
    let daemon = Daemon::start(cfg).await;
    db.exec(&event_insert(&db, &table, 200)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        201,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 201);
    daemon.stop().await.unwrap();
}

/// A transaction that took its id first but wrote after a later transaction began, and
/// commits seconds after that later transaction's row was published: its row still
/// arrives, once (a position by id alone would have passed over it).
#[tokio::test]
async fn cursor_mode_publishes_a_row_committed_late_behind_published_rows() {
    late_commit(false).await;
}

/// As above, with claims that read an index range of a transaction-id column.
#[tokio::test]
async fn cursor_claims_by_transaction_id_column_publish_a_row_committed_late() {
    late_commit(true).await;
}

/// Adds the transaction-id column `txid` and its index to `table`, as an operator does to
/// a store that is already relayed: the rows already there keep NULL.
async fn add_xid_column(db: &TestDb, table: &str) {
    db.exec(&format!(
        "ALTER TABLE {table} ADD COLUMN txid xid8; \
         ALTER TABLE {table} ALTER COLUMN txid SET DEFAULT pg_current_xact_id(); \
         CREATE INDEX {table}_xid ON {table} (txid, id)"
    ))
    .await;
}

fn with_xid_column(mut cfg: outboxd::config::Config) -> outboxd::config::Config {
    cfg.relay.tables[0].xid_column = Some(col("txid"));
    cfg
}

async fn late_commit(xid_column: bool) {
    let db = TestDb::new(Kind::Postgres).await;
    let table = event_store(&db).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 1);
    let mut cfg = cursor_config(&db, &table, &cluster.bootstrap_servers());
    if xid_column {
        add_xid_column(&db, &table).await;
        cfg = with_xid_column(cfg);
    }
    let daemon = Daemon::start(cfg).await;
    let mut early = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut late = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // `early` gets the older transaction id, `late` the lower row id.
    early
        .execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    late.execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    late.execute(event_insert(&db, &table, 0).as_str())
        .await
        .unwrap();
    early
        .execute(event_insert(&db, &table, 1).as_str())
        .await
        .unwrap();
    early.execute("COMMIT").await.unwrap();
    for n in 2..50 {
        db.exec(&event_insert(&db, &table, n)).await;
    }
    // Row 1 goes out while row 0's transaction is still open; the rows of transactions
    // younger than it wait for it.
    let first = consume(
        &cluster.bootstrap_servers(),
        &topic,
        1,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(first.iter().map(|r| r.n).collect::<Vec<_>>(), [1]);
    // Rows 2..49 are committed and must wait: the relay claims the table again and again
    // and finds nothing it may send.
    let empty = |d: &Daemon| d.metric("outboxd_relay_empty_claims_total", &[]);
    let before = empty(&daemon);
    eventually(
        "ten claims that held the younger rows back",
        Duration::from_secs(20),
        || async { empty(&daemon) >= before + 10.0 },
    )
    .await;
    late.execute("COMMIT").await.unwrap();
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        50,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 50);
    assert_eq!(
        received[1].n, 0,
        "the late row is next, before the younger ones"
    );
    daemon.stop().await.unwrap();
}

/// A store relayed in cursor mode without the transaction-id column gets one while rows
/// are waiting: the rows written before it (NULL) and after it each arrive once, in
/// per-key order, and the lane's position carries over.
#[tokio::test]
async fn a_transaction_id_column_added_to_a_relayed_store_passes_over_no_row() {
    let db = TestDb::new(Kind::Postgres).await;
    let table = event_store(&db).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let cfg = cursor_config(&db, &table, &cluster.bootstrap_servers());
    let daemon = Daemon::start(cfg.clone()).await;
    for n in 0..100 {
        db.exec(&event_insert(&db, &table, n)).await;
    }
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        100,
        Duration::from_millis(700),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 100);
    daemon.stop().await.unwrap();
    // Rows written while the relay is away, before and after the column.
    for n in 100..150 {
        db.exec(&event_insert(&db, &table, n)).await;
    }
    add_xid_column(&db, &table).await;
    for n in 150..200 {
        db.exec(&event_insert(&db, &table, n)).await;
    }
    let daemon = Daemon::start(with_xid_column(cfg)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        200,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 200);
    assert_first_deliveries_in_key_order(&received);
    // Once no NULL row is left after the position the claims read the index alone.
    for n in 200..240 {
        db.exec(&event_insert(&db, &table, n)).await;
    }
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        240,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 240);
    assert_first_deliveries_in_key_order(&received);
    daemon.stop().await.unwrap();
}

/// Debezium's outbox reference table with an order column added, and the configuration
/// from docs/debezium.md: the messages are what the outbox event router sends by default
/// (topic `outbox.event.{aggregatetype}`, key the aggregate id, value the payload, header
/// `id` the event id), read as its consumers read them.
#[tokio::test]
async fn debeziums_outbox_table_gives_the_routers_messages() {
    let db = TestDb::new(Kind::Postgres).await;
    let table = unique("outboxevent");
    db.exec(&format!(
        "CREATE TABLE {table} (id uuid NOT NULL PRIMARY KEY, aggregatetype varchar(255) NOT NULL, \
         aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb, \
         seq bigserial NOT NULL)"
    ))
    .await;
    let aggregate = format!("order{}", &table[table.len() - 6..]);
    let topic = format!("outbox.event.{aggregate}");
    let cluster = cluster(&topic, 1);
    let toml = std::fs::read_to_string("docs/debezium.md")
        .unwrap()
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("docs/debezium.md has the configuration")
        .replace("postgres://app@127.0.0.1:5432/app", &db.url)
        .replace("kafka-1:9092", &cluster.bootstrap_servers())
        .replace("table = \"outboxevent\"", &format!("table = \"{table}\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = outboxd::config::load(&path).unwrap();
    let daemon = Daemon::start(cfg).await;
    for n in 0..20 {
        db.exec(&format!(
            "INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload) VALUES \
             (gen_random_uuid(), '{aggregate}', 'o{}', 'OrderCreated', '{{\"n\": {n}}}')",
            n % 3
        ))
        .await;
    }
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        20,
        Duration::from_millis(700),
        Duration::from_secs(20),
    )
    .await;
    assert_each_once(&received, 20);
    let ids = db
        .pairs(&format!("SELECT id::text, aggregateid FROM {table}"))
        .await;
    assert!(ids.is_empty(), "published rows are deleted");
    for r in &received {
        assert_eq!(
            r.key,
            format!("o{}", r.n % 3),
            "the key is the aggregate id"
        );
        let value: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            value,
            serde_json::json!({ "n": r.n }),
            "the value is the payload"
        );
        let id = uuid::Uuid::parse_str(&r.headers["id"]).expect("header id is the event's uuid");
        assert!(!id.is_nil());
        let names: Vec<&str> = r.headers.keys().map(String::as_str).collect();
        assert_eq!(names, ["id"], "only the router's default header");
    }
    daemon.stop().await.unwrap();
}
