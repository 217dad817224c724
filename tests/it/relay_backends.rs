//! The relay suite every backend must pass (PostgreSQL, MySQL/MariaDB, SQLite): delivery
//! in key order, a batch failing part-way, broker down, rows that cannot become messages,
//! a row Kafka refuses, mark mode; lanes > 1 where a backend has them. Shutdown while
//! Kafka is down is in `relay_shutdown.rs`.

use std::time::Duration;

use outboxd::config::{OnPublished, OptionValue};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::backends::{on_backends, Kind, TestDb};
use crate::helpers::*;

/// A migrated database of `kind`, a fresh outbox table, its topic and a mock cluster.
pub(crate) async fn setup(
    kind: Kind,
    prefix: &str,
    partitions: i32,
) -> (TestDb, String, String, Cluster) {
    let db = TestDb::new(kind).await;
    let table = db.outbox_table(prefix).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, partitions);
    (db, table, topic, cluster)
}

on_backends!(delivery_in_key_order: postgres, mysql, sqlite);
async fn delivery_in_key_order(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "deliver", 4).await;
    db.insert_rows(&table, 0, 10_000, 100).await;
    let daemon = Daemon::start(db.config(&table, &cluster.bootstrap_servers())).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        10_000,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    assert_exactly_once(&received, 0, 10_000);
    assert_first_deliveries_in_key_order(&received);
    let first = &received[0];
    assert_eq!(first.headers["event-type"], table);
    assert_eq!(first.headers["aggregate-type"], "account");
    assert_eq!(first.event_id().len(), 36, "event-id is the row's uuid");
    let partitions_per_key = received.iter().fold(
        std::collections::HashMap::<&str, std::collections::HashSet<i32>>::new(),
        |mut m, r| {
            m.entry(&r.key).or_default().insert(r.partition);
            m
        },
    );
    assert!(partitions_per_key.values().all(|p| p.len() == 1));
    assert_eq!(db.count_rows(&table).await, 0);
    eventually(
        "published metric reaches 10000",
        Duration::from_secs(5),
        || async {
            daemon.metric(
                "outboxd_relay_published_total",
                &[("table", &table), ("topic", &topic)],
            ) == 10_000.0
        },
    )
    .await;
    // The publish delay histogram saw every row: created_at was read as a time.
    assert_eq!(
        daemon.metric(
            "outboxd_relay_publish_delay_seconds_count",
            &[("table", &table)]
        ),
        10_000.0
    );
    // Every batch counted its claim, its wait for Kafka and its commit, once each.
    let phase = |phase: &str| {
        daemon.metric(
            "outboxd_relay_batch_phase_seconds_count",
            &[("table", &table), ("phase", phase)],
        )
    };
    let claims = phase("claim");
    assert!(
        claims >= 10.0,
        "10,000 rows in batches of at most 1,000: {claims}"
    );
    assert_eq!(phase("kafka"), claims);
    assert_eq!(phase("commit"), claims);
    daemon.stop().await.unwrap();
}

on_backends!(batch_failing_part_way_is_published_again_in_order: postgres, mysql, sqlite);
async fn batch_failing_part_way_is_published_again_in_order(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "partial", 4).await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].batch_size = 500;
    db.insert_rows(&table, 0, 3000, 40).await;
    // The first produce requests succeed, later ones are refused with a non-retriable
    // error, so the first batch fails part-way; afterwards the broker accepts everything.
    let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR; 2];
    errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3]);
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let daemon = Daemon::start(cfg).await;
    db.drained(&table, Duration::from_secs(40)).await;
    assert!(
        daemon.metric(
            "outboxd_relay_publish_errors_total",
            &[("table", &table), ("kind", "kafka")]
        ) >= 1.0,
        "the injected errors failed part of a batch"
    );
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        3000,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_at_least_once(&received, 0, 3000);
    assert_last_deliveries_in_key_order(&received);
    daemon.stop().await.unwrap();
}

