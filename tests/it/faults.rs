//! The fault suite: outboxd as a separate process, killed, starved of its downstream, fed
//! bad input; every case counts event ids. `OUTBOXD_FAULT_SCALE` (default 1.0) scales the
//! row and message counts and the outage lengths.

use std::collections::HashSet;

use futures::FutureExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::consumer_helpers::*;
use crate::helpers::*;

fn scale() -> f64 {
    std::env::var("OUTBOXD_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0)
}

fn scaled(n: i64) -> i64 {
    ((n as f64 * scale()) as i64).max(100)
}

fn scaled_time(d: Duration) -> Duration {
    d.mul_f64(scale()).max(Duration::from_secs(2))
}

/// `outboxd run` on `config` (TOML text), logging to a file in `dir`.
fn spawn(dir: &Path, name: &str, config: &str) -> (Child, PathBuf) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    (child, log)
}

fn kill9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_with_sigkill_five_times_loses_nothing() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("kill9relay", 8).await;
    let total = scaled(100_000);
    let batch = 500;
    insert_rows(&pool, &table, 0, total, 500).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nbatch_size = {batch}\nnotify_channel = \"{table}\"\n",
        database_url(),
        cluster.bootstrap_servers()
    );
    let kills = 5;
    for i in 0..kills {
        let before = count_rows(&pool, &table).await;
        let (mut child, _) = spawn(dir.path(), &format!("relay{i}"), &config);
        eventually(
            "progress before the kill",
            Duration::from_secs(60),
            || async { count_rows(&pool, &table).await <= before - total / 20 },
        )
        .await;
        kill9(&mut child);
    }
    let (mut child, log) = spawn(dir.path(), "relay-final", &config);
    drained(&pool, &table, Duration::from_secs(120)).await;
    let (code, _) = terminate(&mut child, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(log).unwrap());

    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        total as usize,
        Duration::from_secs(1),
        Duration::from_secs(120),
    )
    .await;
    assert_at_least_once(&received, 0, total);
    assert_first_deliveries_in_key_order(&received);
    let duplicates = received.len() as i64 - total;
    eprintln!(
        "fault kill -9 relay: rows {total}, kills {kills}, delivered {}, duplicates {duplicates}",
        received.len()
    );
    assert!(
        duplicates <= kills * batch,
        "{duplicates} duplicates > {kills} kills x batch {batch}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_with_sigkill_five_times_applies_every_effect_once() {
    let pool = db().await;
    let effects = unique("effects");
    sqlx::query(&format!("CREATE TABLE {effects} (n bigint NOT NULL)"))
        .execute(&pool)
        .await
        .unwrap();
    let (topic, _cluster, bootstrap) = consuming("kill9consumer", 4);
    let total = scaled(50_000);
    let prefix = unique("ev");
    for p in 0..4 {
        let share = total / 4;
        produce_events(
            &bootstrap,
            &topic,
            p as i32,
            &prefix,
            "E",
            (p * share)..((p + 1) * share),
        )
        .await;
    }
    let total = total / 4 * 4;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.options]\n\"session.timeout.ms\" = 6000\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n\
         [consumer]\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n[[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"effect\"\n\
         [handlers.effect]\nkind = \"sql\"\nstatement = \"INSERT INTO {effects} (n) VALUES ($1)\"\nparams = [\"/n\"]\n",
        database_url()
    );
    let count = |pool: sqlx::PgPool, effects: String| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {effects}"))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let kills = 5;
    for i in 0..kills {
        let before = count(pool.clone(), effects.clone()).await;
        let (mut child, _) = spawn(dir.path(), &format!("consumer{i}"), &config);
        eventually("progress before the kill", Duration::from_secs(120), || {
            let (pool, effects) = (pool.clone(), effects.clone());
            async move { count(pool, effects).await >= before + total / 20 }
        })
        .await;
        kill9(&mut child);
    }
    let (mut child, log) = spawn(dir.path(), "consumer-final", &config);
    eventually("every effect applied", Duration::from_secs(300), || {
        let (pool, effects) = (pool.clone(), effects.clone());
        async move { count(pool, effects).await >= total }
    })
    .await;
    eventually(
        "offsets committed to the end",
        Duration::from_secs(30),
        || async { (0..4).all(|p| committed(&bootstrap, &group, &topic, p) == Some(total / 4)) },
    )
    .await;
    let (code, _) = terminate(&mut child, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(log).unwrap());
    let (rows, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT n) FROM {effects}"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!("fault kill -9 consumer: messages {total}, kills {kills}, effects {rows}, distinct {distinct}");
    assert_eq!(
        (rows, distinct),
        (total, total),
        "every effect exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_outage_ends_with_every_message_delivered_or_dead_lettered() {
    let (topic, _cluster, bootstrap) = consuming("outage", 2);
    let total = scaled(2_000);
    let prefix = unique("ev");
    for p in 0..2 {
        let share = total / 2;
        produce_events(
            &bootstrap,
            &topic,
            p as i32,
            &prefix,
            "E",
            (p * share)..((p + 1) * share),
        )
        .await;
    }
    let total = total / 2 * 2;
    let server = TestServer::start(&[], 200).await;
    server.set_delay(Duration::from_millis(2));
    let cfg = {
        let mut c = consumer_config(
            &bootstrap,
            &[&topic],
            &[(&topic, None, "web")],
            vec![("web", http_to(&server.url, "timeout = \"500ms\"\n[retry]\ninitial = \"100ms\"\nmax_delay = \"1s\"\nmax_attempts = 6\nmax_elapsed = \"3s\""))],
        );
        c.shutdown_timeout = Duration::from_secs(5);
        c
    };
    let daemon = Daemon::start(cfg).await;
    eventually("flowing", Duration::from_secs(30), || async {
        server.count() as i64 >= total / 10
    })
    .await;
    let outage = scaled_time(Duration::from_secs(20));
    let down_at = Instant::now();
    server.set_fallback(503);
    server.set_delay(Duration::from_secs(2));
    tokio::time::sleep(outage).await;
    server.set_fallback(200);
    server.set_delay(Duration::from_millis(2));
    eprintln!("handler outage of {:?} ended", down_at.elapsed());
    let dead_topic = format!("{topic}.dlq");
    eventually(
        "every message settled",
        Duration::from_secs(120),
        || async {
            let done = daemon.metric("outboxd_consumer_messages_total", &[("outcome", "done")]);
            let dead = daemon.metric(
                "outboxd_consumer_messages_total",
                &[("outcome", "dead_letter")],
            );
            (done + dead) as i64 >= total
        },
    )
    .await;
    let dead = consume(
        &bootstrap,
        &dead_topic,
        0,
        Duration::from_millis(500),
        Duration::from_secs(5),
    )
    .await;
    let dead_ids: HashSet<String> = dead.iter().map(|d| d.headers["event-id"].clone()).collect();
    let delivered: HashSet<String> = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.headers.contains_key("ce-id"))
        .map(|r| r.headers["ce-id"].to_str().unwrap().to_owned())
        .collect();
    let done = daemon.metric("outboxd_consumer_messages_total", &[("outcome", "done")]) as i64;
    eprintln!(
        "fault handler outage: produced {total}, done {done}, dead-lettered {}",
        dead_ids.len()
    );
    assert_eq!(
        done + dead_ids.len() as i64,
        total,
        "delivered + dead-lettered = produced"
    );
    let all: HashSet<String> = (0..total).map(|i| format!("{prefix}-{i}")).collect();
    let settled: HashSet<String> = dead_ids.union(&delivered).cloned().collect();
    assert_eq!(
        settled, all,
        "every message either reached the server or the dead-letter topic"
    );
    assert!(
        !dead_ids.is_empty(),
        "the outage outlasted the retry policy for some messages"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_end_as_deliveries_or_dead_letters_never_a_panic() {
    let (topic, _cluster, bootstrap) = consuming("badmsg", 1);
    let server = TestServer::start(&[], 200).await;
    let pool = db().await;
    let effects = unique("badfx");
    sqlx::query(&format!("CREATE TABLE {effects} (n bigint)"))
        .execute(&pool)
        .await
        .unwrap();
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, Some("Sql"), "sql"), (&topic, None, "web")],
        vec![
            ("web", http_to(&server.url, "")),
            ("sql", handler(&format!("kind = \"sql\"\nstatement = \"INSERT INTO {effects} (n) VALUES ($1)\"\nparams = [\"/n\"]"))),
        ],
    );
    cfg.database.url = Some(database_url());
    let huge = vec![b'x'; 900_000];
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    use rdkafka::message::{Header, OwnedHeaders};
    let bad_utf8 = OwnedHeaders::new()
        .insert(Header {
            key: "event-id",
            value: Some(&[0xff, 0xfe, 0x00][..]),
        })
        .insert(Header {
            key: "traceparent",
            value: Some(&[0xc3, 0x28][..]),
        });
    let records = vec![
        (
            "non-utf8 headers",
            rdkafka::producer::FutureRecord::to(&topic)
                .key("a")
                .payload(&b"{}"[..])
                .headers(bad_utf8),
        ),
        (
            "empty value",
            rdkafka::producer::FutureRecord::to(&topic)
                .key("a")
                .payload(&b""[..]),
        ),
        (
            "no value, no key",
            rdkafka::producer::FutureRecord::to(&topic),
        ),
        (
            "huge value",
            rdkafka::producer::FutureRecord::to(&topic)
                .key("a")
                .payload(&huge[..]),
        ),
        (
            "sql: empty value",
            rdkafka::producer::FutureRecord::to(&topic)
                .key("a")
                .payload(&b""[..])
                .headers(OwnedHeaders::new().insert(Header {
                    key: "event-type",
                    value: Some(&b"Sql"[..]),
                })),
        ),
        (
            "sql: wrong type",
            rdkafka::producer::FutureRecord::to(&topic)
                .key("a")
                .payload(&br#"{"n": "many"}"#[..])
                .headers(OwnedHeaders::new().insert(Header {
                    key: "event-type",
                    value: Some(&b"Sql"[..]),
                })),
        ),
    ];
    for (what, record) in records {
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("{what}: {e}"));
    }
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        2,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    eventually("http deliveries", Duration::from_secs(20), || async {
        server.count() == 4
    })
    .await;
    let classes: Vec<&str> = dead
        .iter()
        .map(|d| d.headers["outboxd-dlt-error-class"].as_str())
        .collect();
    assert_eq!(classes, ["decode", "decode"], "{dead:?}");
    let sizes: Vec<usize> = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body.len())
        .collect();
    assert_eq!(sizes, [2, 0, 0, 900_000]);
    let non_utf8 = server.requests.lock().unwrap()[0].clone();
    assert!(
        non_utf8.headers["ce-id"].to_str().unwrap().contains('/'),
        "an undecodable event-id falls back to topic/partition/offset"
    );
    eprintln!("fault bad messages: 4 delivered, 2 dead-lettered as decode");
    daemon.stop().await.unwrap();
}

