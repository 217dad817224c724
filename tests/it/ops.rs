//! Operations: the systemd notify protocol through a real NOTIFY_SOCKET.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::helpers::*;

async fn next_datagram(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(15), socket.recv(&mut buf))
        .await
        .expect("a notification within 15 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_status_and_stopping() {
    let Relayed { table, .. } = relayed("notify", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let config = dir.path().join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"embedded\"\n[http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n\
             [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nnotify_channel = \"{table}\"\n",
            database_url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = next_datagram(&socket).await;
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    assert!(
        first.lines().any(|l| l.starts_with("STATUS=relay:")),
        "{first}"
    );
    // WATCHDOG_USEC = 1 s: pings every 0.5 s, with a status line once the lane is owned.
    let mut pings = 0;
    let mut saw_lane = false;
    while pings < 3 || !saw_lane {
        let message = next_datagram(&socket).await;
        if message.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
            saw_lane |= message.contains("STATUS=relay: 1 lanes");
        }
    }
    let (code, stderr) = terminate(&mut child, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut rest = String::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await
    {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        rest.lines().any(|l| l == "STOPPING=1"),
        "STOPPING=1 was sent on drain: {rest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_backlog_lane_owners_and_consumer_lag() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("status", 1).await;
    let bootstrap = cluster.bootstrap_servers();
    let mut cfg = config(&table, &bootstrap);
    let t = &mut cfg.relay.tables[0];
    t.lanes = 2;
    t.notify_channel = String::new();
    t.poll_interval = Duration::from_secs(3600);
    let daemon = Daemon::start(cfg).await;
    eventually("both lanes owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[]) == 2.0
    })
    .await;
    // Lanes poll hourly and nothing notifies them: these rows stay pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    insert_rows(&pool, &table, 0, 10, 3).await;

    crate::consumer_helpers::produce_events(&bootstrap, &topic, 0, "s", "E", 0..5).await;
    let group = unique("status-group");
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(3))
        .unwrap();
    committer.commit(&tpl, CommitMode::Sync).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{bootstrap}\"\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nlanes = 2\n\
             [consumer]\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n",
            database_url()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["status", "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let relay = &status["relay"][0];
    assert_eq!(relay["table"], table.as_str());
    assert_eq!(relay["pending"], 10);
    assert_eq!(relay["dead_rows"], 0);
    assert_eq!(relay["owners"].as_array().unwrap().len(), 2, "{status}");
    let partition = &status["consumer"]["partitions"][0];
    assert_eq!(partition["committed"], 3);
    assert_eq!(partition["high_watermark"], 5);
    assert_eq!(partition["lag"], 2);

    let table_text = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table_text.stdout);
    assert!(text.contains(&table) && text.contains("2/2"), "{text}");
    daemon.stop().await.unwrap();
}
