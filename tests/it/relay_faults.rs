//! PostgreSQL-specific faults: Kafka failing at once (backoff), database sessions killed
//! under the relay. The faults every backend must survive are in `relay_backends`.

use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::helpers::*;

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
