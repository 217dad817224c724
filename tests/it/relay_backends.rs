//! The relay suite every backend must pass (PostgreSQL, MySQL/MariaDB, SQLite): delivery
//! in key order, a batch failing part-way, broker down, mark mode (with maintenance
//! running); lanes > 1 where a backend has them. Rows and tables the relay cannot use are
//! in `relay_bad_rows.rs`, lane ownership across replicas in `relay_lane_identity.rs`,
//! shutdown while Kafka is down in `relay_shutdown.rs`.

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
