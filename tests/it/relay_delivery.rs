//! Happy-path delivery: exactly once in steady state, per-key order, headers, metrics,
//! NOTIFY wake-up, a Debezium-style table through the column mapping, the HTTP endpoint.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_json_and_traceparent_become_kafka_headers() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("headers", 1).await;
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ('account', 'a1', '{table}', '{{\"n\": 1}}',
                 '{{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\", \"tenant\": \"acme\", \"retries\": 3}}')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let daemon = Daemon::start(config(&table, &cluster.bootstrap_servers())).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        1,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .await;
    let h = &received[0].headers;
    assert_eq!(
        h["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(h["tenant"], "acme");
    assert_eq!(h["retries"], "3");
    assert_eq!(received[0].key, "a1");
    assert_eq!(received[0].payload, br#"{"n": 1}"#);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_relay_long_before_the_poll_interval() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("notify", 1).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].poll_interval = Duration::from_secs(3600);
    let daemon = Daemon::start(cfg).await;
    eventually("lane owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[("table", &table)]) == 1.0
    })
    .await;
    // Let the first (empty) claim happen and the lane go to sleep on its 1 h poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inserted = std::time::Instant::now();
    insert_rows(&pool, &table, 0, 1, 1).await;
    eventually("row published", Duration::from_secs(5), || async {
        daemon.metric("outboxd_relay_published_total", &[("table", &table)]) == 1.0
    })
    .await;
    assert!(inserted.elapsed() < Duration::from_secs(5));
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        1,
        Duration::ZERO,
        Duration::from_secs(10),
    )
    .await;
    assert_exactly_once(&received, 0, 1);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_style_table_is_relayed_through_the_column_mapping() {
    let pool = db().await;
    let table = unique("debezium");
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (
             id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
             aggregatetype varchar(255) NOT NULL,
             aggregateid varchar(255) NOT NULL,
             type varchar(255) NOT NULL,
             payload jsonb,
             seq bigserial NOT NULL UNIQUE);
         INSERT INTO {table} (aggregatetype, aggregateid, type, payload)
         SELECT '{table}', 'order-' || (g % 7), 'OrderCreated', jsonb_build_object('n', g)
         FROM generate_series(0, 499) g ORDER BY g;"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let topic = format!("outbox.event.{table}");
    let cluster = cluster(&topic, 3);
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    let t = &mut cfg.relay.tables[0];
    t.topic = Some("outbox.event.{aggregatetype}".into());
    t.id_column = col("id");
    t.order_column = Some(col("seq"));
    t.event_id_column = Some(col("id"));
    t.key_column = col("aggregateid");
    t.event_type_column = Some(col("type"));
    t.aggregate_type_column = Some(col("aggregatetype"));
    t.headers_column = None;
    t.created_at_column = None;
    t.notify_channel = None;
    t.batch_size = 64;
    let daemon = Daemon::start(cfg).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        500,
        Duration::from_millis(300),
        Duration::from_secs(30),
    )
    .await;
    assert_exactly_once(&received, 0, 500);
    assert_first_deliveries_in_key_order(&received);
    assert_eq!(received[0].headers["event-type"], "OrderCreated");
    assert_eq!(received[0].event_id().len(), 36);
    assert_eq!(count_rows(&pool, &table).await, 0);
    daemon.stop().await.unwrap();
}

/// A `bytea` payload goes out as its exact bytes (not UTF-8, not hex), a `text` payload as
/// its UTF-8 bytes, and headers `{}` add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_and_text_payloads_are_sent_as_their_bytes() {
    let pool = db().await;
    let mut cases = Vec::new();
    for (kind, ty, value, expected) in [
        (
            "bytea",
            "bytea",
            "'\\x00ff80c328'::bytea",
            &b"\x00\xff\x80\xc3\x28"[..],
        ),
        (
            "text",
            "text",
            "'caf\u{e9} \"x\"'",
            "caf\u{e9} \"x\"".as_bytes(),
        ),
    ] {
        let table = unique(kind);
        sqlx::raw_sql(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, aggregate_id text NOT NULL,
                 payload {ty} NOT NULL, headers jsonb NOT NULL DEFAULT '{{}}');
             INSERT INTO {table} (aggregate_id, payload) VALUES ('k', {value});"
        ))
        .execute(&pool)
        .await
        .unwrap();
        cases.push((table, expected));
    }
    for (table, expected) in cases {
        let topic = topic_of(&table);
        let cluster = cluster(&topic, 1);
        let mut cfg = config(&table, &cluster.bootstrap_servers());
        let t = &mut cfg.relay.tables[0];
        t.topic = Some(topic.clone());
        t.event_type_column = None;
        t.aggregate_type_column = None;
        t.event_id_column = None;
        t.created_at_column = None;
        t.notify_channel = None;
        let daemon = Daemon::start(cfg).await;
        let received = consume(
            &cluster.bootstrap_servers(),
            &topic,
            1,
            Duration::from_millis(200),
            Duration::from_secs(30),
        )
        .await;
        daemon.stop().await.unwrap();
        assert_eq!(received.len(), 1, "{table}");
        assert_eq!(received[0].payload, expected, "{table}");
        assert_eq!(
            received[0].headers.keys().collect::<Vec<_>>(),
            ["event-id"],
            "{table}: only the event id (the row id) as a header"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_serves_metrics_health_and_readiness() {
    let Relayed {
        pool,
        table,
        topic: _,
        cluster,
    } = relayed("http", 1).await;
    insert_rows(&pool, &table, 0, 10, 2).await;
    let daemon = Daemon::start(config(&table, &cluster.bootstrap_servers())).await;
    eventually("published", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_published_total", &[("table", &table)]) == 10.0
    })
    .await;
    assert_eq!(http_get(daemon.http_addr, "/healthz").await.0, 200);
    let (status, body) = http_get(daemon.http_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(daemon.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "outboxd_relay_published_total",
        "outboxd_relay_batch_rows_bucket",
        "outboxd_relay_publish_delay_seconds_bucket",
        "outboxd_relay_lanes_owned",
        "outboxd_build_info",
        "outboxd_up 1",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    // Kafka gone: not ready, with the reason.
    cluster.broker_down(1).unwrap();
    let (status, body) = http_get(daemon.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("kafka"), "{body}");
    cluster.broker_up(1).unwrap();
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tables_are_relayed_at_once() {
    let pool = db().await;
    let first = outbox_table(&pool, "multi_a").await;
    let second = outbox_table(&pool, "multi_b").await;
    let cluster = cluster(&topic_of(&first), 2);
    cluster.create_topic(&topic_of(&second), 2, 1).unwrap();
    let mut cfg = config(&first, &cluster.bootstrap_servers());
    let mut other = cfg.relay.tables[0].clone();
    other.table = second.clone();
    other.notify_channel = Some(second.clone());
    cfg.relay.tables.push(other);
    insert_rows(&pool, &first, 0, 700, 7).await;
    insert_rows(&pool, &second, 0, 900, 9).await;
    let daemon = Daemon::start(cfg).await;
    for (table, count) in [(&first, 700), (&second, 900)] {
        let received = consume(
            &cluster.bootstrap_servers(),
            &topic_of(table),
            count,
            Duration::from_millis(300),
            Duration::from_secs(30),
        )
        .await;
        assert_exactly_once(&received, 0, count as i64);
        assert_first_deliveries_in_key_order(&received);
        assert_eq!(count_rows(&pool, table).await, 0);
    }
    daemon.stop().await.unwrap();
}
