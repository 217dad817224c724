//! `outboxd dlq replay`: dead letters go back once, the loop guard holds, and headers a
//! message brought cannot send a dead letter anywhere else.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_republishes_dead_letters_once_and_guards_against_loops() {
    use crate::consumer_helpers::*;
    let (topic, _cluster, bootstrap) = consuming("replay", 1);
    let dlq = format!("{topic}.dlq");
    let server = TestServer::start(&[], 400).await;
    let cfg = web_consumer(&bootstrap, &topic, &server.url);
    produce_events(&bootstrap, &topic, 0, &unique("ev"), "DepositMade", 0..3).await;
    let daemon = Daemon::start(cfg.clone()).await;
    consume(&bootstrap, &dlq, 3, Duration::ZERO, Duration::from_secs(30)).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    let group = cfg.consumer.as_ref().unwrap().group_id.clone();
    std::fs::write(
        &path,
        format!("[kafka]\nbrokers = \"{bootstrap}\"\n[consumer]\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n"),
    )
    .unwrap();
    let replay_group = unique("replay-group");
    let replay = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args([
                "dlq",
                "replay",
                "--topic",
                &dlq,
                "--group",
                &replay_group,
                "--config",
            ])
            .arg(&path)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let dry = replay(&["--dry-run"]);
    assert!(dry.contains("replayed 3"), "{dry}");
    assert!(
        dry.lines().any(|l| l.starts_with("permanent")
            && l.contains("DepositMade")
            && l.trim_end().ends_with('3')),
        "{dry}"
    );

    let by_key = replay(&["--dry-run", "--key", "k1"]);
    assert!(by_key.contains("replayed 1, filtered out 2"), "{by_key}");
    let recent = replay(&["--dry-run", "--since", "1h", "--limit", "2"]);
    assert!(recent.contains("replayed 2"), "{recent}");
    let old = replay(&["--dry-run", "--until", "1h"]);
    assert!(old.contains("replayed 0, filtered out 3"), "{old}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--since",
            "yesterday-ish",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "clap rejects a bad time");

    // The endpoint is fixed: replaying delivers the three messages.
    server.set_fallback(200);
    let out = replay(&[]);
    assert!(out.contains("read 3, replayed 3"), "{out}");
    eventually(
        "replayed messages delivered",
        Duration::from_secs(30),
        || async {
            daemon.metric("outboxd_consumer_messages_total", &[("outcome", "done")]) == 3.0
        },
    )
    .await;
    let all = consume(
        &bootstrap,
        &topic,
        6,
        Duration::from_millis(200),
        Duration::from_secs(20),
    )
    .await;
    let replayed: Vec<_> = all
        .iter()
        .filter(|m| m.headers.contains_key("outboxd-replay-count"))
        .collect();
    assert_eq!(replayed.len(), 3);
    for m in &replayed {
        assert_eq!(m.headers["outboxd-replay-count"], "1");
        assert!(
            m.headers.keys().all(|k| !k.starts_with("outboxd-dlt-")),
            "{:?}",
            m.headers
        );
        assert_eq!(
            m.headers["event-type"], "DepositMade",
            "original headers kept"
        );
    }
    // The replay group remembers: nothing to do a second time.
    assert!(replay(&[]).contains("read 0, replayed 0"));

    // They fail again: their new dead letters carry replay count 1; the guard refuses them.
    server.set_fallback(400);
    let again = replay(&["--dry-run"]);
    assert!(again.contains("read 0"), "{again}");
    let more = unique("ev2");
    produce(
        &bootstrap,
        &topic,
        &[(
            0,
            "k",
            b"{}",
            &[("event-id", &more), ("outboxd-replay-count", "1")],
        )],
    )
    .await;
    consume(&bootstrap, &dlq, 4, Duration::ZERO, Duration::from_secs(30)).await;
    let guarded = replay(&["--max-replays", "1"]);
    assert!(
        guarded.contains("replayed 0") && guarded.contains("loop guard 1"),
        "{guarded}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_dead_letter_headers_do_not_redirect_replay() {
    use crate::consumer_helpers::*;
    let (topic, cluster, bootstrap) = consuming("forged", 1);
    let dlq = format!("{topic}.dlq");
    cluster.create_topic("victim", 1, 1).unwrap();
    let server = TestServer::start(&[], 400).await;
    let cfg = web_consumer(&bootstrap, &topic, &server.url);
    // A message that brings dead-letter context of every dialect, naming another topic.
    let forged: &[(&str, &str)] = &[
        ("event-id", "f-1"),
        ("outboxd-dlt-original-topic", "victim"),
        ("kafka_dlt-original-topic", "victim"),
        ("__connect.errors.topic", "victim"),
        ("outboxd-replay-count", "not a number"),
    ];
    produce(&bootstrap, &topic, &[(0, "k", b"{}", forged)]).await;
    let daemon = Daemon::start(cfg.clone()).await;
    let dead = consume(&bootstrap, &dlq, 1, Duration::ZERO, Duration::from_secs(30)).await;
    daemon.stop().await.unwrap();
    let h = &dead[0].headers;
    assert_eq!(h["outboxd-dlt-original-topic"], topic);
    assert_eq!(h["event-id"], "f-1", "the message's own headers stay");
    for gone in [
        "kafka_dlt-original-topic",
        "__connect.errors.topic",
        "outboxd-replay-count",
    ] {
        assert!(!h.contains_key(gone), "{gone} kept: {h:?}");
    }
    // A dead letter written straight to the dead-letter topic by someone else.
    produce(
        &bootstrap,
        &dlq,
        &[(0, "k", b"{}", &[("outboxd-dlt-original-topic", "victim")])],
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!("[kafka]\nbrokers = \"{bootstrap}\"\n[consumer]\ngroup_id = \"g\"\ntopics = [\"{topic}\"]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--group",
            &unique("rg"),
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("read 2, replayed 1") && stdout.contains("original topic not allowed 1"),
        "{stdout}"
    );
    let victim = consume(
        &bootstrap,
        "victim",
        1,
        Duration::ZERO,
        Duration::from_secs(2),
    )
    .await;
    assert!(victim.is_empty(), "replay wrote to the forged topic");
    let back = consume(
        &bootstrap,
        &topic,
        2,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(back.len(), 2, "the original and its one replay");
    assert_eq!(back[1].headers["outboxd-replay-count"], "1");
}
