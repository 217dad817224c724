//! WAL capture under faults: the relay killed with SIGKILL mid-stream, a standby replica
//! taking over the slot, Kafka down for half a minute, PostgreSQL restarted mid-stream,
//! and an initial snapshot of 200,000 rows taken while writers go on.

use std::time::Duration;

use outboxd::config::Snapshot;
use sqlx::PgPool;

use crate::faults::{scaled, spawn};
use crate::faults_infra::ThrowawayPg;
use crate::helpers::*;
use crate::relay_wal::{event_store, logical_db, logical_url, retire, streaming, wal_config};

/// `outboxd run` configuration (TOML) relaying `table` from its slot.
fn toml(url: &str, bootstrap: &str, table: &str, batch: u32) -> String {
    format!(
        "[database]\nurl = \"{url}\"\n[kafka]\nbrokers = \"{bootstrap}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nlevel = \"warn\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\ncapture = \"wal\"\n\
         key_column = \"aggregate_id\"\npayload_column = \"data\"\nheaders_column = \"metadata\"\n\
         created_at_column = \"timestamp\"\nevent_id_column = \"\"\naggregate_type_column = \"\"\n\
         notify_channel = \"\"\nbatch_size = {batch}\nrebalance_interval = \"200ms\"\n\
         [relay.tables.wal]\nsnapshot = \"new\"\nstatus_interval = \"200ms\"\n"
    )
}

