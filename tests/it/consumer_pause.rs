//! Consumer backpressure: a lagging handler pauses its partition; nothing is lost or
//! repeated when it resumes, and a partition paused when revoked is fetched again when it
//! is assigned back.

use std::collections::HashMap;
use std::time::Duration;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_resumes_where_it_stopped_without_loss_or_repeats() {
    let (topic, _cluster, bootstrap) = consuming("pause", 2);
    let server = TestServer::start(&[], 200).await;
    server.set_delay(Duration::from_millis(1));
    let per_partition = 4000;
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
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![("web", http_to(&server.url, ""))],
    );
    // About a hundred messages of this size wait behind a full queue before a pause: each
    // partition pauses and resumes a few times.
    cfg.consumer.as_mut().unwrap().partition_buffer_kib = 8;
    let daemon = Daemon::start(cfg).await;
    let total = 2 * per_partition as usize;
    eventually("every message handled", Duration::from_secs(60), || async {
        server.count() >= total
    })
    .await;
    let pauses = daemon.metric("outboxd_consumer_paused_total", &[("topic", &topic)]);
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
    println!("{total} messages handled once each, in order, over {pauses} pauses");
    assert!(
        pauses >= 2.0,
        "the partitions were paused ({pauses} pauses)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_when_revoked_is_fetched_again_when_assigned_back() {
    let (topic, _cluster, bootstrap) = consuming("pauserevoke", 2);
    // Every call fails (retryably) until the second member has joined: each partition's
    // first message retries while the rest fills its queue and buffer, so both pause.
    let server = TestServer::start(&[], 503).await;
    let per_partition = 2000;
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
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![("web", http_to(&server.url, ""))],
    );
    cfg.kafka.options.insert(
        "heartbeat.interval.ms".into(),
        outboxd::config::OptionValue::Int(300),
    );
    let consumer = cfg.consumer.as_mut().unwrap();
    consumer.partition_buffer_kib = 8;
    consumer.retry.max_attempts = 1_000_000;
    let a = Daemon::start(cfg.clone()).await;
    eventually(
        "both partitions paused",
        Duration::from_secs(30),
        || async { a.metric("outboxd_consumer_paused_total", &[("topic", &topic)]) >= 2.0 },
    )
    .await;

    // The eager rebalance revokes both partitions from the first member and gives one
    // back to it, still paused by it in librdkafka unless it was resumed on revoke.
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