on_backends!(broker_down_loses_nothing_and_resumes: postgres, mysql, sqlite);
async fn broker_down_loses_nothing_and_resumes(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "brokerdown", 2).await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    cfg.kafka
        .options
        .insert("message.timeout.ms".into(), OptionValue::Int(300));
    cfg.relay.tables[0].batch_size = 100;
    db.insert_rows(&table, 0, 1000, 20).await;
    let daemon = Daemon::start(cfg).await;
    eventually("first rows published", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_published_total", &[("table", &table)]) >= 1000.0
    })
    .await;

    cluster.broker_down(1).unwrap();
    db.insert_rows(&table, 1000, 1000, 20).await;
    let batches_before = daemon.metric("outboxd_relay_batch_rows_count", &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attempts = daemon.metric("outboxd_relay_batch_rows_count", &[]) - batches_before;
    assert!(attempts >= 1.0, "the relay kept trying");
    // Without backoff a 300 ms delivery timeout allows ~13 attempts in 4 s; with
    // exponential backoff from 100 ms it is about 5.
    assert!(
        attempts <= 8.0,
        "{attempts} claim attempts in 4 s: hot loop while the broker is down"
    );
    assert!(daemon.metric("outboxd_relay_publish_errors_total", &[("kind", "kafka")]) >= 1.0);
    assert_eq!(
        db.count_rows(&table).await,
        1000,
        "nothing leaves the outbox while Kafka is down"
    );

    cluster.broker_up(1).unwrap();
    db.drained(&table, Duration::from_secs(40)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        2000,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_at_least_once(&received, 0, 2000);
    assert_first_deliveries_in_key_order(&received);
    daemon.stop().await.unwrap();
}

/// A hand-made outbox with loose types: `id`, `aggregate_id` of `key_type` (nullable),
/// `event_type`, `payload` and `headers` as text.
async fn loose_table(db: &TestDb, prefix: &str, key_type: &str) -> String {
    let table = unique(prefix);
    let id = db.pick(
        "bigserial PRIMARY KEY",
        "BIGINT AUTO_INCREMENT PRIMARY KEY",
        "INTEGER PRIMARY KEY AUTOINCREMENT",
    );
    db.exec(&format!(
        "CREATE TABLE {table} (id {id}, aggregate_id {key_type}, event_type text, payload text, headers text)"
    ))
    .await;
    table
}

/// A relay of a [`loose_table`] with `topic`, mapping only the columns it has.
fn loose_config(db: &TestDb, table: &str, topic: &str, bootstrap: &str) -> outboxd::config::Config {
    let mut cfg = db.config(table, bootstrap);
    let t = &mut cfg.relay.tables[0];
    t.topic = Some(topic.to_owned());
    t.aggregate_type_column = String::new();
    t.event_id_column = String::new();
    t.created_at_column = String::new();
    t.notify_channel = String::new();
    cfg
}

/// What `topic` holds once `expected` messages arrived and no more came for 300 ms.
async fn published(cluster: &Cluster, topic: &str, expected: usize) -> Vec<Received> {
    let bootstrap = cluster.bootstrap_servers();
    let (settle, timeout) = (Duration::from_millis(300), Duration::from_secs(10));
    consume(&bootstrap, topic, expected, settle, timeout).await
}

/// `(row id, reason)` of `table`'s dead rows, by row id.
async fn dead_rows(db: &TestDb, table: &str) -> Vec<(String, String)> {
    let as_int = db.pick(
        "row_id::int8",
        "CAST(row_id AS SIGNED)",
        "CAST(row_id AS INTEGER)",
    );
    db.pairs(&format!(
        "SELECT row_id, reason FROM outboxd_dead_rows WHERE source_table = '{table}' ORDER BY {as_int}"
    ))
    .await
}

on_backends!(rows_that_cannot_become_messages_go_to_dead_rows: postgres, mysql, sqlite);
async fn rows_that_cannot_become_messages_go_to_dead_rows(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = loose_table(&db, "badrows", "text").await;
    db.exec(&format!(
        "INSERT INTO {table} (aggregate_id, event_type, payload, headers) VALUES
             ('k1', 'ok', '{{\"n\": 0}}', NULL),
             (NULL, 'ok', '{{\"n\": 1}}', NULL),
             ('k1', 'ok', NULL, NULL),
             ('k2', 'ok', '{{\"n\": 3}}', '{{not json'),
             ('k2', 'bad topic!', '{{\"n\": 4}}', NULL),
             ('k3', 'ok', '{{\"n\": 5}}', '{{\"h\": \"v\"}}')"
    ))
    .await;
    let topic = format!("{table}.ok");
    let cluster = cluster(&topic, 1);
    let template = format!("{table}.{{event_type}}");
    let cfg = loose_config(&db, &table, &template, &cluster.bootstrap_servers());
    let daemon = Daemon::start(cfg).await;
    db.drained(&table, Duration::from_secs(15)).await;
    let dead = dead_rows(&db, &table).await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(dead.len(), 4, "{reasons:?}");
    assert!(reasons[0].contains("key column is NULL"), "{reasons:?}");
    assert!(reasons[1].contains("payload column is NULL"), "{reasons:?}");
    assert!(reasons[2].contains("not valid JSON"), "{reasons:?}");
    assert!(
        reasons[3].contains("not a valid Kafka topic name"),
        "{reasons:?}"
    );
    let received = published(&cluster, &topic, 2).await;
    let ns: Vec<i64> = received.iter().map(|r| r.n).collect();
    assert_eq!(ns, vec![0, 5]);
    assert_eq!(
        received[0].event_id(),
        "1",
        "without event_id_column the id is the event id"
    );
    assert_eq!(received[1].headers["h"], "v");
    assert_eq!(
        daemon.metric("outboxd_relay_dead_rows_total", &[("table", &table)]),
        4.0
    );
    daemon.stop().await.unwrap();
}

on_backends!(a_row_that_cannot_be_read_becomes_a_dead_row_and_the_rest_flow: mysql, sqlite);
async fn a_row_that_cannot_be_read_becomes_a_dead_row_and_the_rest_flow(kind: Kind) {
    let db = TestDb::new(kind).await;
    let key_type = db.pick("bytea", "VARBINARY(64)", "BLOB");
    let table = loose_table(&db, "unreadable", key_type).await;
    // A key that is not UTF-8 between rows of other keys.
    let bad_key = db.pick("'\\xff00'::bytea", "X'FF00'", "X'FF00'");
    db.exec(&format!(
        "INSERT INTO {table} (aggregate_id, event_type, payload) VALUES ('k1', 'ok', '{{\"n\": 0}}');
         INSERT INTO {table} (aggregate_id, event_type, payload) VALUES ({bad_key}, 'ok', '{{\"n\": 1}}');
         INSERT INTO {table} (aggregate_id, event_type, payload) VALUES ('k2', 'ok', '{{\"n\": 2}}')"
    ))
    .await;
    let topic = format!("{table}.ok");
    let cluster = cluster(&topic, 1);
    let template = format!("{table}.{{event_type}}");
    let cfg = loose_config(&db, &table, &template, &cluster.bootstrap_servers());
    let daemon = Daemon::start(cfg).await;
    db.drained(&table, Duration::from_secs(15)).await;
    daemon.stop().await.unwrap();
    let dead = dead_rows(&db, &table).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "2");
    assert!(dead[0].1.contains("key_column cannot be read"), "{dead:?}");
    let received = published(&cluster, &topic, 2).await;
    let ns: Vec<i64> = received.iter().map(|r| r.n).collect();
    assert_eq!(ns, vec![0, 2]);
}

