//! Operations: the systemd notify protocol through a real NOTIFY_SOCKET, status, SIGHUP
//! reloads, and what readiness answers.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::cli::run_logged;
use crate::helpers::*;

/// Sends SIGHUP to process `pid`.
fn hup(pid: u32) {
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

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
    cfg.database.url = Some(format!("{}?application_name={table}", database_url()));
    let t = &mut cfg.relay.tables[0];
    t.lanes = 2;
    t.notify_channel = None;
    t.poll_interval = Duration::from_secs(3600);
    let daemon = Daemon::start(cfg).await;
    eventually("both lanes owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[]) == 2.0
    })
    .await;
    // Both lanes made their first (empty) claim, which ends with its COMMIT; they poll
    // hourly and nothing notifies them, so rows inserted now stay pending.
    lanes_claimed_once(&pool, &table, 2).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_safe_changes_names_restart_keys_and_survives_a_bad_file() {
    let Relayed {
        pool,
        table,
        topic: _,
        cluster,
    } = relayed("sighup", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    let write = |level: &str, poll: &str, listen: &str| {
        std::fs::write(
            &path,
            format!(
                "[database]\nurl = \"{}?application_name={table}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"{listen}\"\n[log]\nlevel = \"{level}\"\n\
                 [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nnotify_channel = \"\"\npoll_interval = \"{poll}\"\nmaintenance_interval = \"200ms\"\n",
                database_url(),
                cluster.bootstrap_servers()
            ),
        )
        .unwrap();
    };
    write("warn", "1h", "127.0.0.1:0");
    // The log goes to a file the test reads as it goes.
    let (mut child, log) = run_logged(&path);
    let logged = |needle: &str| std::fs::read_to_string(&log).unwrap().contains(needle);
    let lane_locked = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND a.application_name = '{table}'"
    );
    eventually("lane owned", Duration::from_secs(15), || async {
        sqlx::query_scalar::<_, i64>(&lane_locked)
            .fetch_one(&pool)
            .await
            .unwrap()
            >= 2
    })
    .await;
    // The lane has claimed once (an empty claim ends with its COMMIT) and now waits for
    // an hour.
    lanes_claimed_once(&pool, &table, 1).await;
    insert_rows(&pool, &table, 0, 5, 1).await;

    std::fs::write(&path, "[relay\nbroken").unwrap();
    hup(child.id());
    eventually(
        "the bad file is refused",
        Duration::from_secs(10),
        || async { logged("reload failed; still running on the previous configuration") },
    )
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "a bad file does not stop outboxd"
    );
    assert_eq!(count_rows(&pool, &table).await, 5, "still polling hourly");

    write("info", "100ms", "127.0.0.1:1");
    hup(child.id());
    drained(&pool, &table, Duration::from_secs(10)).await;
    eventually("info lines logged", Duration::from_secs(10), || async {
        logged("relay progress")
    })
    .await;
    let (code, _) = terminate(&mut child, Duration::from_secs(10)).await;
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("reload failed; still running on the previous configuration"),
        "{stderr}"
    );
    assert!(
        stderr.contains("these changes need a restart") && stderr.contains("http.listen"),
        "{stderr}"
    );
    assert!(
        stderr.contains("configuration reloaded")
            && stderr.contains("relay.tables[0].poll_interval"),
        "{stderr}"
    );
    assert!(
        stderr.contains("relay progress"),
        "info lines appear once log.level is info: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_http_handler_headers_and_retry_policy_in_place() {
    use crate::consumer_helpers::*;
    let (topic, _cluster, bootstrap) = consuming("reloadhttp", 1);
    let server = TestServer::start(&[], 200).await;
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![(
            "web",
            http_to(&server.url, "headers = { x-version = \"1\" }"),
        )],
    );
    let daemon = Daemon::start(cfg.clone()).await;
    produce(&bootstrap, &topic, &[(0, "k", b"first", &[])]).await;
    eventually("first delivered", Duration::from_secs(30), || async {
        server.count() == 1
    })
    .await;

    let mut new = cfg.clone();
    new.handlers.insert(
        "web".into(),
        http_to(
            &server.url,
            "headers = { x-version = \"2\" }\n[retry]\nmax_attempts = 2",
        ),
    );
    let reloaded = daemon.reloader.apply(&new).unwrap();
    assert_eq!(
        reloaded.applied,
        [
            "handlers.web.headers.x-version",
            "handlers.web.retry.max_attempts"
        ]
    );
    assert!(reloaded.needs_restart.is_empty());

    server.set_fallback(503);
    produce(&bootstrap, &topic, &[(0, "k", b"second", &[])]).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::ZERO,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        dead[0].headers["outboxd-dlt-attempts"], "2",
        "the reloaded retry policy applies"
    );
    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests[0].headers["x-version"], "1");
    assert_eq!(
        requests[1].headers["x-version"], "2",
        "the reloaded header applies"
    );
    daemon.stop().await.unwrap();
}

