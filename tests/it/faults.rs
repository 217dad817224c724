//! The fault suite: outboxd as a separate process, killed, starved of its downstream, fed
//! bad input; every case counts event ids. `OUTBOXD_FAULT_SCALE` (default 1.0) scales the
//! row and message counts and the outage lengths.

use std::collections::HashSet;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::consumer_helpers::*;
use crate::helpers::*;

pub fn scale() -> f64 {
    std::env::var("OUTBOXD_FAULT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0)
}

pub fn scaled(n: i64) -> i64 {
    ((n as f64 * scale()) as i64).max(100)
}

pub fn scaled_time(d: Duration) -> Duration {
    d.mul_f64(scale()).max(Duration::from_secs(2))
}

/// `outboxd run` on `config` (TOML text), logging to a file in `dir`.
pub fn spawn(dir: &Path, name: &str, config: &str) -> (Child, PathBuf) {
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

    let received = consume_all_in_order(&cluster.bootstrap_servers(), &topic, total).await;
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
    let total = produce_spread(&bootstrap, &topic, 4, &prefix, total).await;
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
    let total = produce_spread(&bootstrap, &topic, 2, &prefix, total).await;
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
        // Partition order: each partition's head message goes through its retries during
        // the outage (in key order most messages would wait for a call slot meanwhile,
        // and their retry clocks start only at their first call).
        c.consumer.as_mut().unwrap().ordering = outboxd::config::Ordering::Partition;
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
    // A header name that is not UTF-8 (rdkafka's own accessor panics on one): added
    // through librdkafka, which takes any bytes.
    let bad_name = OwnedHeaders::new();
    {
        let name = b"\xffname";
        let native = bad_name.as_borrowed() as *const rdkafka::message::BorrowedHeaders
            as *mut rdkafka::bindings::rd_kafka_headers_t;
        // SAFETY: `native` is the header list `bad_name` owns, alive here; the name and
        // value are copied by librdkafka.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_header_add(
                native,
                name.as_ptr().cast(),
                name.len() as isize,
                b"v".as_ptr().cast(),
                1,
            )
        };
        assert_eq!(
            err,
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        );
    }
    let records = vec![
        (
            "non-utf8 header name",
            rdkafka::producer::FutureRecord::to(&topic)
                .key("a")
                .payload(&b"[1]"[..])
                .headers(bad_name),
        ),
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
        server.count() == 5
    })
    .await;
    let classes: Vec<&str> = dead
        .iter()
        .map(|d| d.headers["outboxd-dlt-error-class"].as_str())
        .collect();
    assert_eq!(classes, ["decode", "decode"], "{dead:?}");
    let mut sizes: Vec<usize> = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body.len())
        .collect();
    // With key order the keyless message has a lane of its own, so where it falls among
    // the messages of key `a` is not fixed.
    sizes.sort_unstable();
    assert_eq!(sizes, [0, 0, 2, 3, 900_000]);
    let non_utf8 = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.body.len() == 2)
        .cloned()
        .expect("the message with non-UTF-8 headers was delivered");
    assert!(
        non_utf8.headers["ce-id"].to_str().unwrap().contains('/'),
        "an undecodable event-id falls back to topic/partition/offset"
    );
    eprintln!("fault bad messages: 5 delivered, 2 dead-lettered as decode");
    daemon.stop().await.unwrap();
}