/// Writes rows `first..first + count` in transactions of 50, about 5,000 rows a second;
/// a transaction that fails (the server restarting) is written again.
async fn write(pool: PgPool, table: String, first: i64, count: i64) {
    let mut n = first;
    while n < first + count {
        let rows = 50.min(first + count - n);
        let written = sqlx::query(&format!(
            "INSERT INTO {table} (aggregate_id, event_type, version, data) \
             SELECT 'a' || (g % 50), '{table}', g, jsonb_build_object('n', g) \
             FROM generate_series($1::int8, $2::int8) g ORDER BY g"
        ))
        .bind(n)
        .bind(n + rows - 1)
        .execute(&pool)
        .await;
        if written.is_ok() {
            n += rows;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The server's current WAL position.
async fn wal_now(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until the slot confirmed `lsn`.
async fn confirmed_past(pool: &PgPool, slot: &str, lsn: &str, timeout: Duration) {
    eventually(&format!("slot {slot} confirmed {lsn}"), timeout, || async {
        sqlx::query_scalar::<_, Option<bool>>(
            "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .bind(lsn)
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
        .unwrap_or(false)
    })
    .await;
}

fn kill9(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Killed three times while writers go on: every row arrives, per-key order holds, and
/// each kill re-sends at most the batch in flight and what was acknowledged within the
/// last status interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_relay_killed_with_sigkill_three_times_loses_nothing() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 4);
    let batch = 200;
    let total = scaled(20_000);
    let config = toml(&logical_url(), &cluster.bootstrap_servers(), &table, batch);
    let cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::New);
    let slot = cfg.relay.tables[0].wal_slot();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = spawn(dir.path(), "wal0", &config);
    streaming(&pool, &cfg).await;
    let writer = tokio::spawn(write(pool.clone(), table.clone(), 0, total));
    let kills = 3;
    for i in 0..kills {
        let at = wal_now(&pool).await;
        confirmed_past(&pool, &slot, &at, Duration::from_secs(60)).await;
        kill9(&mut child);
        (child, _) = spawn(dir.path(), &format!("wal{}", i + 1), &config);
    }
    writer.await.unwrap();
    let end = wal_now(&pool).await;
    confirmed_past(&pool, &slot, &end, Duration::from_secs(120)).await;
    let (code, _) = terminate(&mut child, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));

    let received = consume_all_in_order(&cluster.bootstrap_servers(), &topic, total).await;
    let duplicates = received.len() as i64 - total;
    // 200 ms of acknowledgements at about 5,000 rows/s, plus a batch and a transaction.
    let bound = kills * (1_000 + i64::from(batch) + 50);
    eprintln!("fault kill -9 wal relay: rows {total}, kills {kills}, duplicates {duplicates} (bound {bound})");
    assert!(duplicates <= bound, "{duplicates} duplicates > {bound}");
    retire(&pool, &cfg).await;
}

/// Two replicas of one table: one reads the slot, the other stands by; after a SIGKILL
/// of the reader the other takes over and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_the_slot_over_after_a_sigkill() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::New);
    let slot = cfg.relay.tables[0].wal_slot();
    let named = |name: &str| {
        let url = format!("{}?application_name={name}", logical_url());
        toml(&url, &cluster.bootstrap_servers(), &table, 100)
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = spawn(dir.path(), "replica_a", &named("replica_a"));
    streaming(&pool, &cfg).await;
    let (b, _) = spawn(dir.path(), "replica_b", &named("replica_b"));
    let mut children = [("replica_a", a), ("replica_b", b)];
    let reader = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT r.application_name::text FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    // The replica holding the slot's advisory lock is the one reading it.
    let (class, object) = (
        outboxd::relay::store::stable_hash("outboxd:wal"),
        outboxd::relay::store::stable_hash(&slot),
    );
    let leader = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT a.application_name::text FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int = $1 \
             AND l.objid::int = $2 AND l.objsubid = 2",
        )
        .bind(class)
        .bind(object)
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    write(pool.clone(), table.clone(), 0, 1_000).await;
    let first = reader().await.expect("one replica reads the slot");
    assert_eq!(
        leader().await,
        std::slice::from_ref(&first),
        "the reader holds the lock, alone"
    );
    let (killed, survivor) = if first == "replica_a" { (0, 1) } else { (1, 0) };
    kill9(&mut children[killed].1);
    let other = children[survivor].0;
    eventually(
        "the standby reads the slot",
        Duration::from_secs(30),
        || async { reader().await.as_deref() == Some(other) },
    )
    .await;
    write(pool.clone(), table.clone(), 1_000, 1_000).await;
    let end = wal_now(&pool).await;
    confirmed_past(&pool, &slot, &end, Duration::from_secs(60)).await;
    let (code, _) = terminate(&mut children[survivor].1, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    consume_all_in_order(&cluster.bootstrap_servers(), &topic, 2_000).await;
    retire(&pool, &cfg).await;
}

/// Kafka down for 30 seconds while rows are written: the slot does not confirm past what
/// Kafka has not acknowledged, and every row arrives once Kafka is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_for_thirty_seconds_the_slot_waits_and_nothing_is_lost() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::New);
    let slot = cfg.relay.tables[0].wal_slot();
    let daemon = Daemon::start(cfg.clone()).await;
    streaming(&pool, &cfg).await;
    write(pool.clone(), table.clone(), 0, 500).await;
    confirmed_past(&pool, &slot, &wal_now(&pool).await, Duration::from_secs(30)).await;
    cluster.broker_down(1).unwrap();
    write(pool.clone(), table.clone(), 500, 500).await;
    let during = wal_now(&pool).await;
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        let passed: bool = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .bind(&during)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(
            !passed,
            "the slot confirmed rows Kafka has not acknowledged"
        );
        // The slot confirms a transaction only after all its rows are published, and
        // none of the outage's is.
        let published = daemon.metric("outboxd_relay_published_total", &[("table", &table)]);
        assert_eq!(published, 500.0, "published during the outage");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.broker_up(1).unwrap();
    confirmed_past(&pool, &slot, &during, Duration::from_secs(60)).await;
    let received = consume_all_in_order(&cluster.bootstrap_servers(), &topic, 1_000).await;
    assert!(received.len() >= 1_000);
    daemon.stop().await.unwrap();
    retire(&pool, &cfg).await;
}

/// PostgreSQL restarted while rows stream: the relay reconnects, the slot goes on from
/// its confirmed position, and every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_the_wal_relay_goes_on() {
    let pg = ThrowawayPg::start_with("-c wal_level=logical");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg.url)
        .await
        .unwrap();
    outboxd::db::migrator(outboxd::db::Backend::Postgres)
        .run(&pool)
        .await
        .unwrap();
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let mut cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::New);
    cfg.database.url = Some(pg.url.clone());
    let slot = cfg.relay.tables[0].wal_slot();
    let daemon = Daemon::start(cfg.clone()).await;
    streaming(&pool, &cfg).await;
    let writer = tokio::spawn(write(pool.clone(), table.clone(), 0, 1_000));
    tokio::time::sleep(Duration::from_millis(50)).await;
    pg.restart();
    writer.await.unwrap();
    write(pool.clone(), table.clone(), 1_000, 1_000).await;
    confirmed_past(&pool, &slot, &wal_now(&pool).await, Duration::from_secs(60)).await;
    consume_all_in_order(&cluster.bootstrap_servers(), &topic, 2_000).await;
    daemon.stop().await.unwrap();
}

