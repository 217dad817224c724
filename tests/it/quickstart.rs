//! The README's quick start, as written: `config/quickstart.toml` run by the binary from an
//! empty directory (a SQLite file, the embedded broker; no server of any kind), events
//! written with `outboxd emit`: one reaches the log handler, one is retried by the failing
//! command handler and dead-lettered.

use std::process::{Command, Stdio};
use std::time::Duration;

use outboxd::metrics::sum_in;

use crate::cli::BIN;
use crate::helpers::*;

fn quickstart_config() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_runs_on_a_bare_machine_and_shows_delivery_retries_and_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let config = quickstart_config();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let log = std::fs::File::create(dir.path().join("outboxd.log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("OUTBOXD_HTTP__LISTEN", &listen)
        .stdout(log.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("quickstart ready", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert!(
        dir.path().join("outboxd-quickstart.db").exists(),
        "the SQLite file is created in the working directory"
    );

    for (event_type, payload) in [
        ("DepositMade", r#"{"amount": 100}"#),
        ("DepositRejected", r#"{"amount": -5}"#),
    ] {
        let out = Command::new(BIN)
            .args(["emit", "--config"])
            .arg(&config)
            .args(["--type", event_type, "--key", "acc-42", payload])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("inserted row "));
    }

    let metrics = || async { http_get(addr, "/metrics").await.1 };
    eventually(
        "one event logged, one dead-lettered after retries",
        Duration::from_secs(20),
        || async {
            let m = metrics().await;
            sum_in(
                &m,
                "outboxd_consumer_messages_total",
                &[("handler", "audit-log"), ("outcome", "done")],
            ) == 1.0
                && sum_in(
                    &m,
                    "outboxd_consumer_messages_total",
                    &[("handler", "notify-risk-team"), ("outcome", "dead_letter")],
                ) == 1.0
        },
    )
    .await;
    let m = metrics().await;
    assert_eq!(
        sum_in(&m, "outboxd_relay_published_total", &[("table", "outbox")]),
        2.0
    );
    assert_eq!(
        sum_in(
            &m,
            "outboxd_consumer_retries_total",
            &[("handler", "notify-risk-team")]
        ),
        2.0,
        "max_attempts = 3: two retries before the dead letter"
    );
    assert_eq!(
        sum_in(
            &m,
            "outboxd_consumer_dead_letter_total",
            &[("topic", "events")]
        ),
        1.0
    );
    let (code, stderr) = terminate(&mut child, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "{stderr}");
    let log = std::fs::read_to_string(dir.path().join("outboxd.log")).unwrap() + &stderr;
    assert!(
        log.contains("DepositMade"),
        "the log handler logged it:\n{log}"
    );
}
