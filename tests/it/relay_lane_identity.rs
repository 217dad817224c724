//! Lane identity across replicas: a table is one table whatever its configured spelling,
//! tables of two databases on one MySQL server are two tables, replicas with different
//! `lanes` settings never claim side by side, and SQLite's lane lock belongs to the
//! database file (every path and process meets it; a standby takes over).

use std::time::Duration;

use sqlx::Connection;

use crate::backends::{mysql_url, on_backends, Kind, TestDb};
use crate::helpers::*;
use crate::relay_backends::setup;

fn owned(d: &Daemon, table: &str) -> f64 {
    d.metric("outboxd_relay_lanes_owned", &[("table", table)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spellings_of_one_table_share_its_lanes() {
    let (db, table, topic, cluster) = setup(Kind::Postgres, "spelling", 2).await;
    let mut plain = db.config(&table, &cluster.bootstrap_servers());
    plain.relay.tables[0].lanes = 2;
    let mut qualified = plain.clone();
    qualified.relay.tables[0].table = format!("public.{table}");
    let a = Daemon::start(plain).await;
    let b = Daemon::start(qualified).await;
    eventually(
        "the lanes are split 1/1",
        Duration::from_secs(15),
        || async { owned(&a, &table) == 1.0 && owned(&b, &format!("public.{table}")) == 1.0 },
    )
    .await;
    db.insert_rows(&table, 0, 2000, 50).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        2000,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_exactly_once(&received, 0, 2000);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_tables_of_the_same_name_in_two_databases_do_not_share_lanes() {
    let server = mysql_url();
    let base = server.rsplit_once('/').unwrap().0.to_owned();
    let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
    let databases = [unique("dba"), unique("dbb")];
    let cluster = cluster("t.outbox", 1);
    let mut daemons = Vec::new();
    for name in &databases {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let mut cfg = crate::helpers::config("outbox", &cluster.bootstrap_servers());
        cfg.database.url = Some(format!("{base}/{name}"));
        cfg.database.migrate = true;
        let t = &mut cfg.relay.tables[0];
        t.notify_channel = None;
        t.poll_interval = Duration::from_millis(100);
        daemons.push(Daemon::start(cfg).await);
    }
    eventually(
        "each database's relay owns its lane",
        Duration::from_secs(15),
        || async { daemons.iter().all(|d| owned(d, "outbox") == 1.0) },
    )
    .await;
    for d in daemons {
        d.stop().await.unwrap();
    }
    for name in &databases {
        sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

on_backends!(replicas_with_different_lane_counts_claim_nothing_side_by_side: postgres, mysql);
async fn replicas_with_different_lane_counts_claim_nothing_side_by_side(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = db.outbox_table("lanecount").await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 2);
    let conflict = |d: &Daemon| d.metric("outboxd_relay_lanes_conflict", &[("table", &table)]);
    let mut two = db.config(&table, &cluster.bootstrap_servers());
    two.relay.tables[0].lanes = 2;
    let mut four = two.clone();
    four.relay.tables[0].lanes = 4;
    let a = Daemon::start(two).await;
    eventually(
        "the first relay owns both lanes",
        Duration::from_secs(15),
        || async { owned(&a, &table) == 2.0 },
    )
    .await;
    let b = Daemon::start(four).await;
    eventually(
        "both see the other lane count and hold nothing",
        Duration::from_secs(15),
        || async {
            conflict(&a) == 1.0
                && conflict(&b) == 1.0
                && owned(&a, &table) == 0.0
                && owned(&b, &table) == 0.0
        },
    )
    .await;
    db.insert_rows(&table, 0, 100, 10).await;
    b.stop().await.unwrap();
    eventually(
        "alone again, the first relay drains",
        Duration::from_secs(20),
        || async {
            conflict(&a) == 0.0 && owned(&a, &table) == 2.0 && db.count_rows(&table).await == 0
        },
    )
    .await;
    a.stop().await.unwrap();
}

/// The SQLite lane lock belongs to the database file: a relay in another process that
/// reaches the file through a symlink keeps this one out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lane_lock_holds_across_paths_and_processes() {
    let (db, table, topic, cluster) = setup(Kind::Sqlite, "paths", 1).await;
    let file = db
        .url
        .trim_start_matches("sqlite://")
        .trim_end_matches("?mode=rwc")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("same.db");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let toml = format!(
        "[database]\nurl = \"sqlite://{}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\npoll_interval = \"100ms\"\n\
         notify_channel = \"\"\nrebalance_interval = \"300ms\"\n",
        link.display(),
        cluster.bootstrap_servers()
    );
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, &toml).unwrap();
    let mut other = std::process::Command::new(crate::cli::BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the other process owns the lane",
        Duration::from_secs(20),
        || async {
            let (code, out, _) = crate::cli::run_with(&["status", "--json"], &toml, &[]);
            code == 0
                && serde_json::from_str::<serde_json::Value>(&out).unwrap()["relay"][0]["owners"]
                    .as_array()
                    .is_some_and(|o| o.len() == 1)
        },
    )
    .await;
    let here = Daemon::start(db.config(&table, &cluster.bootstrap_servers())).await;
    db.insert_rows(&table, 0, 300, 10).await;
    db.drained(&table, Duration::from_secs(20)).await;
    let owned = here.metric("outboxd_relay_lanes_owned", &[("table", &table)]);
    let (code, _) = terminate(&mut other, Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        owned, 0.0,
        "the relay reaching the file by its own path stayed out"
    );
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        300,
        Duration::from_millis(300),
        Duration::from_secs(20),
    )
    .await;
    assert_exactly_once(&received, 0, 300);
    here.stop().await.unwrap();
}

/// SQLite has one writer: a second relay on the same file waits for the lane lock and
/// takes over when the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_second_relay_waits_for_the_lane_and_takes_over() {
    let (db, table, topic, cluster) = setup(Kind::Sqlite, "standby", 2).await;
    let cfg = db.config(&table, &cluster.bootstrap_servers());
    let a = Daemon::start(cfg.clone()).await;
    let owned = |d: &Daemon| d.metric("outboxd_relay_lanes_owned", &[("table", &table)]);
    eventually(
        "first relay owns the lane",
        Duration::from_secs(10),
        || async { owned(&a) == 1.0 },
    )
    .await;
    let b = Daemon::start(cfg).await;
    db.insert_rows(&table, 0, 500, 10).await;
    db.drained(&table, Duration::from_secs(20)).await;
    assert_eq!(owned(&b), 0.0, "the lane lock keeps the second relay out");
    a.stop().await.unwrap();
    eventually(
        "standby takes the lane",
        Duration::from_secs(10),
        || async { owned(&b) == 1.0 },
    )
    .await;
    db.insert_rows(&table, 500, 500, 10).await;
    db.drained(&table, Duration::from_secs(20)).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        1000,
        Duration::from_millis(500),
        Duration::from_secs(20),
    )
    .await;
    assert_exactly_once(&received, 0, 1000);
    b.stop().await.unwrap();
}
