//! Consumer backpressure: each partition is read from its own queue, which librdkafka
//! stops filling while its handler lags. A lagging handler loses, repeats and reorders
//! nothing; a partition revoked and assigned back is read again from the same queue; a
//! partition of slow calls in partition order commits its progress as it goes.

use std::collections::HashMap;
use std::time::Duration;

use outboxd::config::{OptionValue, Ordering};

use crate::consumer_helpers::*;
use crate::helpers::*;

/// `n` of each body `{"n": i}` the server received, in arrival order.
fn handled(server: &TestServer) -> Vec<i64> {
    server
        .bodies()
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            v["n"].as_i64().unwrap()
        })
        .collect()
}

/// `per_partition` events on each of partitions 0 and 1 (`n` from 0 on partition 0, from
/// `per_partition` on partition 1) and an http handler posting to `server`.
async fn two_partitions(
    prefix: &str,
    per_partition: i64,
    server: &TestServer,
) -> (String, Cluster, outboxd::config::Config) {
    let (topic, cluster, bootstrap) = consuming(prefix, 2);
    for p in 0..2 {
        let first = p as i64 * per_partition;
        produce_events(
            &bootstrap,
            &topic,
            p,
            "e",
            "E",
            first..first + per_partition,
        )
        .await;
    }
    let cfg = web_consumer(&bootstrap, &topic, &server.url);
    (topic, cluster, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_handler_loses_repeats_and_reorders_nothing() {
    let server = TestServer::start(&[], 200).await;
    server.set_delay(Duration::from_millis(1));
    let per_partition = 4000;
    let (_topic, _cluster, mut cfg) = two_partitions("lag", per_partition, &server).await;
    // A 16 KiB queue per partition (about 200 of these messages): it fills and drains
    // many times during the run.
    cfg.kafka
        .options
        .insert("queued.max.messages.kbytes".into(), OptionValue::Int(16));
    // Every message has a key of its own: partition order is what is checked here.
    cfg.consumer.as_mut().unwrap().ordering = Ordering::Partition;
    let daemon = Daemon::start(cfg).await;
    let total = 2 * per_partition as usize;
    eventually("every message handled", Duration::from_secs(60), || async {
        server.count() >= total
    })
    .await;
    daemon.stop().await.unwrap();

    let received = handled(&server);
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for n in &received {
        *counts.entry(*n).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(repeated.is_empty(), "handled twice: {repeated:?}");
    assert_eq!(counts.len(), total, "every message handled once");
    for p in 0..2 {
        let own: Vec<i64> = received
            .iter()
            .copied()
            .filter(|n| n / per_partition == p)
            .collect();
        assert!(
            own.windows(2).all(|w| w[0] < w[1]),
            "partition {p} handled out of order"
        );
    }
    println!("{total} messages handled once each, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_revoked_and_assigned_back_is_read_again() {
    // Every call fails (retryably) until the second member has joined: each partition's
    // first message retries while the rest waits in its full queue.
    let server = TestServer::start(&[], 503).await;
    let per_partition = 2000;
    let (_topic, _cluster, mut cfg) = two_partitions("reassign", per_partition, &server).await;
    cfg.kafka
        .options
        .insert("heartbeat.interval.ms".into(), OptionValue::Int(300));
    cfg.consumer.as_mut().unwrap().retry.max_attempts = 1_000_000;
    cfg.consumer.as_mut().unwrap().ordering = Ordering::Partition;
    let a = Daemon::start(cfg.clone()).await;
    let firsts = [
        r#"{"n": 0}"#.to_owned(),
        format!(r#"{{"n": {per_partition}}}"#),
    ];
    eventually(
        "both partitions retrying their first message",
        Duration::from_secs(30),
        || async {
            let bodies = server.bodies();
            firsts.iter().all(|f| bodies.contains(f))
        },
    )
    .await;

    // The eager rebalance revokes both partitions from the first member and gives one
    // back to it: its retired worker ends, and a new one reads the same partition queue.
    let b = Daemon::start(cfg).await;
    eventually(
        "the second member took a partition",
        Duration::from_secs(30),
        || async { b.metric("outboxd_consumer_retries_total", &[]) > 0.0 },
    )
    .await;
    server.set_fallback(200);
    let total = 2 * per_partition as usize;
    eventually("every message handled", Duration::from_secs(60), || async {
        let mut seen = handled(&server);
        seen.sort_unstable();
        seen.dedup();
        // The calls answered 503 are recorded too; only distinct bodies count.
        seen.len() == total
    })
    .await;
    let (by_a, by_b) = (
        a.metric("outboxd_consumer_messages_total", &[("outcome", "done")]),
        b.metric("outboxd_consumer_messages_total", &[("outcome", "done")]),
    );
    println!("first member handled {by_a}, second {by_b}, of {total}");
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "each member handled its partition"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_slow_calls_commits_its_progress_as_it_goes() {
    let server = TestServer::start(&[], 200).await;
    server.set_delay(Duration::from_millis(100));
    let (topic, _cluster, bootstrap) = consuming("slowbatch", 1);
    let total = 30;
    produce_events(&bootstrap, &topic, 0, "e", "E", 0..total).await;
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    cfg.consumer.as_mut().unwrap().ordering = Ordering::Partition;
    let group = group_of(&cfg);
    let daemon = Daemon::start(cfg).await;
    // All 30 wait in the partition's queue, so the worker takes them as one or a few
    // batches of about three seconds' work; offsets must not wait for a batch's end.
    eventually("progress committed", Duration::from_secs(20), || async {
        committed(&bootstrap, &group, &topic, 0).is_some_and(|o| o >= 5)
    })
    .await;
    let handled = server.count();
    assert!(
        handled < total as usize,
        "the offset moved only after all {handled} messages were handled"
    );
    eventually("every message handled", Duration::from_secs(20), || async {
        server.count() >= total as usize
    })
    .await;
    daemon.stop().await.unwrap();
    println!("offset 5 committed after {handled} of {total} slow calls");
}
