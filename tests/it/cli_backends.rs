//! `outboxd emit` and `outboxd status` on every backend: an emitted row shows up as pending,
//! the relay publishes it, and status then names the lane's owner.

use std::time::Duration;

use crate::backends::{on_backends, Kind, TestDb};
use crate::cli::run_with;
use crate::helpers::*;

on_backends!(emit_and_status_work_on_every_backend: postgres, mysql, sqlite);
async fn emit_and_status_work_on_every_backend(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = db.outbox_table("emitstatus").await;
    let topic = topic_of(&table);
    let cluster = cluster(&topic, 1);
    let toml = format!(
        "[database]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"t.{{event_type}}\"\n",
        db.url,
        cluster.bootstrap_servers()
    );
    let (code, out, err) = run_with(
        &[
            "emit",
            "--type",
            &table,
            "--key",
            "acc-7",
            "--header",
            "tenant=acme",
            r#"{"n": 7}"#,
        ],
        &toml,
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("inserted row "), "{out}");
    let (code, _, err) = run_with(
        &["emit", "--type", "X", "--key", "k", "{not json"],
        &toml,
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("not JSON"), "{err}");
    let status = |toml: String| async move {
        let (code, out, err) = run_with(&["status", "--json"], &toml, &[]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["relay"][0].clone()
    };
    let before = status(toml.clone()).await;
    assert_eq!(before["pending"], 1, "{before}");
    assert_eq!(before["dead_rows"], 0, "{before}");
    assert!(
        before["oldest_pending_seconds"].as_f64().unwrap() >= 0.0,
        "{before}"
    );
    assert_eq!(before["owners"].as_array().unwrap().len(), 0, "{before}");

    let daemon = Daemon::start(db.config(&table, &cluster.bootstrap_servers())).await;
    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        1,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!((received[0].n, received[0].key.as_str()), (7, "acc-7"));
    assert_eq!(received[0].headers["tenant"], "acme");
    assert_eq!(received[0].headers["aggregate-type"], "outboxd-emit");
    db.drained(&table, Duration::from_secs(10)).await;
    let after = status(toml).await;
    assert_eq!(after["pending"], 0, "{after}");
    let owners = after["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 1, "the running relay holds the lane: {after}");
    assert_eq!(owners[0]["lane"], 0);
    assert_eq!(
        owners[0]["pid"].is_number(),
        kind != Kind::Sqlite,
        "a session id where the database has one: {after}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_inbox_migration_keeps_the_events_it_recorded() {
    use sqlx::Connection;
    let name = unique("mig");
    let server = crate::backends::mysql_url();
    let base = server.rsplit_once('/').unwrap().0.to_owned();
    let url = format!("{base}/{name}");
    let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let toml = format!(
        "[database]\nurl = \"{url}\"\n[kafka]\nbrokers = \"embedded\"\n[[relay.tables]]\ntable = \"outbox\"\ntopic = \"e.{{event_type}}\"\n"
    );
    let (code, _, err) = run_with(&["migrate"], &toml, &[]);
    assert_eq!(code, 0, "{err}");
    // Back to the inbox as the previous version left it, with one event recorded.
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    let old = include_str!("../../migrations/mysql/20261126000003_inbox.sql")
        .trim()
        .trim_end_matches(';');
    sqlx::raw_sql(&format!(
        "DROP TABLE outboxd_inbox; {old}; \
         INSERT INTO outboxd_inbox (handler, event_id) VALUES ('h', 'Old-Event'); \
         DELETE FROM _sqlx_migrations WHERE version = 20261202000004"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let (code, _, err) = run_with(&["migrate"], &toml, &[]);
    assert_eq!(code, 0, "{err}");
    let recorded: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT CAST(handler AS CHAR), CAST(event_id AS CHAR), event_hash = UNHEX(SHA2('Old-Event', 256)) FROM outboxd_inbox",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(recorded, [("h".into(), "Old-Event".into(), true)]);
    // The same id in other case is another event now.
    let inserted = sqlx::query(
        "INSERT IGNORE INTO outboxd_inbox (handler, event_id, event_hash) VALUES ('h', 'old-event', UNHEX(SHA2('old-event', 256)))",
    )
    .execute(&mut conn)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(inserted, 1);
    conn.close().await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
}
