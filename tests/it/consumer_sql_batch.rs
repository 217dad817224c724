//! The sql handler in batches, as a read model is built: the seed's account projection
//! (20,000 deposits and withdrawals over 200 accounts, 4 partitions) through an outboxd
//! process that is killed with SIGKILL mid-stream and started again, on every backend.
//! Balances and counts equal the write side, each event has its effect once, per-key order
//! holds inside and across batches, and a poison event is the only one dead-lettered;
//! and a poison event inside one batch of twenty, which alone is dead-lettered while the
//! batch runs again without it.

use std::collections::HashMap;
use std::time::Duration;

use crate::backends::{on_backends, Kind, TestDb};
use crate::consumer_helpers::*;
use crate::helpers::*;
use crate::key_server::kill;

const ACCOUNTS: i64 = 200;
const PER_ACCOUNT: i64 = 100;
/// The poison: a deposit to this account so large that the balance's CHECK refuses it,
/// carrying the sequence number of the event after it (it must change nothing).
const POISON_ACCOUNT: i64 = 7;
const POISON_BEFORE_SEQ: i64 = 91;

/// Event `seq` (1-based) of account `a`: its amount, deposits and withdrawals in turn.
fn amount(a: i64, seq: i64) -> i64 {
    let size = (a * 7 + seq * 13) % 100 + 1;
    if seq % 3 == 0 {
        -size
    } else {
        size
    }
}

/// A free port for the process's /metrics.
fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

on_backends!(a_batched_projection_equals_the_write_side_after_a_kill: postgres, mysql, sqlite);
async fn a_batched_projection_equals_the_write_side_after_a_kill(kind: Kind) {
    let db = TestDb::new(kind).await;
    let summary = unique("account_summary");
    let (text, number) = db.pick(
        ("text", "numeric"),
        ("VARCHAR(64)", "DECIMAL(14, 0)"),
        ("TEXT", "NUMERIC"),
    );
    db.exec(&format!(
        "CREATE TABLE {summary} (account_id {text} PRIMARY KEY, balance {number} NOT NULL \
         CHECK (balance < 100000000), events integer NOT NULL, last_seq integer NOT NULL, \
         gaps integer NOT NULL)"
    ))
    .await;
    for a in 0..ACCOUNTS {
        db.exec(&format!(
            "INSERT INTO {summary} VALUES ('acc-{a}', 0, 0, 0, 0)"
        ))
        .await;
    }
    // `gaps` grows by how far each event's sequence number is from the one after the
    // last applied: any event out of order, or applied twice, leaves it above zero.
    let (statement, params) = db.pick(
        (
            format!(
                "UPDATE {summary} SET balance = balance + $1, events = events + 1, \
                 gaps = gaps + abs($2 - last_seq - 1), last_seq = $2 WHERE account_id = $3"
            ),
            r#"["/amount", "/seq", "/accountId"]"#,
        ),
        (
            format!(
                "UPDATE {summary} SET balance = balance + ?, events = events + 1, \
                 gaps = gaps + abs(? - last_seq - 1), last_seq = ? WHERE account_id = ?"
            ),
            r#"["/amount", "/seq", "/seq", "/accountId"]"#,
        ),
        (
            format!(
                "UPDATE {summary} SET balance = balance + ?, events = events + 1, \
                 gaps = gaps + abs(? - last_seq - 1), last_seq = ? WHERE account_id = ?"
            ),
            r#"["/amount", "/seq", "/seq", "/accountId"]"#,
        ),
    );
    let (topic, _cluster, bootstrap) = consuming("projection", 4);
    // Seq-major: every account's first event, then every second one, ...
    let mut events: Vec<(i32, String, String, String)> = Vec::new();
    for seq in 1..=PER_ACCOUNT {
        for a in 0..ACCOUNTS {
            let (key, id) = (format!("acc-{a}"), format!("{summary}-{a}-{seq}"));
            if a == POISON_ACCOUNT && seq == POISON_BEFORE_SEQ {
                let value =
                    format!(r#"{{"accountId": "{key}", "amount": 500000000, "seq": {seq}}}"#);
                events.push(((a % 4) as i32, key.clone(), value, format!("{id}-poison")));
            }
            let value = format!(
                r#"{{"accountId": "{key}", "amount": {}, "seq": {seq}}}"#,
                amount(a, seq)
            );
            events.push(((a % 4) as i32, key, value, id));
        }
    }
    for chunk in events.chunks(2000) {
        produce_identified(&bootstrap, &topic, chunk, &[]).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let config = dir.path().join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n\
             [kafka]\nbrokers = \"{bootstrap}\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 6000\n\
             [http]\nlisten = \"{listen}\"\n\
             [consumer]\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\nmax_in_flight = 64\n\
             [[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"projection\"\n\
             [handlers.projection]\nkind = \"sql\"\nbatch_size = 64\nstatement = \"{statement}\"\nparams = {params}\n",
            url = db.url,
            group = unique("group"),
        ),
    )
    .unwrap();
    let applied = || async {
        db.scalar(&format!(
            "SELECT count(*) FROM outboxd_inbox WHERE handler = 'projection' AND event_id LIKE '{summary}-%'"
        ))
        .await
    };
    let total = ACCOUNTS * PER_ACCOUNT;
    let mut first = crate::key_server::spawn(&config);
    eventually("a quarter applied", Duration::from_secs(60), || async {
        applied().await >= total / 8
    })
    .await;
    kill(&mut first);
    let killed_at = applied().await;
    assert!(killed_at < total, "killed mid-stream: {killed_at}");
    let mut second = crate::key_server::spawn(&config);
    eventually("every event applied", Duration::from_secs(120), || async {
        applied().await == total
    })
    .await;
    let (_, metrics) = http_get(listen, "/metrics").await;
    kill(&mut second);
    // The write side.
    let rows = db
        .pairs(&format!(
            "SELECT account_id, {} FROM {summary}",
            db.pick(
                "balance::text || ' ' || events || ' ' || last_seq || ' ' || gaps",
                "CONCAT(balance, ' ', events, ' ', last_seq, ' ', gaps)",
                "CAST(balance AS INTEGER) || ' ' || events || ' ' || last_seq || ' ' || gaps",
            )
        ))
        .await;
    let read_model: HashMap<String, String> = rows.into_iter().collect();
    for a in 0..ACCOUNTS {
        let balance: i64 = (1..=PER_ACCOUNT).map(|s| amount(a, s)).sum();
        assert_eq!(
            read_model[&format!("acc-{a}")],
            format!("{balance} {PER_ACCOUNT} {PER_ACCOUNT} 0"),
            "acc-{a}: balance, events, last sequence number, gaps"
        );
    }
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    let ids: Vec<&str> = dead
        .iter()
        .map(|d| d.headers["event-id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [format!(
            "{summary}-{POISON_ACCOUNT}-{POISON_BEFORE_SEQ}-poison"
        )],
        "the poison alone is dead-lettered"
    );
    assert_eq!(dead[0].headers["outboxd-dlt-error-class"], "permanent");
    assert_eq!(dead[0].headers["outboxd-dlt-attempts"], "1");
    // Events went in batches.
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("handler=\"projection\""))
            .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
            .unwrap_or_else(|| panic!("{name} in:\n{metrics}"))
    };
    let (batches, events) = (
        value("outboxd_consumer_batch_size_count"),
        value("outboxd_consumer_batch_size_sum"),
    );
    assert!(
        events / batches >= 4.0,
        "{events} events in {batches} transactions"
    );
    println!(
        "{kind:?}: killed after {killed_at} events; the second process applied {events} in {batches} transactions"
    );
}

