//! Lane identity across replicas: a table is one table whatever its configured spelling,
//! tables of two databases on one MySQL server are two tables, and replicas with
//! different `lanes` settings never claim side by side.

use std::time::Duration;

use sqlx::Connection;

use crate::backends::{mysql_url, on_backends, Kind, TestDb};
use crate::helpers::*;

fn owned(d: &Daemon, table: &str) -> f64 {
    d.metric("outboxd_relay_lanes_owned", &[("table", table)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spellings_of_one_table_share_its_lanes() {
    let (db, table, topic, cluster) =
        crate::relay_backends::setup(Kind::Postgres, "spelling", 2).await;
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
        t.notify_channel = String::new();
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
