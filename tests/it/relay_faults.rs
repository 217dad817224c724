//! Faults: broker outage, a batch that fails after some deliveries, a row Kafka refuses.

use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_loses_nothing_backs_off_and_resumes_by_itself() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("brokerdown", 2).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.kafka.options.insert(
        "message.timeout.ms".into(),
        outboxd::config::OptionValue::Int(300),
    );
    cfg.relay.tables[0].batch_size = 100;
    insert_rows(&pool, &table, 0, 1000, 20).await;
    let daemon = Daemon::start(cfg).await;
    eventually("first rows published", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_published_total", &[("table", &table)]) >= 1000.0
    })
    .await;

    cluster.broker_down(1).unwrap();
    insert_rows(&pool, &table, 1000, 1000, 20).await;
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
        count_rows(&pool, &table).await,
        1000,
        "nothing leaves the outbox while Kafka is down"
    );

    cluster.broker_up(1).unwrap();
    drained(&pool, &table, Duration::from_secs(40)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_failing_after_some_deliveries_is_published_again_in_order() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("partial", 4).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].batch_size = 500;
    insert_rows(&pool, &table, 0, 3000, 40).await;
    // The first produce requests succeed, later ones are refused with a non-retriable
    // error, so the first batch fails part-way; afterwards the broker accepts everything.
    let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR; 2];
    errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3]);
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let daemon = Daemon::start(cfg).await;
    drained(&pool, &table, Duration::from_secs(40)).await;
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
    assert_first_deliveries_in_key_order(&received);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_row_moves_to_dead_rows_while_other_keys_flow() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("poison", 2).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.kafka.options.insert(
        "message.max.bytes".into(),
        outboxd::config::OptionValue::Int(20_000),
    );
    cfg.relay.tables[0].max_attempts = 3;
    insert_rows(&pool, &table, 0, 100, 10).await;
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('account', 'poison', '{table}', jsonb_build_object('n', 100, 'blob', repeat('x', 50000)))"
    ))
    .execute(&pool)
    .await
    .unwrap();
    // A later row of the same key waits behind the poison row, then flows.
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('account', 'poison', '{table}', jsonb_build_object('n', 101))"
    ))
    .execute(&pool)
    .await
    .unwrap();
    insert_rows(&pool, &table, 102, 100, 10).await;

    let daemon = Daemon::start(cfg).await;
    drained(&pool, &table, Duration::from_secs(30)).await;
    let (reason, attempts, n): (String, i32, i64) = sqlx::query_as(
        "SELECT reason, attempts, (row_data->'payload'->>'n')::int8 FROM outboxd_dead_rows WHERE source_table = $1",
    )
    .bind(&table)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 100);
    assert_eq!(attempts, 3);
    assert!(
        reason.contains("refused it 3 times") && reason.to_lowercase().contains("too large"),
        "{reason}"
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
    let leftover: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outboxd_relay_attempts WHERE source_table = $1")
            .bind(&table)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(leftover, 0, "attempt counters of dead rows are removed");

    // The README's requeue recipe puts the row back; still too large, it dies again.
    let dead_id: i64 =
        sqlx::query_scalar("SELECT id FROM outboxd_dead_rows WHERE source_table = $1")
            .bind(&table)
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO {table} SELECT * FROM jsonb_populate_record(NULL::{table}, (SELECT row_data FROM outboxd_dead_rows WHERE id = {dead_id}));
         DELETE FROM outboxd_dead_rows WHERE id = {dead_id};"
    ))
    .execute(&pool)
    .await
    .unwrap();
    eventually(
        "requeued row dead again",
        Duration::from_secs(20),
        || async { daemon.metric("outboxd_relay_dead_rows_total", &[("table", &table)]) == 2.0 },
    )
    .await;
    let n: i64 = sqlx::query_scalar(
        "SELECT (row_data->'payload'->>'n')::int8 FROM outboxd_dead_rows WHERE source_table = $1",
    )
    .bind(&table)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 100, "the requeued row is the original one");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_kafka_failures_back_off_exponentially_instead_of_spinning() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("backoff", 1).await;
    insert_rows(&pool, &table, 0, 50, 5).await;
    // Every produce request is refused at once, for as long as the errors last.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10_000],
    );
    let daemon = Daemon::start(config(&table, &cluster.bootstrap_servers())).await;
    eventually("first failure", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_publish_errors_total", &[("kind", "kafka")]) > 0.0
    })
    .await;
    let before = daemon.metric("outboxd_relay_batch_rows_count", &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = daemon.metric("outboxd_relay_batch_rows_count", &[]) - before;
    // Failures take milliseconds here: without backoff this would be hundreds of attempts.
    // Backoff from 100 ms doubling (with jitter) allows at most 5 in 3 s.
    assert!(
        (1.0..=6.0).contains(&attempts),
        "{attempts} attempts in 3 s"
    );
    assert_eq!(count_rows(&pool, &table).await, 50);

    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    drained(&pool, &table, Duration::from_secs(40)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        50,
        Duration::from_millis(300),
        Duration::from_secs(20),
    )
    .await;
    assert_at_least_once(&received, 0, 50);
    assert_first_deliveries_in_key_order(&received);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_database_connections_are_replaced_and_nothing_is_lost() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("dbkill", 2).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    // A session name of this test's own, so only its connections are killed.
    cfg.database.url = Some(format!("{}?application_name={table}", database_url()));
    cfg.relay.tables[0].batch_size = 100;
    let total = 30_000;
    insert_rows(&pool, &table, 0, total, 50).await;
    let daemon = Daemon::start(cfg).await;
    let sessions = format!("FROM pg_stat_activity WHERE application_name = '{table}'");
    let mut kills = 0;
    let mut last = total;
    while kills < 3 {
        // Wait for the relay to be connected again and to make progress since the last kill.
        eventually(
            "relay connected and publishing",
            Duration::from_secs(30),
            || async {
                let connected: i64 = sqlx::query_scalar(&format!("SELECT count(*) {sessions}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                connected > 0 && count_rows(&pool, &table).await < last
            },
        )
        .await;
        last = count_rows(&pool, &table).await;
        if last == 0 {
            break;
        }
        let killed: i64 = sqlx::query_scalar(&format!(
            "SELECT count(pg_terminate_backend(pid)) {sessions}"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        kills += i32::from(killed > 0);
    }
    assert!(kills >= 1, "connections were killed mid-drain");
    drained(&pool, &table, Duration::from_secs(60)).await;
    assert!(
        daemon.metric(
            "outboxd_relay_publish_errors_total",
            &[("kind", "database")]
        ) >= 1.0
    );
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        total as usize,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    assert_at_least_once(&received, 0, total);
    assert_first_deliveries_in_key_order(&received);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_kafka_is_down_rolls_back_in_time_and_keeps_the_rows() {
    let Relayed {
        pool,
        table,
        topic: _,
        cluster,
    } = relayed("downstop", 1).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.shutdown_timeout = Duration::from_secs(4);
    cfg.kafka.options.insert(
        "message.timeout.ms".into(),
        outboxd::config::OptionValue::Int(120_000),
    );
    let daemon = Daemon::start(cfg).await;
    eventually("lane owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[("table", &table)]) == 1.0
    })
    .await;
    // Let the producer learn the topic's leader, then take the broker away.
    insert_rows(&pool, &table, 0, 1, 1).await;
    drained(&pool, &table, Duration::from_secs(10)).await;
    cluster.broker_down(1).unwrap();
    insert_rows(&pool, &table, 1, 100, 5).await;
    eventually(
        "a batch is waiting for Kafka",
        Duration::from_secs(10),
        || async { daemon.metric("outboxd_relay_batch_rows_count", &[]) >= 2.0 },
    )
    .await;
    let stopping = std::time::Instant::now();
    daemon.stop().await.expect("the drain ends in time");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "took {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        count_rows(&pool, &table).await,
        100,
        "the unacknowledged batch rolled back"
    );
}