on_backends!(rows_may_not_steer_outboxd_with_their_topic_or_headers: postgres, mysql, sqlite);
async fn rows_may_not_steer_outboxd_with_their_topic_or_headers(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = loose_table(&db, "steer", "text").await;
    let topic = format!("{table}.ok");
    db.exec(&format!(
        "INSERT INTO {table} (aggregate_id, event_type, payload, headers) VALUES
             ('k1', '{topic}', '{{\"n\": 0}}', NULL),
             ('k2', 'victim', '{{\"n\": 1}}', NULL),
             ('k3', '{topic}', '{{\"n\": 2}}', '{{\"outboxd-dlt-original-topic\": \"victim\"}}'),
             ('k4', '{topic}', '{{\"n\": 3}}', '{{\"outboxd-replay-count\": \"0\"}}'),
             ('k5', '{topic}', '{{\"n\": 4}}', '{{\"tenant\": \"a\"}}')"
    ))
    .await;
    let cluster = cluster(&topic, 1);
    cluster.create_topic("victim", 1, 1).unwrap();
    // The row's event type is its whole topic.
    let mut cfg = loose_config(&db, &table, "{event_type}", &cluster.bootstrap_servers());
    cfg.relay.tables[0].allowed_topics = vec![format!("{table}.o?")];
    let daemon = Daemon::start(cfg).await;
    db.drained(&table, Duration::from_secs(15)).await;
    daemon.stop().await.unwrap();
    let dead = dead_rows(&db, &table).await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(dead.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("topic `victim` is not in allowed_topics"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("`outboxd-dlt-original-topic`"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("`outboxd-replay-count`"), "{reasons:?}");
    let received = published(&cluster, &topic, 2).await;
    let ns: Vec<i64> = received.iter().map(|r| r.n).collect();
    assert_eq!(ns, vec![0, 4]);
    let victim = consume(
        &cluster.bootstrap_servers(),
        "victim",
        1,
        Duration::from_millis(300),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        victim.is_empty(),
        "a row reached a topic it may not: {victim:?}"
    );
}

on_backends!(refused_row_moves_to_dead_rows_while_other_keys_flow: postgres, mysql, sqlite);
async fn refused_row_moves_to_dead_rows_while_other_keys_flow(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "poison", 2).await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    cfg.kafka
        .options
        .insert("message.max.bytes".into(), OptionValue::Int(20_000));
    cfg.relay.tables[0].max_attempts = 3;
    db.insert_rows(&table, 0, 100, 10).await;
    let big = db.pick(
        "jsonb_build_object('n', 100, 'blob', repeat('x', 50000))",
        "JSON_OBJECT('n', 100, 'blob', REPEAT('x', 50000))",
        "json_object('n', 100, 'blob', replace(hex(zeroblob(50000)), '00', 'x'))",
    );
    let small = db.pick(
        "jsonb_build_object('n', 101)",
        "JSON_OBJECT('n', 101)",
        "json_object('n', 101)",
    );
    // A later row of the same key waits behind the poison row, then flows.
    db.exec(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('account', 'poison', '{table}', {big});
         INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('account', 'poison', '{table}', {small});"
    ))
    .await;
    db.insert_rows(&table, 102, 100, 10).await;

    let daemon = Daemon::start(cfg).await;
    db.drained(&table, Duration::from_secs(30)).await;
    let data = db.pick("row_data::text", "CAST(row_data AS CHAR)", "row_data");
    let dead = db
        .pairs(&format!(
            "SELECT reason, {data} FROM outboxd_dead_rows WHERE source_table = '{table}'"
        ))
        .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (reason, row_data) = &dead[0];
    assert!(
        reason.contains("refused it 3 times") && reason.to_lowercase().contains("too large"),
        "{reason}"
    );
    assert!(
        row_data.contains("poison") && row_data.contains("xxxxxxxx"),
        "the whole row is kept"
    );
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        201,
        Duration::from_millis(300),
        Duration::from_secs(20),
    )
    .await;
    let got: std::collections::HashSet<i64> = received.iter().map(|r| r.n).collect();
    assert!(!got.contains(&100));
    for n in (0..100).chain(101..202) {
        assert!(got.contains(&n), "row {n} was not published");
    }
    assert_first_deliveries_in_key_order(&received);
    assert_eq!(
        daemon.metric("outboxd_relay_dead_rows_total", &[("table", &table)]),
        1.0
    );
    let leftover = db
        .scalar(&format!(
            "SELECT count(*) FROM outboxd_relay_attempts WHERE source_table = '{table}'"
        ))
        .await;
    assert_eq!(leftover, 0, "attempt counters of dead rows are removed");

    if kind == Kind::Postgres {
        // The README's requeue recipe puts the row back; still too large, it dies again.
        db.exec(&format!(
            "INSERT INTO {table} SELECT * FROM jsonb_populate_record(NULL::{table},
                 (SELECT row_data FROM outboxd_dead_rows WHERE source_table = '{table}'));
             DELETE FROM outboxd_dead_rows WHERE source_table = '{table}';"
        ))
        .await;
        eventually(
            "requeued row dead again",
            Duration::from_secs(20),
            || async {
                daemon.metric("outboxd_relay_dead_rows_total", &[("table", &table)]) == 2.0
            },
        )
        .await;
        let n = db
            .scalar(&format!(
                "SELECT (row_data->'payload'->>'n')::int8 FROM outboxd_dead_rows WHERE source_table = '{table}'"
            ))
            .await;
        assert_eq!(n, 100, "the requeued row is the original one");
    }
    daemon.stop().await.unwrap();
}

