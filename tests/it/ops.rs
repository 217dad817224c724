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
