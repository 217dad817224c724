//! Consumer faults: dead-letter topic unavailable, one partition stuck in retries, restart
//! during retries, a second member joining, a member stopped while its group rebalances,
//! SIGTERM under load.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::consumer_helpers::*;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_dead_letter_topic_holds_the_partition_until_it_recovers() {
    let (topic, cluster, bootstrap) = consuming("dlqdown", 1);
    let server = TestServer::start(&[400], 200).await;
    let cfg = web_consumer(&bootstrap, &topic, &server.url);
    let group = group_of(&cfg);
    produce(
        &bootstrap,
        &topic,
        &[
            (0, "k", b"bad", &[]),
            (0, "k", b"good-1", &[]),
            (0, "k", b"good-2", &[]),
        ],
    )
    .await;
    // Every produce request (only dead letters are produced from now on) fails for a while.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
    );
    let daemon = Daemon::start(cfg).await;
    eventually(
        "first message refused by the server",
        Duration::from_secs(30),
        || async { server.count() == 1 },
    )
    .await;
    // The dead letter waits for Kafka at the dead-letter producer's gate, probed twice.
    eventually(
        "the dead-letter producer down and probed twice",
        Duration::from_secs(30),
        || async {
            daemon.metric("outboxd_consumer_handler_down", &[("handler", "-")]) == 1.0
                && daemon.metric("outboxd_consumer_probe_calls_total", &[("handler", "-")]) >= 2.0
        },
    )
    .await;
    assert_eq!(server.count(), 1, "the partition waits for its dead letter");
    assert_eq!(
        committed(&bootstrap, &group, &topic, 0),
        Some(0),
        "nothing committed past the failed message"
    );
    assert_eq!(
        daemon.metric("outboxd_consumer_dead_letter_total", &[]),
        0.0
    );

    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dead[0].payload, b"bad");
    eventually("partition moved on", Duration::from_secs(30), || async {
        server.count() == 3
    })
    .await;
    eventually("all committed", Duration::from_secs(10), || async {
        committed(&bootstrap, &group, &topic, 0) == Some(3)
    })
    .await;
    assert_eq!(server.bodies(), ["bad", "good-1", "good-2"]);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_kafka_refuses_goes_stripped_or_holds_its_key_loudly() {
    let (topic, _cluster, bootstrap) = consuming("refused", 2);
    let server = TestServer::start(&[], 400).await;
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    // Dead letters over 3,000 bytes are refused by the producer.
    cfg.kafka.producer_options.insert(
        "message.max.bytes".into(),
        outboxd::config::OptionValue::Int(3000),
    );
    let big_value = vec![b'v'; 2600];
    let big_key = "k".repeat(3200);
    produce(
        &bootstrap,
        &topic,
        &[
            // Fits alone, not with its context headers: dead-lettered without its value.
            (0, "a", &big_value, &[("event-id", "big-value")]),
            (0, "a", b"{}", &[("event-id", "after")]),
            // Too large even stripped: its key stops here (in partition 1).
            (1, &big_key, b"{}", &[("event-id", "big-key")]),
            (1, &big_key, b"{}", &[("event-id", "held")]),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        2,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    eventually(
        "partition 1 reported stopped",
        Duration::from_secs(20),
        || async {
            daemon.metric(
                "outboxd_consumer_partition_stopped",
                &[("topic", &topic), ("partition", "1")],
            ) == 1.0
        },
    )
    .await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let stripped = dead
        .iter()
        .find(|d| d.headers.contains_key("outboxd-dlt-stripped"))
        .expect("one dead letter went stripped");
    assert!(stripped.payload.is_empty(), "without its value");
    assert_eq!(stripped.key, "a");
    assert_eq!(stripped.headers["outboxd-dlt-original-offset"], "0");
    assert!(
        dead.iter()
            .any(|d| d.headers.get("event-id").is_some_and(|id| id == "after")),
        "partition 0 went on"
    );
    // The message of the stopped key after it was never handed to the handler.
    assert_eq!(server.count(), 3, "big-value, after and big-key only");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_retry_holds_back_only_its_own_partition() {
    let (topic, _cluster, bootstrap) = consuming("stuck", 2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = r#"input=$(cat); case "$input" in stuck*) exit 75 ;; esac; echo "$OUTBOXD_PARTITION $input" >> "$1""#;
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "cmd")],
        vec![("cmd", handler(&format!(
            "kind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}, \"sh\", \"{}\"]\nretry_exit_codes = [75]\n[retry]\nmax_attempts = 1000\nmax_elapsed = \"1h\"",
            out.display()
        )))],
    );
    let mut messages: Vec<Msg<'_>> = vec![(0, "a", b"stuck", &[]), (0, "a", b"after-stuck", &[])];
    let bodies: Vec<String> = (0..20).map(|i| format!("p1-{i}")).collect();
    messages.extend(bodies.iter().map(|b| (1, "b", b.as_bytes(), &[][..])));
    produce(&bootstrap, &topic, &messages).await;
    let daemon = Daemon::start(cfg).await;
    eventually(
        "partition 1 fully handled",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .count()
                == 20
        },
    )
    .await;
    let handled = std::fs::read_to_string(&out).unwrap();
    assert!(handled.lines().all(|l| l.starts_with("1 p1-")), "{handled}");
    // Partition 1 may finish before partition 0's first call has failed.
    eventually(
        "the stuck message retried",
        Duration::from_secs(10),
        || async { daemon.metric("outboxd_consumer_retries_total", &[("handler", "cmd")]) >= 1.0 },
    )
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stopped_during_retries_handles_the_message_again_after_restart() {
    let (topic, _cluster, bootstrap) = consuming("restart", 1);
    let server = TestServer::start(&[], 503).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![(
            "web",
            handler(&format!(
                "kind = \"http\"\nurl = \"{}\"\n[retry]\nmax_attempts = 1000\nmax_elapsed = \"1h\"",
                server.url
            )),
        )],
    );
    cfg.consumer.as_mut().unwrap().retry.max_delay = Duration::from_millis(200);
    let group = group_of(&cfg);
    produce(&bootstrap, &topic, &[(0, "k", b"once-failing", &[])]).await;
    let first = Daemon::start(cfg.clone()).await;
    eventually("retrying", Duration::from_secs(30), || async {
        server.count() >= 2
    })
    .await;
    first.stop().await.unwrap();
    assert_eq!(
        committed(&bootstrap, &group, &topic, 0),
        Some(0),
        "the offset stays at an unfinished message"
    );

    server.set_fallback(200);
    let before = server.count();
    let second = Daemon::start(cfg).await;
    eventually("handled after restart", Duration::from_secs(30), || async {
        committed(&bootstrap, &group, &topic, 0) == Some(1)
    })
    .await;
    assert!(server.count() > before, "the message was delivered again");
    second.stop().await.unwrap();
}

