//! Key order (`consumer.ordering = "key"`, the default): the messages of one key are
//! delivered one at a time in offset order while the keys of a partition run side by
//! side; a key in retry holds back only its own later messages; the window of pending
//! messages is bounded and moves again; the commit metadata hands on what was final, and
//! a message's calls, across a clean handover and a crash.

use std::collections::HashSet;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outboxd::config::Ordering;

use crate::consumer_helpers::*;
use crate::helpers::*;
use crate::key_server::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_is_delivered_in_order_while_keys_run_side_by_side() {
    let (topic, _cluster, bootstrap) = consuming("keys", 4);
    let (keys, per_key) = (1000, 10);
    produce_keys(&bootstrap, &topic, 4, keys, per_key, false).await;
    let server = KeyServer::start().await;
    server.state.jitter_ms.store(3, AtomicOrdering::SeqCst);
    let cfg = key_config(&bootstrap, &topic, &server.url, 64);
    assert_eq!(
        cfg.consumer.as_ref().unwrap().ordering,
        Ordering::Key,
        "the default"
    );
    let daemon = Daemon::start(cfg).await;
    let total = keys * per_key as usize;
    eventually(
        "every message delivered",
        Duration::from_secs(120),
        || async { server.delivered_count() >= total },
    )
    .await;
    // stop() waits for every call in flight: a message delivered twice has arrived by
    // the time it returns.
    daemon.stop().await.unwrap();
    assert_in_order_once(&server, keys, per_key);
    let peak = server.state.peak.load(AtomicOrdering::SeqCst);
    println!("{total} messages of {keys} keys in order; up to {peak} calls at once");
    assert!(peak > 8, "4 partitions ran only {peak} calls at once");
    assert!(
        peak <= 64,
        "max_in_flight = 64, yet {peak} calls ran at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_holds_back_only_its_own_messages() {
    let (topic, _cluster, bootstrap) = consuming("holdback", 1);
    let (keys, per_key) = (100, 6);
    produce_keys(&bootstrap, &topic, 1, keys, per_key, false).await;
    let server = KeyServer::start().await;
    server.state.jitter_ms.store(2, AtomicOrdering::SeqCst);
    server.fail("k0", true);
    let daemon = Daemon::start(key_config(&bootstrap, &topic, &server.url, 16)).await;
    eventually("the first call", Duration::from_secs(30), || async {
        !server.state.calls.lock().unwrap().is_empty()
    })
    .await;
    let started = Instant::now();
    let healthy = (keys - 1) * per_key as usize;
    eventually(
        "the healthy keys delivered",
        Duration::from_secs(30),
        || async { server.delivered_count() >= healthy },
    )
    .await;
    let waited = started.elapsed();
    assert!(server.calls_of("k0") > 1, "k0 was retried meanwhile");
    assert!(
        !server.delivered().contains_key("k0"),
        "k0 still fails: none of its messages may pass it"
    );
    eventually("k0 blocks one key", Duration::from_secs(5), || async {
        daemon.metric("outboxd_consumer_keys_in_retry", &[]) == 1.0
    })
    .await;
    server.fail("k0", false);
    eventually(
        "k0 delivered after it recovered",
        Duration::from_secs(30),
        || async { server.delivered_count() >= keys * per_key as usize },
    )
    .await;
    daemon.stop().await.unwrap();
    assert_in_order_once(&server, keys, per_key);
    println!(
        "{healthy} messages of 99 healthy keys delivered within {waited:?} of the first call while k0 failed ({} calls)",
        server.calls_of("k0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_messages_keep_their_order_in_their_partition() {
    let (topic, _cluster, bootstrap) = consuming("keyless", 2);
    // Keyless: the "k" in the body only names a sequence to check.
    produce_keys(&bootstrap, &topic, 2, 2, 150, true).await;
    let server = KeyServer::start().await;
    server.state.jitter_ms.store(2, AtomicOrdering::SeqCst);
    let daemon = Daemon::start(key_config(&bootstrap, &topic, &server.url, 16)).await;
    eventually(
        "every message delivered",
        Duration::from_secs(60),
        || async { server.delivered_count() >= 300 },
    )
    .await;
    daemon.stop().await.unwrap();
    assert_in_order_once(&server, 2, 150);
    assert_eq!(
        server.state.peak.load(AtomicOrdering::SeqCst),
        2,
        "one call per partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_window_is_bounded_and_moves_again() {
    let (topic, _cluster, bootstrap) = consuming("window", 2);
    let (keys, per_key) = (200, 10);
    produce_keys(&bootstrap, &topic, 2, keys, per_key, false).await;
    let server = KeyServer::start().await;
    server.state.jitter_ms.store(2, AtomicOrdering::SeqCst);
    // k0 (partition 0) fails at first: its partition's window fills behind it and that
    // partition stops reading; partition 1 goes on.
    server.fail("k0", true);
    let mut cfg = key_config(&bootstrap, &topic, &server.url, 16);
    cfg.consumer.as_mut().unwrap().max_pending_per_partition = 50;
    let daemon = Daemon::start(cfg).await;
    let pending = |d: &Daemon, p: &str| d.metric("outboxd_consumer_pending", &[("partition", p)]);
    let peak = Mutex::new(0.0f64);
    let sample = || {
        let mut p = peak.lock().unwrap();
        *p = p.max(pending(&daemon, "0")).max(pending(&daemon, "1"));
    };
    eventually("partition 1 delivered", Duration::from_secs(60), || async {
        sample();
        let d = server.delivered();
        (1..keys)
            .step_by(2)
            .all(|i| d.get(&format!("k{i}")).is_some_and(|s| s.len() == 10))
    })
    .await;
    eventually(
        "partition 0's window is full",
        Duration::from_secs(10),
        || async { pending(&daemon, "0") == 50.0 },
    )
    .await;
    // Partition 0's window is its first 50 messages: round 0 of k0, k2, ..., k98. All
    // but k0's are delivered, and nothing beyond the window is.
    let expected = 1000 + 49;
    eventually(
        "the window's messages but k0's delivered",
        Duration::from_secs(10),
        || async { server.delivered_count() >= expected },
    )
    .await;
    assert_eq!(
        server.delivered_count(),
        expected,
        "a full window reads nothing more"
    );
    assert_eq!(pending(&daemon, "0"), 50.0);
    server.fail("k0", false);
    eventually(
        "every message delivered",
        Duration::from_secs(60),
        || async {
            sample();
            server.delivered_count() >= keys * per_key as usize
        },
    )
    .await;
    daemon.stop().await.unwrap();
    assert_in_order_once(&server, keys, per_key);
    let peak = *peak.lock().unwrap();
    assert!(peak <= 50.0, "pending reached {peak} with a window of 50");
    println!("window of 50 held (peak {peak}); partition 0 resumed after k0 recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_handover_does_not_handle_final_messages_again() {
    let (topic, _cluster, bootstrap) = consuming("handover", 1);
    let (keys, per_key) = (100, 6);
    produce_keys(&bootstrap, &topic, 1, keys, per_key, false).await;
    let server = KeyServer::start().await;
    server.fail("k0", true);
    let cfg = key_config(&bootstrap, &topic, &server.url, 16);
    let first = Daemon::start(cfg.clone()).await;
    let healthy = (keys - 1) * per_key as usize;
    eventually(
        "the healthy keys delivered",
        Duration::from_secs(30),
        || async { server.delivered_count() >= healthy },
    )
    .await;
    first.stop().await.unwrap();
    // The committed offset is k0's first message (offset 0); the map holds the rest.
    assert_eq!(committed(&bootstrap, &group_of(&cfg), &topic, 0), Some(0));
    server.fail("k0", false);
    let second = Daemon::start(cfg).await;
    eventually(
        "k0 delivered by the second",
        Duration::from_secs(30),
        || async { server.delivered_count() >= keys * per_key as usize },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let skipped = second.metric("outboxd_consumer_already_final_total", &[]);
    second.stop().await.unwrap();
    assert_in_order_once(&server, keys, per_key);
    assert_eq!(
        skipped, healthy as f64,
        "every final message was skipped, none handled again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_keeps_its_calls_across_a_crash() {
    let (topic, _cluster, bootstrap) = consuming("poison", 1);
    produce_keys(&bootstrap, &topic, 1, 1, 1, false).await;
    let server = KeyServer::start().await;
    server.fail("k0", true);
    // The third call hangs: the crash comes while it runs.
    *server.state.hang.lock().unwrap() = Some(("k0".into(), 3));
    let dir = tempfile::tempdir().unwrap();
    let retry = "[consumer.retry]\ninitial = \"50ms\"\nmax_delay = \"100ms\"\nmax_attempts = 5\n";
    let config = process_config(dir.path(), &bootstrap, &topic, &server.url, retry);
    let mut first = spawn(&config);
    eventually("the third call runs", Duration::from_secs(30), || async {
        server.calls_of("k0") >= 3
    })
    .await;
    // The third call is recorded as it begins and committed within 210 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    kill(&mut first);
    *server.state.hang.lock().unwrap() = None;
    let mut second = spawn(&config);
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_millis(200),
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut second);
    assert_eq!(dead[0].headers["outboxd-dlt-attempts"], "5");
    assert_eq!(
        server.calls_of("k0"),
        5,
        "max_attempts = 5 counts the calls of both processes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_crashes_lose_nothing_and_repeat_only_what_was_uncommitted() {
    let (topic, _cluster, bootstrap) = consuming("crashes", 4);
    let (keys, per_key) = (1000, 20);
    let total = keys * per_key as usize;
    produce_keys(&bootstrap, &topic, 4, keys, per_key as u64, false).await;
    let server = KeyServer::start().await;
    server.state.jitter_ms.store(4, AtomicOrdering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let max_in_flight = 32;
    let extra = format!("max_in_flight = {max_in_flight}");
    let config = process_config(dir.path(), &bootstrap, &topic, &server.url, &extra);
    let calls = |s: &KeyServer| s.state.calls.lock().unwrap().len();
    // Per run: calls made and the time from the first call to the crash.
    let mut runs = Vec::new();
    for crash in 1..=5 {
        let mut child = spawn(&config);
        let before = calls(&server);
        eventually("the first call", Duration::from_secs(60), || async {
            calls(&server) > before
        })
        .await;
        let began = Instant::now();
        eventually(
            "progress before the crash",
            Duration::from_secs(60),
            || async { calls(&server) >= before + total / 8 },
        )
        .await;
        kill(&mut child);
        let made = calls(&server) - before;
        runs.push((made, began.elapsed()));
        println!("crash {crash} after {made} calls");
    }
    let mut last = spawn(&config);
    eventually(
        "every message delivered",
        Duration::from_secs(120),
        || async {
            server
                .delivered()
                .values()
                .map(|s| s.iter().collect::<HashSet<_>>().len())
                .sum::<usize>()
                >= total
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(&mut last);
    let delivered = server.delivered();
    let mut repeats = 0;
    for i in 0..keys {
        let seqs = &delivered[&format!("k{i}")];
        // A crash replays a key from its last committed message on, so a key's
        // deliveries may step back once per crash, and otherwise go up one at a time.
        match replays_in_order(seqs, per_key as u64) {
            Ok(rewinds) => assert!(rewinds <= 5, "k{i}: {rewinds} replays in 5 crashes"),
            Err(e) => panic!("k{i}: lost or reordered: {e}: {seqs:?}"),
        }
        repeats += seqs.len() - per_key as usize;
    }
    // A crash repeats what was in flight (at most max_in_flight calls) and what finished
    // since the last commit: within the commit interval (200 ms) and the publication
    // interval (10 ms), taken as 300 ms here, at the rate of the run.
    let bound: usize = runs
        .iter()
        .map(|(made, took)| max_in_flight + (*made as f64 / took.as_secs_f64() * 0.3) as usize)
        .sum();
    println!(
        "{total} messages through 5 crashes ({runs:?}): {repeats} delivered twice, bound {bound}"
    );
    assert!(repeats <= bound, "{repeats} repeats exceed {bound}");
}