/// A `log` handler whose line is off leaves each message's headers unread; once a reload
/// turns the line on, the messages fetched after it are logged with their type and id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_a_reload_turns_on_names_each_event_type_and_id() {
    use crate::consumer_helpers::{committed, consuming, produce};
    let (topic, _cluster, bootstrap) = consuming("loglevel", 1);
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    let config = |level: &str| {
        format!(
            "[log]\nlevel = \"{level}\"\n\
             [kafka]\nbrokers = \"{bootstrap}\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 6000\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [consumer]\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n\
             [[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"log\"\n[handlers.log]\nkind = \"log\"\n"
        )
    };
    std::fs::write(&path, config("warn")).unwrap();
    let event = |id| [("event-id", id), ("event-type", "AccountOpened")];
    produce(&bootstrap, &topic, &[(0, "k", b"{}", &event("e-quiet"))]).await;
    let (mut child, log) = run_logged(&path);
    let logged = || std::fs::read_to_string(&log).unwrap();
    eventually(
        "the first message is handled and committed",
        Duration::from_secs(30),
        || async { committed(&bootstrap, &group, &topic, 0) == Some(1) },
    )
    .await;
    std::fs::write(&path, config("info")).unwrap();
    hup(child.id());
    eventually("the reload is applied", Duration::from_secs(15), || async {
        logged().contains("configuration reloaded")
    })
    .await;
    produce(&bootstrap, &topic, &[(0, "k", b"{}", &event("e-loud"))]).await;
    eventually(
        "the second message is logged",
        Duration::from_secs(30),
        || async { logged().contains("e-loud") },
    )
    .await;
    let (code, _) = terminate(&mut child, Duration::from_secs(15)).await;
    let text = logged();
    assert_eq!(code, Some(0), "{text}");
    let line = text.lines().find(|l| l.contains("e-loud")).unwrap();
    assert!(
        line.contains("event_type=\"AccountOpened\"") && line.contains("event_id=e-loud"),
        "the line names the event's type and id: {line}"
    );
    assert!(
        !text.contains("e-quiet"),
        "the line was off for the first message:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reasons_are_short_and_hold_no_secret() {
    use crate::consumer_helpers::*;
    let (topic, cluster, bootstrap) = consuming("ready", 1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "effect")],
        vec![(
            "effect",
            handler("kind = \"sql\"\nstatement = \"SELECT 1\""),
        )],
    );
    cfg.database.url = Some(format!(
        "postgres://app:pw-s3cret@127.0.0.1:{port}/test?sslpassword=kp-s3cret"
    ));
    cfg.database.connect_timeout = Duration::from_millis(500);
    let daemon = Daemon::start(cfg).await;
    let (status, body) = http_get(daemon.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        "not ready\ndatabase: no connection within database.connect_timeout\n"
    );
    cluster.broker_down(1).unwrap();
    let (status, body) = http_get(daemon.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("kafka: no metadata answer (")),
        "{body}"
    );
    assert!(
        !body.contains("s3cret") && !body.contains("127.0.0.1"),
        "{body}"
    );
    cluster.broker_up(1).unwrap();
    daemon.stop().await.unwrap();
}

/// Waits until `lanes` lanes of the outboxd whose connections are named `table` made their
/// first (empty) claim: it ends with its COMMIT, and the session then waits.
async fn lanes_claimed_once(pool: &sqlx::PgPool, table: &str, lanes: i64) {
    let claimed_once = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{table}' AND state = 'idle' AND query = 'COMMIT'"
    );
    eventually(
        "the lanes' first claims",
        Duration::from_secs(15),
        || async {
            sqlx::query_scalar::<_, i64>(&claimed_once)
                .fetch_one(pool)
                .await
                .unwrap()
                >= lanes
        },
    )
    .await;
}
