//! Rows and tables the relay cannot use as they are, on every backend: rows that cannot
//! become messages, rows that cannot be read, rows that would steer outboxd with their
//! topic or headers, a row Kafka refuses, and time columns of an unusable type. Each ends
//! as a dead row (or a refusal at start) with its reason, while the other rows flow.

use std::time::Duration;

use outboxd::config::{OnPublished, OptionValue};

use crate::backends::{on_backends, Kind, TestDb};
use crate::helpers::*;
use crate::relay_backends::setup;

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
    t.aggregate_type_column = None;
    t.event_id_column = None;
    t.created_at_column = None;
    t.notify_channel = None;
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

on_backends!(time_columns_of_an_unusable_type_are_named_at_start: postgres, mysql);
async fn time_columns_of_an_unusable_type_are_named_at_start(kind: Kind) {
    use outboxd::relay::store;
    let db = TestDb::new(kind).await;
    let table = unique("coltypes");
    let id = db.pick(
        "bigserial PRIMARY KEY",
        "BIGINT AUTO_INCREMENT PRIMARY KEY",
        "",
    );
    // Epoch numbers and boolean marks are usable; text is neither a time nor a flag.
    db.exec(&format!(
        "CREATE TABLE {table} (id {id}, aggregate_id text, event_type text, payload text, \
         created_at text, epoch_ms bigint, published text, flag boolean)"
    ))
    .await;
    let mut cfg = db.config(&table, "127.0.0.1:9");
    let t = &mut cfg.relay.tables[0];
    t.aggregate_type_column = None;
    t.event_id_column = None;
    t.headers_column = None;
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
    for part in [
        format!("table `{table}`"),
        "column `created_at` (relay.tables.created_at_column)".to_owned(),
        "type text".to_owned(),
        "a time type or a number of Unix epoch seconds or milliseconds".to_owned(),
        "created_at_column = \"\"".to_owned(),
    ] {
        assert!(why.contains(&part), "`{part}` not in: {why}");
    }
    let t = &mut cfg.relay.tables[0];
    t.created_at_column = Some(col("epoch_ms"));
    assert_eq!(open(t.clone()).await, None, "usable with epoch numbers");
    t.on_published = OnPublished::Mark;
    t.published_column = col("published");
    let why = open(t.clone()).await.expect("refused in mark mode");
    assert!(
        why.contains("column `published` (relay.tables.published_column)")
            && why.contains("a boolean (set to true)"),
        "{why}"
    );
    t.published_column = col("flag");
    assert_eq!(open(t.clone()).await, None, "usable with a boolean mark");
}