on_backends!(mark_mode_marks_rows_and_purges_them_after_retention: postgres, mysql, sqlite);
async fn mark_mode_marks_rows_and_purges_them_after_retention(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "mark", 2).await;
    let ty = db.pick("timestamptz", "TIMESTAMP(6) NULL", "TEXT");
    db.exec(&format!("ALTER TABLE {table} ADD COLUMN published_at {ty}"))
        .await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].on_published = OnPublished::Mark;
    cfg.relay.tables[0].retention = Duration::from_secs(3);
    db.insert_rows(&table, 0, 300, 10).await;
    let daemon = Daemon::start(cfg).await;

    let marked = format!("SELECT count(*) FROM {table} WHERE published_at IS NOT NULL");
    eventually("all rows marked", Duration::from_secs(10), || async {
        db.scalar(&marked).await == 300
    })
    .await;
    // Published exactly once: a marked row is never claimed again.
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        300,
        Duration::from_millis(700),
        Duration::from_secs(20),
    )
    .await;
    assert_exactly_once(&received, 0, 300);
    assert_eq!(
        db.count_rows(&table).await,
        300,
        "nothing purged before retention"
    );
    db.drained(&table, Duration::from_secs(15)).await;
    daemon.stop().await.unwrap();
}

on_backends!(two_relays_share_lanes_and_the_survivor_takes_all: postgres, mysql);
async fn two_relays_share_lanes_and_the_survivor_takes_all(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "lanes", 4).await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].lanes = 4;
    cfg.relay.tables[0].batch_size = 200;
    let a = Daemon::start(cfg.clone()).await;
    let b = Daemon::start(cfg).await;
    let owned = |d: &Daemon| d.metric("outboxd_relay_lanes_owned", &[("table", &table)]);
    eventually("lanes split 2/2", Duration::from_secs(15), || async {
        owned(&a) == 2.0 && owned(&b) == 2.0
    })
    .await;

    db.insert_rows(&table, 0, 4000, 100).await;
    db.drained(&table, Duration::from_secs(30)).await;
    let published = |d: &Daemon| d.metric("outboxd_relay_published_total", &[("table", &table)]);
    // A lane counts its batch right after the commit that emptied the table.
    eventually("every row counted", Duration::from_secs(5), || async {
        published(&a) + published(&b) == 4000.0
    })
    .await;
    assert!(
        published(&a) > 0.0 && published(&b) > 0.0,
        "both relays published"
    );

    a.stop().await.unwrap();
    eventually(
        "survivor owns all lanes",
        Duration::from_secs(15),
        || async { owned(&b) == 4.0 },
    )
    .await;
    db.insert_rows(&table, 4000, 2000, 100).await;
    db.drained(&table, Duration::from_secs(30)).await;

    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        6000,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_exactly_once(&received, 0, 6000);
    assert_first_deliveries_in_key_order(&received);
    b.stop().await.unwrap();
}