/// A message an earlier process left in retry comes back with its calls: when they use up
/// the new handler's attempts it is dead-lettered at once, with its original headers, even
/// though that handler (a `log` whose line is off: this process installs no log filter)
/// reads none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_left_by_an_earlier_process_is_dead_lettered_with_its_headers() {
    let (topic, _cluster, bootstrap) = consuming("leftretry", 1);
    let server = TestServer::start(&[], 503).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "h")],
        vec![(
            "h",
            http_to(
                &server.url,
                "[retry]\nmax_attempts = 1000\nmax_elapsed = \"1h\"",
            ),
        )],
    );
    let group = group_of(&cfg);
    produce(
        &bootstrap,
        &topic,
        &[(0, "k", b"{}", &[("event-id", "e-left"), ("app", "kept")])],
    )
    .await;
    let first = Daemon::start(cfg.clone()).await;
    eventually("two calls made", Duration::from_secs(30), || async {
        server.count() >= 2
    })
    .await;
    first.stop().await.unwrap();
    assert_eq!(committed(&bootstrap, &group, &topic, 0), Some(0));

    // The same group, its handler now a `log` allowed two calls: those made are all.
    cfg.handlers.insert(
        "h".into(),
        handler("kind = \"log\"\n[retry]\nmax_attempts = 2"),
    );
    let second = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::ZERO,
        Duration::from_secs(30),
    )
    .await;
    eventually(
        "committed past the dead letter",
        Duration::from_secs(10),
        || async { committed(&bootstrap, &group, &topic, 0) == Some(1) },
    )
    .await;
    second.stop().await.unwrap();
    let h = &dead[0].headers;
    assert_eq!(h["event-id"], "e-left", "original headers kept: {h:?}");
    assert_eq!(h["app"], "kept");
    assert_eq!(h["outboxd-dlt-error-class"], "retryable_exhausted");
    assert!(h["outboxd-dlt-attempts"].parse::<u32>().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_joining_mid_stream_loses_nothing() {
    let (topic, _cluster, bootstrap) = consuming("join", 4);
    let server = TestServer::start(&[], 200).await;
    server.set_delay(Duration::from_millis(10));
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    // Partition order at about 400 messages a second: the duplicate bound below is that.
    cfg.consumer.as_mut().unwrap().ordering = outboxd::config::Ordering::Partition;
    // Members notice the rebalance at their next heartbeat.
    cfg.kafka.options.insert(
        "heartbeat.interval.ms".into(),
        outboxd::config::OptionValue::Int(300),
    );
    let total = 1600;
    for p in 0..4 {
        produce_events(
            &bootstrap,
            &topic,
            p,
            &format!("p{p}"),
            "E",
            (p as i64 * 400)..(p as i64 * 400 + 400),
        )
        .await;
    }
    let a = Daemon::start(cfg.clone()).await;
    eventually(
        "first member under way",
        Duration::from_secs(30),
        || async { server.count() >= 50 },
    )
    .await;
    let b = Daemon::start(cfg).await;
    eventually("every message handled", Duration::from_secs(60), || async {
        let mut seen: Vec<String> = server.bodies();
        seen.sort();
        seen.dedup();
        seen.len() == total
    })
    .await;
    let handled_by_b = b.metric("outboxd_consumer_messages_total", &[("outcome", "done")]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for body in server.bodies() {
        *counts.entry(body).or_default() += 1;
    }
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    // Duplicates are the messages handled since the last offset commit that succeeded.
    // Kafka accepts the commit outboxd makes on revoke, leaving only messages in flight;
    // librdkafka's mock cluster refuses commits while a rebalance is in progress, so here
    // the window is the auto-commit interval plus the rebalance itself: at ~400 messages/s
    // about a second's worth.
    assert!(
        duplicates <= 400,
        "{duplicates} duplicates: more than a second's worth of messages"
    );
    assert!(handled_by_b > 0.0, "the second member took partitions");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_while_its_group_rebalances_stops_within_its_budget() {
    // The second member is stopped inside the rebalance the first one's leave started.
    // librdkafka's own close, meeting a rebalance, can wait forever for an assignment call
    // or abort the process; outboxd first leaves the group, once the rebalance completed
    // (the mock cluster ends it about 5 s after the leave), and only then closes. Giving
    // up on leaving would show as a stop taking 80 % of `shutdown_timeout`.
    let (topic, _cluster, bootstrap) = consuming("stoprebalance", 2);
    let server = TestServer::start(&[], 200).await;
    // About 50 messages a second per partition: every round finds messages waiting.
    server.set_delay(Duration::from_millis(20));
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    cfg.consumer.as_mut().unwrap().ordering = outboxd::config::Ordering::Partition;
    cfg.kafka.options.insert(
        "heartbeat.interval.ms".into(),
        outboxd::config::OptionValue::Int(300),
    );
    cfg.shutdown_timeout = Duration::from_secs(20);
    let gives_up_after = cfg.shutdown_timeout.mul_f32(0.8);
    for p in 0..2 {
        let first = p as i64 * 2000;
        produce_events(&bootstrap, &topic, p, "e", "E", first..first + 2000).await;
    }
    for round in 1..=3 {
        let a = Daemon::start(cfg.clone()).await;
        eventually(
            "the first member handling",
            Duration::from_secs(30),
            || async { a.metric("outboxd_consumer_messages_total", &[]) > 0.0 },
        )
        .await;
        let b = Daemon::start(cfg.clone()).await;
        eventually(
            "the second member handling its partition",
            Duration::from_secs(30),
            || async { b.metric("outboxd_consumer_messages_total", &[]) > 0.0 },
        )
        .await;
        eventually(
            "the two partitions shared between the members",
            Duration::from_secs(10),
            || async {
                a.metric("outboxd_consumer_assigned_partitions", &[])
                    + b.metric("outboxd_consumer_assigned_partitions", &[])
                    == 2.0
            },
        )
        .await;
        a.stop().await.expect("the first member stops in time");
        // The eager rebalance the first member's leave started revoked everything from
        // the second; stopped now, it is stopped inside the rebalance.
        eventually(
            "the second member's partitions revoked",
            Duration::from_secs(30),
            || async { b.metric("outboxd_consumer_assigned_partitions", &[]) == 0.0 },
        )
        .await;
        let stopping = std::time::Instant::now();
        b.stop()
            .await
            .expect("the member stopped during the rebalance stops in time");
        let took = stopping.elapsed();
        println!("round {round}: the second member stopped in {took:?}");
        assert!(
            took < gives_up_after,
            "the member gave up leaving the group ({took:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_a_restart_resumes_after_the_committed_offsets() {
    let (topic, _cluster, bootstrap) = consuming("consigterm", 2);
    let server = TestServer::start(&[], 200).await;
    // 16 calls at once of 100 ms: about 160 messages a second, so SIGTERM comes mid-stream.
    server.set_delay(Duration::from_millis(100));
    let total = 600;
    for p in 0..2 {
        produce_events(
            &bootstrap,
            &topic,
            p,
            "e",
            "E",
            (p as i64 * 300)..(p as i64 * 300 + 300),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "shutdown_timeout = \"5s\"\n[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.options]\n\"session.timeout.ms\" = 6000\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n\
             [consumer]\ngroup_id = \"{}\"\ntopics = [\"{topic}\"]\n[[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"web\"\n\
             [handlers.web]\nkind = \"http\"\nurl = \"{}\"\n",
            unique("group"),
            server.url
        ),
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = run();
    eventually("under load", Duration::from_secs(30), || async {
        server.count() >= 100
    })
    .await;
    let (code, stderr) = terminate(&mut child, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "{stderr}");
    let handled_before = server.count();
    assert!(handled_before < total, "stopped mid-stream");

    let mut child = run();
    eventually(
        "the rest handled after restart",
        Duration::from_secs(60),
        || async { server.count() >= total },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for body in server.bodies() {
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(counts.len(), total, "every message handled");
    let duplicates: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        duplicates.is_empty(),
        "the restart resumed after the committed offsets, yet these came twice: {duplicates:?}"
    );
}
