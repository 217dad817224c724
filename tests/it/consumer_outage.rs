//! A downstream outage is a state of the system, not a poison message: the handler is
//! paused and probed, nothing is dead-lettered for the outage, per-key order holds, and
//! the dead endpoint sees a few requests; a poison key among healthy ones still takes the
//! per-message path (retries, then the dead letter) and never marks the handler down.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use outboxd::config::RetryPolicy;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::consumer_helpers::*;
use crate::helpers::*;
use crate::key_server::*;

/// Produces `rounds` rounds of one message per key (`{"k": "k<i>", "s": <round>}`, key
/// `k<i>` on partition `i % partitions`), one round every `every`.
async fn produce_steadily(
    bootstrap: String,
    topic: String,
    partitions: usize,
    keys: usize,
    rounds: u64,
    every: Duration,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut tick = tokio::time::interval(every);
    for seq in 0..rounds {
        tick.tick().await;
        let mut deliveries = Vec::new();
        for i in 0..keys {
            let key = format!("k{i}");
            let value = format!(r#"{{"k": "{key}", "s": {seq}}}"#);
            let record: FutureRecord<'_, str, str> = FutureRecord::to(topic.as_str())
                .partition((i % partitions) as i32)
                .key(key.as_str())
                .payload(value.as_str());
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for d in deliveries {
            d.await.unwrap().expect("produced");
        }
    }
}

/// The `handlers` that `outboxd status --json` reports of the outboxd at `listen`.
fn handlers_in_status(
    bootstrap: &str,
    topic: &str,
    group: &str,
    listen: std::net::SocketAddr,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{bootstrap}\"\n[http]\nlisten = \"{listen}\"\n\
             [consumer]\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n"
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
    status["consumer"]["handlers"].clone()
}

fn dead_letters(daemon: &Daemon) -> f64 {
    daemon.metric("outboxd_consumer_dead_letter_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_outage_dead_letters_nothing_and_keeps_each_keys_order() {
    let (topic, _cluster, bootstrap) = consuming("outage", 4);
    let server = KeyServer::start().await;
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    // The defaults a new user has: retry policy and outage detection as shipped.
    cfg.consumer.as_mut().unwrap().retry = RetryPolicy::default();
    let daemon = Daemon::start(cfg).await;
    // 100 keys at 50 messages/s for 75 s; the endpoint is down from 8 s to 68 s.
    let (keys, rounds) = (100, 38);
    let producer = tokio::spawn(produce_steadily(
        bootstrap.clone(),
        topic.clone(),
        4,
        keys,
        rounds,
        Duration::from_secs(2),
    ));
    eventually(
        "traffic flows before the outage",
        Duration::from_secs(30),
        || async { server.delivered_count() >= 3 * keys },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.state.down.store(true, AtomicOrdering::SeqCst);
    let began = Instant::now();
    eventually(
        "the handler is marked down",
        Duration::from_secs(10),
        || async { daemon.metric("outboxd_consumer_handler_down", &[("handler", "web")]) == 1.0 },
    )
    .await;
    let detected = began.elapsed();
    while began.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(dead_letters(&daemon), 0.0, "dead letter during the outage");
    }
    server.state.down.store(false, AtomicOrdering::SeqCst);
    let ended = Instant::now();
    producer.await.unwrap();
    let total = keys * rounds as usize;
    eventually(
        "every message delivered after the outage",
        Duration::from_secs(120),
        || async { server.delivered_count() >= total },
    )
    .await;
    let recovered = ended.elapsed();
    eventually(
        "every offset committed",
        Duration::from_secs(30),
        || async { daemon.metric("outboxd_consumer_pending", &[]) == 0.0 },
    )
    .await;
    assert_eq!(
        daemon.metric("outboxd_consumer_handler_down", &[("handler", "web")]),
        0.0
    );
    assert_eq!(
        daemon.metric(
            "outboxd_consumer_handler_outages_total",
            &[("handler", "web")]
        ),
        1.0,
        "one outage"
    );
    assert_eq!(
        dead_letters(&daemon),
        0.0,
        "nothing dead-lettered for the outage"
    );
    daemon.stop().await.unwrap();
    assert_in_order_once(&server, keys, rounds);

    let calls: Vec<Duration> = server
        .state
        .down_calls
        .lock()
        .unwrap()
        .iter()
        .map(|at| at.duration_since(began))
        .collect();
    let after_detection = calls
        .iter()
        .filter(|at| **at > detected + Duration::from_secs(1))
        .count();
    println!(
        "outage of 60 s: down after {detected:?}, {} calls to the dead endpoint ({after_detection} probes after detection), all {total} messages delivered {recovered:?} after it came back",
        calls.len()
    );
    // Before detection: at most the failures that decide it and the calls in flight
    // (max_in_flight = 16) then; after it, probes backing off from 1 s to 30 s.
    assert!(
        calls.len() <= 50,
        "{} calls reached the dead endpoint",
        calls.len()
    );
    assert!(
        after_detection <= 8,
        "{after_detection} calls after detection: the probes back off from 1 s (1, 2, 4, 8, 16, 30 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_key_is_dead_lettered_and_never_marks_the_handler_down() {
    let (topic, _cluster, bootstrap) = consuming("poisonkey", 2);
    let server = KeyServer::start().await;
    server.fail("k0", true);
    let cfg = web_consumer(&bootstrap, &topic, &server.url);
    let max_attempts = cfg.consumer.as_ref().unwrap().retry.max_attempts as usize;
    let daemon = Daemon::start(cfg).await;
    let (keys, rounds) = (20, 20);
    let producer = tokio::spawn(produce_steadily(
        bootstrap.clone(),
        topic.clone(),
        2,
        keys,
        rounds,
        Duration::from_millis(100),
    ));
    producer.await.unwrap();
    let healthy = (keys - 1) * rounds as usize;
    eventually(
        "the healthy keys delivered and k0's messages dead-lettered",
        Duration::from_secs(120),
        || async { server.delivered_count() >= healthy && dead_letters(&daemon) >= rounds as f64 },
    )
    .await;
    assert_eq!(
        daemon.metric("outboxd_consumer_handler_outages_total", &[]),
        0.0,
        "one poison key is not an outage"
    );
    assert_eq!(dead_letters(&daemon), rounds as f64, "only k0's messages");
    assert_eq!(
        server.calls_of("k0"),
        rounds as usize * max_attempts,
        "each of k0's messages got its whole budget"
    );
    assert!(!server.delivered().contains_key("k0"));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_inside_an_outage_keeps_its_whole_budget() {
    // One partition: the four messages are fetched together and fail side by side. Spread
    // over two partitions, one partition's two messages could spend their quick budgets
    // before the other's arrived, two keys being too few to tell an outage.
    let (topic, _cluster, bootstrap) = consuming("poisonoutage", 1);
    let server = KeyServer::start().await;
    server.fail("k0", true);
    server.state.down.store(true, AtomicOrdering::SeqCst);
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    let c = cfg.consumer.as_mut().unwrap();
    c.retry.max_attempts = 6;
    // Quick probes, so that k0 (one of four waiting messages) is probed often.
    c.outage.probe_interval = Duration::from_millis(50);
    c.outage.max_probe_interval = Duration::from_millis(100);
    let group = group_of(&cfg);
    produce_keys(&bootstrap, &topic, 1, 4, 1, false).await;
    let daemon = Daemon::start(cfg).await;
    eventually(
        "the handler is marked down",
        Duration::from_secs(30),
        || async { daemon.metric("outboxd_consumer_handler_down", &[]) == 1.0 },
    )
    .await;
    let k0_before = server.calls_of("k0");
    assert_eq!(
        handlers_in_status(&bootstrap, &topic, &group, daemon.http_addr),
        serde_json::json!([
            {"handler": "-", "down": false},
            {"handler": "web", "down": true},
        ]),
        "outboxd status shows the handler down"
    );
    // k0 is probed, and fails, more often than its budget allows: none of it counts.
    eventually(
        "k0 called more than max_attempts times",
        Duration::from_secs(60),
        || async { server.calls_of("k0") > 8 },
    )
    .await;
    assert_eq!(dead_letters(&daemon), 0.0);
    server.state.down.store(false, AtomicOrdering::SeqCst);
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dead.len(), 1, "only k0's message: {dead:?}");
    assert_eq!(
        dead[0].headers["outboxd-dlt-attempts"], "6",
        "its calls during the outage were not counted"
    );
    eventually("the others delivered", Duration::from_secs(30), || async {
        server.delivered_count() >= 3
    })
    .await;
    let k0_calls = server.calls_of("k0");
    println!("k0: {k0_before} calls before the outage was detected, {k0_calls} in all");
    daemon.stop().await.unwrap();
    assert_eq!(committed(&bootstrap, &group, &topic, 0), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_the_handler_is_down_dead_letters_nothing() {
    let (topic, _cluster, bootstrap) = consuming("outagekill", 2);
    let server = KeyServer::start().await;
    server.state.down.store(true, AtomicOrdering::SeqCst);
    let (keys, per_key) = (30, 3);
    produce_keys(&bootstrap, &topic, 2, keys, per_key, false).await;
    let dir = tempfile::tempdir().unwrap();
    // Quick retries (default budget of 8 calls): the calls counted before each detection
    // must not use it up.
    let config = process_config(
        dir.path(),
        &bootstrap,
        &topic,
        &server.url,
        "[consumer.retry]\ninitial = \"20ms\"\nmax_delay = \"100ms\"\n",
    );
    for run in 0..2 {
        let mut child = spawn(&config);
        let before = server.state.down_calls.lock().unwrap().len();
        // Detection (at least ten failures), then two probes after the calls stopped.
        eventually(
            "calls to the dead endpoint",
            Duration::from_secs(60),
            || async { server.state.down_calls.lock().unwrap().len() >= before + 10 },
        )
        .await;
        let detected = server.state.down_calls.lock().unwrap().len();
        eventually("two probes", Duration::from_secs(60), || async {
            let calls = server.state.down_calls.lock().unwrap();
            // Probes come a second or more apart; the burst of the detection does not.
            calls.len() >= detected + 2
                && calls[calls.len() - 1] - calls[calls.len() - 2] > Duration::from_millis(500)
        })
        .await;
        kill(&mut child);
        println!(
            "run {run}: {} calls to the dead endpoint",
            server.state.down_calls.lock().unwrap().len() - before
        );
    }
    server.state.down.store(false, AtomicOrdering::SeqCst);
    let mut last = spawn(&config);
    eventually(
        "every message delivered",
        Duration::from_secs(60),
        || async { server.delivered_count() >= keys * per_key as usize },
    )
    .await;
    kill(&mut last);
    assert_in_order_once(&server, keys, per_key);
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        0,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .await;
    assert!(dead.is_empty(), "dead-lettered for the outage: {dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_next_call_of_the_message() {
    let (topic, _cluster, bootstrap) = consuming("retryafter", 1);
    let server = KeyServer::start().await;
    server.fail("k0", true);
    server.state.retry_after.store(2, AtomicOrdering::SeqCst);
    let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
    cfg.consumer.as_mut().unwrap().retry.max_delay = Duration::from_secs(5);
    produce_keys(&bootstrap, &topic, 1, 1, 1, false).await;
    let daemon = Daemon::start(cfg).await;
    let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    eventually("three calls", Duration::from_secs(30), || {
        let (server, times) = (server.clone(), times.clone());
        async move {
            let n = server.calls_of("k0");
            let mut t = times.lock().unwrap();
            if n > t.len() {
                t.push(Instant::now());
            }
            n >= 3
        }
    })
    .await;
    daemon.stop().await.unwrap();
    let t = times.lock().unwrap();
    for pair in t.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1900),
            "Retry-After: 2 asked for 2 s between calls, got {gap:?} (the backoff alone stays under 0.2 s here)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_handlers_database_going_away_pauses_and_resumes_the_handler() {
    let admin = db().await;
    let name = unique("outage_db");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = {
        let base = database_url();
        let (server, _) = base.rsplit_once('/').unwrap();
        format!("{server}/{name}")
    };
    let (topic, _cluster, bootstrap) = consuming("sqloutage", 2);
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "apply")],
        vec![(
            "apply",
            handler(
                "kind = \"sql\"\nstatement = \"INSERT INTO applied (k, s) VALUES ($1, $2)\"\nparams = [\"/k\", \"/s\"]",
            ),
        )],
    );
    cfg.database.url = Some(url.clone());
    cfg.database.connect_timeout = Duration::from_secs(2);
    {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        outboxd::db::migrator(outboxd::db::Backend::Postgres)
            .run(&pool)
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE applied (id bigserial PRIMARY KEY, k text NOT NULL, s bigint NOT NULL)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let (keys, per_key) = (30usize, 4u64);
    produce_keys(&bootstrap, &topic, 2, keys, 1, false).await;
    let daemon = Daemon::start(cfg).await;
    let check = sqlx::PgPool::connect(&url).await.unwrap();
    let applied = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM applied")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    eventually(
        "the first round applied",
        Duration::from_secs(30),
        || async { applied(check.clone()).await == keys as i64 },
    )
    .await;
    check.close().await;
    // The database goes away: it refuses connections and its sessions are ended.
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .execute(&admin)
    .await
    .unwrap();
    // Rounds 1.. of every key, as produce_keys numbers them (k<i>, s = round).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for seq in 1..per_key {
        for i in 0..keys {
            let (key, value) = (format!("k{i}"), format!(r#"{{"k": "k{i}", "s": {seq}}}"#));
            let record: FutureRecord<'_, str, str> = FutureRecord::to(topic.as_str())
                .partition((i % 2) as i32)
                .key(key.as_str())
                .payload(value.as_str());
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }
    eventually(
        "the handler is marked down",
        Duration::from_secs(30),
        || async { daemon.metric("outboxd_consumer_handler_down", &[("handler", "apply")]) == 1.0 },
    )
    .await;
    eventually("two probes", Duration::from_secs(30), || async {
        daemon.metric(
            "outboxd_consumer_probe_calls_total",
            &[("handler", "apply")],
        ) >= 2.0
    })
    .await;
    assert_eq!(
        dead_letters(&daemon),
        0.0,
        "nothing dead-lettered while down"
    );
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    eventually("the handler is back", Duration::from_secs(60), || async {
        daemon.metric("outboxd_consumer_handler_down", &[("handler", "apply")]) == 0.0
    })
    .await;
    let check = sqlx::PgPool::connect(&url).await.unwrap();
    eventually("every event applied", Duration::from_secs(60), || async {
        applied(check.clone()).await == (keys as i64) * per_key as i64
    })
    .await;
    assert_eq!(dead_letters(&daemon), 0.0);
    daemon.stop().await.unwrap();
    // Each key's events in order, once each.
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT k, s FROM applied ORDER BY id")
        .fetch_all(&check)
        .await
        .unwrap();
    let mut seen: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for (k, s) in rows {
        seen.entry(k).or_default().push(s);
    }
    let want: Vec<i64> = (0..per_key as i64).collect();
    assert_eq!(seen.len(), keys);
    assert!(
        seen.values().all(|s| *s == want),
        "each key once and in order"
    );
    check.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