/// The SQLite lane lock belongs to the database file: a relay in another process that
/// reaches the file through a symlink keeps this one out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lane_lock_holds_across_paths_and_processes() {
    let (db, table, topic, cluster) = setup(Kind::Sqlite, "paths", 1).await;
    let file = db
        .url
        .trim_start_matches("sqlite://")
        .trim_end_matches("?mode=rwc")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("same.db");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let toml = format!(
        "[database]\nurl = \"sqlite://{}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\npoll_interval = \"100ms\"\n\
         notify_channel = \"\"\nrebalance_interval = \"300ms\"\n",
        link.display(),
        cluster.bootstrap_servers()
    );
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, &toml).unwrap();
    let mut other = std::process::Command::new(crate::cli::BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the other process owns the lane",
        Duration::from_secs(20),
        || async {
            let (code, out, _) = crate::cli::run_with(&["status", "--json"], &toml, &[]);
            code == 0
                && serde_json::from_str::<serde_json::Value>(&out).unwrap()["relay"][0]["owners"]
                    .as_array()
                    .is_some_and(|o| o.len() == 1)
        },
    )
    .await;
    let here = Daemon::start(db.config(&table, &cluster.bootstrap_servers())).await;
    db.insert_rows(&table, 0, 300, 10).await;
    db.drained(&table, Duration::from_secs(20)).await;
    let owned = here.metric("outboxd_relay_lanes_owned", &[("table", &table)]);
    let (code, _) = terminate(&mut other, Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        owned, 0.0,
        "the relay reaching the file by its own path stayed out"
    );
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        300,
        Duration::from_millis(300),
        Duration::from_secs(20),
    )
    .await;
    assert_exactly_once(&received, 0, 300);
    here.stop().await.unwrap();
}

