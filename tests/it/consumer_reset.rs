//! `outboxd consumer reset`: refused while the group has another member; with the
//! consumers stopped, the group goes back to the start of its topics and the `sql`
//! handler's inbox is cleared, and the read model rebuilt from the topics equals the one
//! built live.

use std::time::Duration;

use crate::backends::{Kind, TestDb};
use crate::cli::run_with;
use crate::consumer_helpers::*;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_rebuilt_after_a_reset_equals_the_live_one() {
    let db = TestDb::new(Kind::Postgres).await;
    let summary = unique("summary");
    db.exec(&format!(
        "CREATE TABLE {summary} (account_id text PRIMARY KEY, balance numeric NOT NULL DEFAULT 0, \
         events integer NOT NULL DEFAULT 0); \
         INSERT INTO {summary} (account_id) SELECT 'acc-' || g FROM generate_series(0, 9) g"
    ))
    .await;
    let (topic, _cluster, bootstrap) = consuming("reset", 4);
    let mut events: Vec<Identified> = Vec::new();
    for n in 0..200 {
        let account = format!("acc-{}", n % 10);
        let value = format!(r#"{{"accountId": "{account}", "amount": {}}}"#, n % 7 + 1);
        events.push((n % 4, account, value, format!("{summary}-{n}")));
    }
    produce_identified(&bootstrap, &topic, &events, &[]).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "projection")],
        vec![(
            "projection",
            handler(&format!(
                "kind = \"sql\"\nstatement = \"UPDATE {summary} SET balance = balance + $1, events = events + 1 WHERE account_id = $2\"\nparams = [\"/amount\", \"/accountId\"]"
            )),
        )],
    );
    cfg.database.url = Some(db.url.clone());
    let toml = toml::to_string(&cfg).unwrap();
    let applied = || async {
        db.scalar(&format!(
            "SELECT count(*) FROM outboxd_inbox WHERE handler = 'projection' AND event_id LIKE '{summary}-%'"
        ))
        .await
    };
    let read_model = || async {
        db.pairs(&format!(
            "SELECT account_id, balance::text || ' ' || events FROM {summary} ORDER BY account_id"
        ))
        .await
    };
    let daemon = Daemon::start(cfg.clone()).await;
    eventually("the live read model", Duration::from_secs(30), || async {
        applied().await == 200
    })
    .await;
    let live = read_model().await;
    // While outboxd consumes, the group has a member: refused, nothing changed.
    let (code, out, err) = run_with(&["consumer", "reset", "--to", "earliest"], &toml, &[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("has another member") || err.contains("active member"),
        "{err}"
    );
    daemon.stop().await.unwrap();
    let group = group_of(&cfg);
    assert!(committed(&bootstrap, &group, &topic, 0).is_some_and(|o| o > 0));

    // Rebuild: the read model from scratch, the group from the start, the inbox cleared.
    db.exec(&format!("UPDATE {summary} SET balance = 0, events = 0"))
        .await;
    let (code, out, err) = run_with(
        &[
            "consumer",
            "reset",
            "--to",
            "earliest",
            "--clear-inbox",
            "projection",
        ],
        &toml,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    // Each partition from where the group was (what outboxd committed as it stopped) to 0.
    for partition in 0..4 {
        let line = format!("{topic} [{partition}]: ");
        assert!(
            out.lines()
                .any(|l| l.starts_with(&line) && l.ends_with(" -> 0")),
            "{out}"
        );
    }
    assert!(out.contains("inbox of projection: "), "{out}");
    assert_eq!(applied().await, 0, "the inbox is cleared");
    assert_eq!(committed(&bootstrap, &group, &topic, 0), Some(0));
    let daemon = Daemon::start(cfg.clone()).await;
    eventually(
        "the rebuilt read model",
        Duration::from_secs(30),
        || async { applied().await == 200 },
    )
    .await;
    daemon.stop().await.unwrap();
    assert_eq!(read_model().await, live);

    // A time after every message: the end of each partition.
    let (code, out, err) = run_with(
        &["consumer", "reset", "--to", "2999-01-01T00:00:00Z"],
        &toml,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let line = format!("{topic} [3]: ");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&line) && l.ends_with(" -> 50")),
        "{out}"
    );
    // An unknown handler for the inbox is refused before anything moves.
    let (code, _, err) = run_with(
        &[
            "consumer",
            "reset",
            "--to",
            "earliest",
            "--clear-inbox",
            "nope",
        ],
        &toml,
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("no sql handler of that name"), "{err}");
    assert_eq!(committed(&bootstrap, &group, &topic, 3), Some(50));
}
