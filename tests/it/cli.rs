//! The binary: healthcheck, migrate (also against a newer schema), and a SIGTERM
//! drain of a separate `outboxd run` process. Configuration tests are in `config.rs`.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_outboxd");

pub const GOOD: &str = r#"
[database]
url = "postgres://app:hunter2@127.0.0.1:5432/test"
[kafka]
brokers = "127.0.0.1:9092"
[kafka.options]
"sasl.password" = "swordfish"
"linger.ms" = 10
[[relay.tables]]
table = "outbox"
topic = "events.{event_type}"
"#;

pub fn run_with(args: &[&str], toml: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_large_drain_exits_0_in_time_and_loses_nothing() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("sigterm", 4).await;
    let total = 60_000;
    insert_rows(&pool, &table, 0, total, 500).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "shutdown_timeout = \"10s\"\n[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [log]\nlevel = \"warn\"\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nbatch_size = 200\nnotify_channel = \"{table}\"\n",
            database_url(),
            cluster.bootstrap_servers()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("drain under way", Duration::from_secs(30), || async {
        count_rows(&pool, &table).await < total - 2000
    })
    .await;
    let (code, stderr) = terminate(&mut child, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");

    let remaining: Vec<i64> =
        sqlx::query_scalar(&format!("SELECT (payload->>'n')::int8 FROM {table}"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        !remaining.is_empty(),
        "SIGTERM arrived mid-drain, so rows remain"
    );
    let gone = total as usize - remaining.len();
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        gone,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    let published: std::collections::HashSet<i64> = received.iter().map(|r| r.n).collect();
    let remaining: std::collections::HashSet<i64> = remaining.into_iter().collect();
    let lost: Vec<i64> = (0..total)
        .filter(|n| !remaining.contains(n) && !published.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} rows deleted but never published, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_embedded_migrations() {
    let toml = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"embedded\"\n[[relay.tables]]\ntable = \"outbox\"\ntopic = \"e.{{event_type}}\"\n",
        database_url()
    );
    let (code, _, err) = run_with(&["migrate"], &toml, &[]);
    assert_eq!(code, 0, "{err}");
    let pool = db().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE tablename IN ('outbox', 'outboxd_dead_rows', 'outboxd_inbox', 'outboxd_relay_attempts') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "outbox",
            "outboxd_dead_rows",
            "outboxd_inbox",
            "outboxd_relay_attempts"
        ]
    );
    // A migration applied by a newer outboxd (a rollback): still fine.
    let future = 29_991_231_000_000_i64 + i64::from(std::process::id());
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from the future', true, '\\x00', 0)",
    )
    .bind(future)
    .execute(&pool)
    .await
    .unwrap();
    let (code, _, err) = run_with(&["migrate"], &toml, &[]);
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(future)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        code, 0,
        "a newer schema does not stop an older binary: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_follows_readiness() {
    let Relayed { table, cluster, .. } = relayed("health", 1).await;
    let daemon = Daemon::start(config(&table, &cluster.bootstrap_servers())).await;
    let toml = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"embedded\"\n[http]\nlisten = \"{}\"\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\n",
        database_url(),
        daemon.http_addr
    );
    let (code, out, err) = run_with(&["healthcheck"], &toml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.broker_down(1).unwrap();
    let (code, _, err) = run_with(&["healthcheck"], &toml, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("kafka"), "{err}");
    cluster.broker_up(1).unwrap();
    daemon.stop().await.unwrap();
    let (code, _, _) = run_with(&["healthcheck"], &toml, &[]);
    assert_eq!(code, 1, "nothing listens any more");
}

/// Starts `outboxd run --config config` with its stderr in the file `stderr` beside the
/// config: the process and that file.
pub fn run_logged(config: &std::path::Path) -> (std::process::Child, std::path::PathBuf) {
    let log = config.with_file_name("stderr");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

/// Runs a consumer on the embedded broker with `kafka` as its `[kafka]` tables until its
/// partition is assigned; returns what it logged.
async fn consumer_run_log(kafka: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"embedded\"\n{kafka}\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [consumer]\ngroup_id = \"g\"\ntopics = [\"events\"]\n\
             [[consumer.routes]]\ntopic = \"events\"\nhandler = \"log\"\n[handlers.log]\nkind = \"log\"\n"
        ),
    )
    .unwrap();
    let (mut child, log) = run_logged(&path);
    eventually(
        "the partition is assigned",
        Duration::from_secs(30),
        || async { std::fs::read_to_string(&log).is_ok_and(|s| s.contains("partition assigned")) },
    )
    .await;
    let (code, _) = terminate(&mut child, Duration::from_secs(15)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_options_reach_only_the_consumer() {
    let warning = "consumer property and will be ignored";
    let shared = consumer_run_log("[kafka.options]\n\"session.timeout.ms\" = 6000").await;
    assert!(
        shared.contains(warning),
        "a consumer property in the shared table warns in the producer:\n{shared}"
    );
    let own = consumer_run_log(
        "[kafka.consumer_options]\n\"session.timeout.ms\" = 6000\n[kafka.producer_options]\n\"linger.ms\" = 1",
    )
    .await;
    assert!(!own.contains(warning), "{own}");
    assert!(!own.contains("CONFWARN"), "{own}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_a_child_prints_reaches_neither_the_log_nor_the_dead_letter() {
    use crate::consumer_helpers::*;
    let (topic, _cluster, bootstrap) = consuming("leakylog", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 6000\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [consumer]\ngroup_id = \"{}\"\ntopics = [\"{topic}\"]\n\
             [[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"cmd\"\n\
             [handlers.cmd]\nkind = \"command\"\nprogram = \"/bin/sh\"\n\
             args = [\"-c\", \"echo token is $API_TOKEN >&2; exit 3\"]\n\
             env = {{ API_TOKEN = \"tok-s3cret-value\" }}\n",
            unique("group")
        ),
    )
    .unwrap();
    produce(
        &bootstrap,
        &topic,
        &[(0, "k", b"{}", &[("event-id", "e-1")])],
    )
    .await;
    let (mut child, log) = run_logged(&path);
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_millis(200),
        Duration::from_secs(30),
    )
    .await;
    eventually(
        "the dead letter is logged",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&log).is_ok_and(|s| s.contains("message dead-lettered"))
        },
    )
    .await;
    let (code, _) = terminate(&mut child, Duration::from_secs(15)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{text}");
    let message = &dead[0].headers["outboxd-dlt-error-message"];
    assert!(message.contains("token is <redacted>"), "{message}");
    assert!(text.contains("token is <redacted>"), "{text}");
    assert!(!text.contains("tok-s3cret-value"), "{text}");
}