/// SQLite has one writer: a second relay on the same file waits for the lane lock and
/// takes over when the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_second_relay_waits_for_the_lane_and_takes_over() {
    let (db, table, topic, cluster) = setup(Kind::Sqlite, "standby", 2).await;
    let cfg = db.config(&table, &cluster.bootstrap_servers());
    let a = Daemon::start(cfg.clone()).await;
    let owned = |d: &Daemon| d.metric("outboxd_relay_lanes_owned", &[("table", &table)]);
    eventually(
        "first relay owns the lane",
        Duration::from_secs(10),
        || async { owned(&a) == 1.0 },
    )
    .await;
    let b = Daemon::start(cfg).await;
    db.insert_rows(&table, 0, 500, 10).await;
    db.drained(&table, Duration::from_secs(20)).await;
    assert_eq!(owned(&b), 0.0, "the lane lock keeps the second relay out");
    a.stop().await.unwrap();
    eventually(
        "standby takes the lane",
        Duration::from_secs(10),
        || async { owned(&b) == 1.0 },
    )
    .await;
    db.insert_rows(&table, 500, 500, 10).await;
    db.drained(&table, Duration::from_secs(20)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        1000,
        Duration::from_millis(500),
        Duration::from_secs(20),
    )
    .await;
    assert_exactly_once(&received, 0, 1000);
    b.stop().await.unwrap();
}

on_backends!(time_columns_of_an_unusable_type_are_named_at_start: postgres, mysql);
async fn time_columns_of_an_unusable_type_are_named_at_start(kind: Kind) {
    use outboxd::relay::store;
    let db = TestDb::new(kind).await;
    let table = unique("epoch");
    let (id, number, flag) = db.pick(
        ("bigserial PRIMARY KEY", "double precision", "boolean"),
        ("BIGINT AUTO_INCREMENT PRIMARY KEY", "DOUBLE", "BOOLEAN"),
        ("", "", ""),
    );
    db.exec(&format!(
        "CREATE TABLE {table} (id {id}, aggregate_id text, event_type text, payload text, \
         created_at {number}, published {flag})"
    ))
    .await;
    let mut cfg = db.config(&table, "127.0.0.1:9");
    let t = &mut cfg.relay.tables[0];
    t.aggregate_type_column = String::new();
    t.event_id_column = String::new();
    t.headers_column = String::new();
    let database = outboxd::db::Database::open(&cfg.database).unwrap();
    let open = |t: outboxd::config::TableConfig| {
        let database = database.clone();
        async move {
            store::open(&database, &t)
                .await
                .err()
                .map(|e| e.to_string())
        }
    };
    let why = open(cfg.relay.tables[0].clone()).await.expect("refused");
    let (shown, wanted) = db.pick(
        ("double precision", "timestamptz"),
        ("double", "DATETIME"),
        ("", ""),
    );
    for part in [
        format!("table `{table}`"),
        "column `created_at` (relay.tables.created_at_column)".to_owned(),
        format!("type {shown}"),
        wanted.to_owned(),
        "created_at_column = \"\"".to_owned(),
    ] {
        assert!(why.contains(&part), "`{part}` not in: {why}");
    }
    let t = &mut cfg.relay.tables[0];
    t.created_at_column = String::new();
    assert_eq!(open(t.clone()).await, None, "usable without created_at");
    t.on_published = OnPublished::Mark;
    t.published_at_column = "published".into();
    let why = open(t.clone()).await.expect("refused in mark mode");
    assert!(
        why.contains("column `published` (relay.tables.published_at_column)"),
        "{why}"
    );
}

on_backends!(key_order_holds_while_maintenance_purges_and_cleans_up: mysql);
async fn key_order_holds_while_maintenance_purges_and_cleans_up(kind: Kind) {
    let (db, table, topic, cluster) = setup(kind, "maint", 2).await;
    db.exec(&format!(
        "ALTER TABLE {table} ADD COLUMN published_at TIMESTAMP(6) NULL"
    ))
    .await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    let t = &mut cfg.relay.tables[0];
    t.on_published = OnPublished::Mark;
    // Maintenance all the time: purges of rows marked a moment ago, counter cleanups.
    t.retention = Duration::from_millis(1);
    t.maintenance_interval = Duration::from_millis(10);
    t.lanes = 2;
    t.batch_size = 50;
    t.poll_interval = Duration::from_millis(20);
    let daemon = Daemon::start(cfg).await;
    let total = 6000;
    for first in (0..total).step_by(100) {
        db.insert_rows(&table, first, 100, 7).await;
    }
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        total as usize,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    daemon.stop().await.unwrap();
    assert_at_least_once(&received, 0, total);
    assert_first_deliveries_in_key_order(&received);
}