/// The initial snapshot of 200,000 existing rows while writers go on: each row once,
/// and the rows written meanwhile follow in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_snapshot_of_200000_rows_while_writers_go_on_sends_each_row_once() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 4);
    let existing = scaled(200_000);
    write_all(&pool, &table, 0, existing).await;
    let mut cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::All);
    cfg.relay.tables[0].batch_size = 1_000;
    let slot = cfg.relay.tables[0].wal_slot();
    let daemon = Daemon::start(cfg.clone()).await;
    // Writers go on across the hand-over: from the slot's creation, while its snapshot is
    // published, and after.
    let snapshot_done = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT snapshot_done FROM outboxd_relay_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    eventually(
        "the slot is being created",
        Duration::from_secs(60),
        || async { snapshot_done().await.is_some() },
    )
    .await;
    let writer = tokio::spawn(write(pool.clone(), table.clone(), existing, 2_000));
    eventually("the writer wrote", Duration::from_secs(30), || async {
        count_rows(&pool, &table).await > existing
    })
    .await;
    let wrote_during_snapshot = snapshot_done().await == Some(false);
    writer.await.unwrap();
    let total = existing + 2_000;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        total as usize,
        Duration::from_secs(2),
        Duration::from_secs(240),
    )
    .await;
    assert_each_once(&received, total);
    assert_first_deliveries_in_key_order(&received);
    assert!(
        wrote_during_snapshot,
        "rows were written while the snapshot was published"
    );
    daemon.stop().await.unwrap();
    retire(&pool, &cfg).await;
}

/// Rows `first..first + count` in one statement.
async fn write_all(pool: &PgPool, table: &str, first: i64, count: i64) {
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_id, event_type, version, data) \
         SELECT 'a' || (g % 50), '{table}', g, jsonb_build_object('n', g) \
         FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) g ORDER BY g"
    ))
    .bind(first)
    .bind(count)
    .execute(pool)
    .await
    .unwrap();
}

/// Killed while it publishes the initial snapshot: the next start drops the unfinished
/// slot, creates it again and publishes the snapshot again; every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_during_the_initial_snapshot_starts_it_over_and_loses_nothing() {
    let pool = logical_db().await;
    let table = event_store(&pool).await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 4);
    let existing = scaled(100_000);
    write_all(&pool, &table, 0, existing).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = toml(&logical_url(), &cluster.bootstrap_servers(), &table, 500)
        .replace("snapshot = \"new\"", "snapshot = \"all\"")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
    let slot = format!("outboxd_{table}");
    let snapshot_done = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT snapshot_done FROM outboxd_relay_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    let published = || async {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // Not listening yet: nothing published.
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return 0.0;
        }
        let (_, body) = http_get(addr, "/metrics").await;
        outboxd::metrics::sum_in(&body, "outboxd_relay_published_total", &[])
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = spawn(dir.path(), "snapshot0", &config);
    eventually(
        "the snapshot is under way",
        Duration::from_secs(60),
        || async { snapshot_done().await == Some(false) && published().await > 0.0 },
    )
    .await;
    kill9(&mut child);
    let (mut child, log) = spawn(dir.path(), "snapshot1", &config);
    eventually(
        "the snapshot is published",
        Duration::from_secs(120),
        || async { snapshot_done().await == Some(true) },
    )
    .await;
    write(pool.clone(), table.clone(), existing, 1_000).await;
    confirmed_past(&pool, &slot, &wal_now(&pool).await, Duration::from_secs(60)).await;
    let (code, _) = terminate(&mut child, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(log).unwrap());
    consume_all_in_order(&cluster.bootstrap_servers(), &topic, existing + 1_000).await;
    let cfg = wal_config(&table, &cluster.bootstrap_servers(), Snapshot::All);
    retire(&pool, &cfg).await;
}
