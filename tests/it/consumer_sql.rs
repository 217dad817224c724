//! The sql handler and its inbox on every backend: each event has its effect once,
//! undecodable payloads and constraint violations are dead-lettered.

use std::time::Duration;

use crate::backends::{on_backends, Kind, TestDb};
use crate::consumer_helpers::*;
use crate::helpers::*;

on_backends!(sql_handler_applies_each_event_once_and_dead_letters_bad_payloads: postgres, mysql, sqlite);
async fn sql_handler_applies_each_event_once_and_dead_letters_bad_payloads(kind: Kind) {
    let db = TestDb::new(kind).await;
    let summary = unique("summary");
    let (id, amount) = db.pick(
        ("text", "numeric"),
        ("VARCHAR(64)", "DECIMAL(12, 1)"),
        ("TEXT", "NUMERIC"),
    );
    db.exec(&format!(
        "CREATE TABLE {summary} (account_id {id} PRIMARY KEY, balance {amount} NOT NULL)"
    ))
    .await;
    db.exec(&format!("INSERT INTO {summary} VALUES ('acc-1', 0)"))
        .await;
    let (p1, p2) = db.pick(("$1", "$2"), ("?", "?"), ("?", "?"));
    let (topic, _cluster, bootstrap) = consuming("sql", 1);
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, Some("DepositMade"), "balance"), (&topic, Some("AccountOpened"), "open")],
        vec![
            ("balance", handler(&format!(
                "kind = \"sql\"\nstatement = \"UPDATE {summary} SET balance = balance + {p1} WHERE account_id = {p2}\"\nparams = [\"/amount\", \"/accountId\"]"
            ))),
            ("open", handler(&format!(
                "kind = \"sql\"\nstatement = \"INSERT INTO {summary} (account_id, balance) VALUES ({p1}, 0)\"\nparams = [\"/accountId\"]"
            ))),
        ],
    );
    cfg.database.url = Some(db.url.clone());
    // Event ids unique to this run: the inbox outlives it.
    let (d1, d2, d3, o1) = (
        format!("{summary}-1"),
        format!("{summary}-2"),
        format!("{summary}-3"),
        format!("{summary}-open"),
    );
    let deposit = ("event-type", "DepositMade");
    let ten = br#"{"amount": 10.5, "accountId": "acc-1"}"#;
    produce(
        &bootstrap,
        &topic,
        &[
            (0, "acc-1", ten, &[("event-id", &d1), deposit]),
            // The same event delivered again (e.g. a relay retry): no second effect.
            (0, "acc-1", ten, &[("event-id", &d1), deposit]),
            (
                0,
                "acc-1",
                br#"{"amount": 5, "accountId": "acc-1"}"#,
                &[("event-id", &d2), deposit],
            ),
            (0, "acc-1", b"not json", &[("event-id", &d3), deposit]),
            (
                0,
                "acc-1",
                br#"{"accountId": "acc-1"}"#,
                &[("event-id", &o1), ("event-type", "AccountOpened")],
            ),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        2,
        Duration::from_millis(300),
        Duration::from_secs(30),
    )
    .await;
    let tenths = db
        .scalar(&format!(
            "SELECT CAST(balance * 10 AS {}) FROM {summary} WHERE account_id = 'acc-1'",
            db.pick("int8", "SIGNED", "INTEGER")
        ))
        .await;
    assert_eq!(tenths, 155, "10.5 + 5, the repeated event applied once");
    let decode = dead
        .iter()
        .find(|d| d.headers["event-id"] == d3)
        .expect("decode dead letter");
    assert_eq!(decode.headers["outboxd-dlt-error-class"], "decode");
    assert_eq!(
        decode.headers["outboxd-dlt-attempts"], "1",
        "no retries for an undecodable payload"
    );
    let conflict = dead
        .iter()
        .find(|d| d.headers["event-id"] == o1)
        .expect("constraint dead letter");
    assert_eq!(conflict.headers["outboxd-dlt-error-class"], "permanent");
    // The duplicate key's code: SQLSTATE on PostgreSQL and MySQL, SQLite's extended code.
    let code = db.pick("23505", "23000", "1555");
    assert!(
        conflict.headers["outboxd-dlt-error-message"].contains(code),
        "{:?}",
        conflict.headers
    );
    let inbox = db
        .scalar(&format!(
            "SELECT count(*) FROM outboxd_inbox WHERE handler = 'balance' AND event_id IN ('{d1}', '{d2}')"
        ))
        .await;
    assert_eq!(inbox, 2);
    daemon.stop().await.unwrap();
}

on_backends!(inbox_ids_compare_exactly: postgres, mysql, sqlite);
async fn inbox_ids_compare_exactly(kind: Kind) {
    let db = TestDb::new(kind).await;
    let effects = unique("effects");
    db.exec(&format!(
        "CREATE TABLE {effects} (event_id {} NOT NULL)",
        db.pick("text", "TEXT", "TEXT")
    ))
    .await;
    let p1 = db.pick("$1", "?", "?");
    let (topic, _cluster, bootstrap) = consuming("inboxids", 1);
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "record")],
        vec![(
            "record",
            handler(&format!(
                "kind = \"sql\"\nstatement = \"INSERT INTO {effects} (event_id) VALUES ({p1})\"\nparams = [\"/id\"]"
            )),
        )],
    );
    cfg.database.url = Some(db.url.clone());
    // Ids unique to this run that differ only in case, or only after 255 characters.
    let base = unique("Ev");
    let long = format!("{base}{}", "x".repeat(300));
    let ids = [
        base.clone(),
        base.to_lowercase(),
        format!("{long}-a"),
        format!("{long}-b"),
    ];
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| format!("{{\"id\": \"{id}\"}}"))
        .collect();
    let headers: Vec<[(&str, &str); 1]> =
        ids.iter().map(|id| [("event-id", id.as_str())]).collect();
    let messages: Vec<Msg<'_>> = bodies
        .iter()
        .zip(&headers)
        .map(|(b, h)| (0, "k", b.as_bytes(), &h[..]))
        .collect();
    produce(&bootstrap, &topic, &messages).await;
    let daemon = Daemon::start(cfg).await;
    eventually("every event handled", Duration::from_secs(30), || async {
        daemon.metric("outboxd_consumer_messages_total", &[("outcome", "done")]) == 4.0
    })
    .await;
    daemon.stop().await.unwrap();
    let applied = db.scalar(&format!("SELECT count(*) FROM {effects}")).await;
    assert_eq!(applied, 4, "each distinct id had its effect");
}
