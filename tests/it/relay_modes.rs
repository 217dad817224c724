//! `mark` mode with its retention purge, and rows that cannot become messages.

use std::time::Duration;

use outboxd::config::OnPublished;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_mode_marks_rows_and_purges_them_after_retention() {
    let pool = db().await;
    let table = outbox_table(&pool, "mark").await;
    sqlx::query(&format!(
        "ALTER TABLE {table} ADD COLUMN published_at timestamptz"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].on_published = OnPublished::Mark;
    cfg.relay.tables[0].retention = Duration::from_secs(3);
    insert_rows(&pool, &table, 0, 300, 10).await;
    let daemon = Daemon::start(cfg).await;

    eventually("all rows marked", Duration::from_secs(10), || async {
        marked(&pool, &table).await == 300
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
        count_rows(&pool, &table).await,
        300,
        "nothing purged before retention"
    );

    drained(&pool, &table, Duration::from_secs(15)).await;
    daemon.stop().await.unwrap();
}

async fn marked(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE published_at IS NOT NULL"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_cannot_become_messages_go_to_dead_rows_with_a_reason() {
    let pool = db().await;
    let table = unique("badrows");
    // A hand-made outbox with loose types: nullable key and payload, headers as text.
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (
             id bigserial PRIMARY KEY,
             aggregate_id text,
             event_type text,
             payload text,
             headers text);
         INSERT INTO {table} (aggregate_id, event_type, payload, headers) VALUES
             ('k1', 'ok', '{{\"n\": 0}}', NULL),
             (NULL, 'ok', '{{\"n\": 1}}', NULL),
             ('k1', 'ok', NULL, NULL),
             ('k2', 'ok', '{{\"n\": 3}}', '{{not json'),
             ('k2', 'bad topic!', '{{\"n\": 4}}', NULL),
             ('k3', 'ok', '{{\"n\": 5}}', '{{\"h\": \"v\"}}');"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let topic = format!("{table}.ok");
    let cluster = cluster(&topic, 1);
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    let t = &mut cfg.relay.tables[0];
    t.topic = Some(format!("{table}.{{event_type}}"));
    t.aggregate_type_column = String::new();
    t.event_id_column = String::new();
    t.created_at_column = String::new();
    t.notify_channel = String::new();
    let daemon = Daemon::start(cfg).await;
    drained(&pool, &table, Duration::from_secs(15)).await;
    let dead: Vec<(String, String)> = sqlx::query_as(
        "SELECT row_id, reason FROM outboxd_dead_rows WHERE source_table = $1 ORDER BY row_id::int8",
    )
    .bind(&table)
    .fetch_all(&pool)
    .await
    .unwrap();
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(dead.len(), 4, "{reasons:?}");
    assert!(reasons[0].contains("key column is NULL"), "{reasons:?}");
    assert!(reasons[1].contains("payload column is NULL"), "{reasons:?}");
    assert!(reasons[2].contains("not valid JSON"), "{reasons:?}");
    assert!(
        reasons[3].contains("not a valid Kafka topic name"),
        "{reasons:?}"
    );
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        2,
        Duration::from_millis(300),
        Duration::from_secs(10),
    )
    .await;
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
