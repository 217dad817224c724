//! Shutdown with a batch that Kafka cannot take: the drain ends within the grace period
//! and the batch stays in the outbox, on every backend.

use std::time::{Duration, Instant};

use outboxd::config::OptionValue;

use crate::backends::{on_backends, Kind};
use crate::helpers::*;
use crate::relay_backends::setup;

/// Takes the broker down once the lane runs, inserts 100 rows, stops the daemon as soon as
/// a batch of them waits, and checks that the stop took less than `shutdown_timeout` (4 s)
/// and that all 100 rows are still in the outbox. `options` are added to `[kafka.options]`
/// (`message.timeout.ms` is 120 s, far beyond the stop).
async fn stop_with_a_batch_waiting(kind: Kind, prefix: &str, options: &[(&str, i64)]) {
    let (db, table, _topic, cluster) = setup(kind, prefix, 1).await;
    let mut cfg = db.config(&table, &cluster.bootstrap_servers());
    cfg.shutdown_timeout = Duration::from_secs(4);
    for (key, value) in [("message.timeout.ms", 120_000)].iter().chain(options) {
        cfg.kafka
            .options
            .insert((*key).into(), OptionValue::Int(*value));
    }
    let daemon = Daemon::start(cfg).await;
    eventually("lane owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[("table", &table)]) == 1.0
    })
    .await;
    // Let the producer learn the topic's leader, then take the broker away.
    db.insert_rows(&table, 0, 1, 1).await;
    db.drained(&table, Duration::from_secs(10)).await;
    cluster.broker_down(1).unwrap();
    db.insert_rows(&table, 1, 100, 5).await;
    eventually(
        "a batch is waiting for Kafka",
        Duration::from_secs(10),
        || async { daemon.metric("outboxd_relay_batch_rows_count", &[]) >= 2.0 },
    )
    .await;
    let stopping = Instant::now();
    daemon.stop().await.expect("the drain ends in time");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "took {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        db.count_rows(&table).await,
        100,
        "the unacknowledged batch, enqueued or not, stays in the outbox"
    );
}

on_backends!(shutdown_while_kafka_is_down_keeps_the_rows: postgres, mysql, sqlite);
async fn shutdown_while_kafka_is_down_keeps_the_rows(kind: Kind) {
    stop_with_a_batch_waiting(kind, "downstop", &[]).await;
}

/// With the producer's local queue full (room for 10 messages, the broker down), the lane
/// waits for room; a shutdown ends that wait at once, and the rows never enqueued stay in
/// the outbox with the rest of the batch. The queue is the same for every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_producer_queue_is_full_keeps_the_rows() {
    stop_with_a_batch_waiting(
        Kind::named("postgres"),
        "queuefull",
        &[("queue.buffering.max.messages", 10)],
    )
    .await;
}