/// The mock broker as a separate process (built by `cargo build --examples`).
struct BrokerProcess {
    child: Child,
    bootstrap: String,
}

impl BrokerProcess {
    fn start(topics: &[(&str, i32)]) -> BrokerProcess {
        let bin = Path::new(env!("CARGO_BIN_EXE_outboxd"))
            .parent()
            .unwrap()
            .join("examples/mock_broker");
        assert!(
            bin.exists(),
            "{} missing: run `cargo build --examples` (scripts/test.sh does)",
            bin.display()
        );
        let mut child = Command::new(bin)
            .args(topics.iter().map(|(t, p)| format!("{t}:{p}")))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        BrokerProcess {
            child,
            bootstrap: line.trim().to_owned(),
        }
    }

    fn signal(&self, signal: &str) {
        assert!(Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_broker_loses_nothing_and_the_relay_does_not_spin() {
    let pool = db().await;
    let table = outbox_table(&pool, "frozen").await;
    let topic = topic_of(&table);
    let broker = BrokerProcess::start(&[(&topic, 4)]);
    let total = scaled(50_000);
    insert_rows(&pool, &table, 0, total, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nbatch_size = 500\nnotify_channel = \"{table}\"\n",
        database_url(),
        broker.bootstrap
    );
    let (mut relay, log) = spawn(dir.path(), "relay", &config);
    eventually("drain under way", Duration::from_secs(60), || async {
        count_rows(&pool, &table).await < total * 9 / 10
    })
    .await;
    broker.signal("-STOP");
    let frozen_for = scaled_time(Duration::from_secs(20));
    let (rows_at_freeze, cpu_at_freeze) =
        (count_rows(&pool, &table).await, cpu_seconds(relay.id()));
    tokio::time::sleep(frozen_for).await;
    let cpu_while_frozen = cpu_seconds(relay.id()) - cpu_at_freeze;
    let rows_after_freeze = count_rows(&pool, &table).await;
    broker.signal("-CONT");
    assert!(
        rows_after_freeze >= rows_at_freeze - 500,
        "at most the batch in flight may commit while the broker is frozen"
    );
    assert!(rows_after_freeze > 0, "the freeze came mid-drain");
    // A spinning relay would burn a core; waiting, it barely uses any CPU.
    assert!(
        cpu_while_frozen < frozen_for.as_secs_f64() * 0.1,
        "{cpu_while_frozen:.2} CPU seconds in {frozen_for:?} frozen"
    );
    drained(&pool, &table, Duration::from_secs(120)).await;
    let (code, _) = terminate(&mut relay, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(log).unwrap());
    let received = consume(
        &broker.bootstrap,
        &topic,
        total as usize,
        Duration::from_secs(1),
        Duration::from_secs(120),
    )
    .await;
    assert_at_least_once(&received, 0, total);
    assert_first_deliveries_in_key_order(&received);
    eprintln!(
        "fault frozen broker: rows {total}, frozen {frozen_for:?}, relay CPU while frozen {cpu_while_frozen:.2} s, delivered {}, duplicates {}",
        received.len(),
        received.len() as i64 - total
    );
}

/// A PostgreSQL cluster of this test's own, so restarting it disturbs nobody else.
struct ThrowawayPg {
    bin: PathBuf,
    dir: tempfile::TempDir,
    url: String,
}

impl ThrowawayPg {
    fn as_postgres(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start() -> ThrowawayPg {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .max()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            assert!(Command::new("chown")
                .args(["postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success());
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let pg = ThrowawayPg {
            bin,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
        };
        let data = pg.dir.path().join("data");
        assert!(pg
            .as_postgres("initdb")
            .args(["-U", "postgres", "-A", "trust", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success());
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            pg.dir.path().display()
        );
        assert!(pg
            .as_postgres("pg_ctl")
            .args(["-w", "-D"])
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(pg.dir.path().join("log"))
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success());
        pg
    }

    fn restart(&self) {
        let data = self.dir.path().join("data");
        assert!(self
            .as_postgres("pg_ctl")
            .args(["-w", "-m", "fast", "-D"])
            .arg(&data)
            .arg("restart")
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for ThrowawayPg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .as_postgres("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(&data)
            .arg("stop")
            .stdout(Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_drain_the_relay_reconnects_and_finishes() {
    let pg = ThrowawayPg::start();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url)
        .await
        .unwrap();
    outboxd::db::migrate(&pool).await.unwrap();
    let table = "outbox";
    let topic = topic_of(table);
    let cluster = cluster(&topic, 4);
    let total = scaled(100_000);
    insert_rows(&pool, table, 0, total, 300).await;
    pool.close().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\nbatch_size = 200\nrebalance_interval = \"500ms\"\n",
        pg.url,
        cluster.bootstrap_servers()
    );
    let (mut relay, log) = spawn(dir.path(), "relay", &config);
    let count = |url: String| async move {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    eventually("drain under way", Duration::from_secs(60), || {
        count(pg.url.clone()).then(|n| async move { n < total * 9 / 10 })
    })
    .await;
    pg.restart();
    let after_restart = count(pg.url.clone()).await;
    assert!(after_restart > 0, "the restart came mid-drain");
    eventually(
        "drained after the restart",
        Duration::from_secs(120),
        || count(pg.url.clone()).then(|n| async move { n == 0 }),
    )
    .await;
    let (code, _) = terminate(&mut relay, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(code, Some(0), "{log}");
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        total as usize,
        Duration::from_secs(1),
        Duration::from_secs(120),
    )
    .await;
    assert_at_least_once(&received, 0, total);
    assert_first_deliveries_in_key_order(&received);
    eprintln!(
        "fault postgres restart: rows {total}, pending at restart {after_restart}, delivered {}, duplicates {}",
        received.len(),
        received.len() as i64 - total
    );
}