on_backends!(a_poison_event_inside_a_batch_is_the_only_one_dead_lettered: postgres, mysql, sqlite);
async fn a_poison_event_inside_a_batch_is_the_only_one_dead_lettered(kind: Kind) {
    let db = TestDb::new(kind).await;
    let ledger = unique("ledger");
    let (text, number) = db.pick(
        ("text", "integer"),
        ("VARCHAR(64)", "INTEGER"),
        ("TEXT", "INTEGER"),
    );
    db.exec(&format!(
        "CREATE TABLE {ledger} (account_id {text} NOT NULL, amount {number} NOT NULL CHECK (amount > 0))"
    ))
    .await;
    let (p1, p2) = db.pick(("$1", "$2"), ("?", "?"), ("?", "?"));
    let (topic, _cluster, bootstrap) = consuming("batchpoison", 1);
    // Twenty keys, one message each, the poison (a negative amount) among them: every one
    // is the head of its key, and the linger lets them all into one batch.
    let values: Vec<Identified> = (0..20)
        .map(|n| {
            let amount = if n == 13 { -5 } else { n + 1 };
            let value = format!(r#"{{"accountId": "acc-{n}", "amount": {amount}}}"#);
            (0, format!("acc-{n}"), value, format!("{ledger}-{n}"))
        })
        .collect();
    produce_identified(&bootstrap, &topic, &values, &[]).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "ledger")],
        vec![(
            "ledger",
            handler(&format!(
                "kind = \"sql\"\nstatement = \"INSERT INTO {ledger} (account_id, amount) VALUES ({p1}, {p2})\"\n\
                 params = [\"/accountId\", \"/amount\"]\nbatch_size = 32\nbatch_linger = \"1s\""
            )),
        )],
    );
    cfg.database.url = Some(db.url.clone());
    // Room for all twenty calls at once (a batch holds at most the calls in flight).
    cfg.consumer.as_mut().unwrap().max_in_flight = 64;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    let ids: Vec<&str> = dead
        .iter()
        .map(|d| d.headers["event-id"].as_str())
        .collect();
    assert_eq!(ids, [format!("{ledger}-13")], "the poison alone");
    assert_eq!(dead[0].headers["outboxd-dlt-error-class"], "permanent");
    eventually("the others applied", Duration::from_secs(30), || async {
        db.scalar(&format!("SELECT count(*) FROM {ledger}")).await == 19
    })
    .await;
    let handler = [("handler", "ledger")];
    assert_eq!(
        daemon.metric("outboxd_consumer_batch_size_count", &handler),
        1.0,
        "one batch of all twenty"
    );
    assert_eq!(
        daemon.metric("outboxd_consumer_batch_splits_total", &handler),
        1.0
    );
    let total = db
        .scalar(&format!(
            "SELECT CAST(sum(amount) AS {}) FROM {ledger}",
            db.pick("int8", "SIGNED", "INTEGER")
        ))
        .await;
    assert_eq!(total, (1..=20).sum::<i64>() - 14, "each of the others once");
    daemon.stop().await.unwrap();
}
