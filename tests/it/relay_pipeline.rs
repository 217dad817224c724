//! Batches that overlap: while a batch that did not fill waits for Kafka, rows of other
//! keys committed meanwhile are claimed on the lane's second session and sent at once;
//! rows of the keys in flight wait, and the early batch takes no more than the rest of
//! the batch size, and only a batch that waits longer than usual gets one. The broker is
//! slowed down so that a batch visibly waits; which rows
//! are claimed, and by which transaction, is read from each row's `xmax` (set by the
//! claim's uncommitted delete), without locking anything the relay might skip.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// Inserts one row per `(n, key)` in one statement (one notification).
async fn insert_keyed(pool: &sqlx::PgPool, table: &str, rows: &[(i64, &str)]) {
    let (ns, keys): (Vec<i64>, Vec<&str>) = rows.iter().copied().unzip();
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'account', k, '{table}', jsonb_build_object('n', n) \
         FROM unnest($1::int8[], $2::text[]) WITH ORDINALITY AS r(n, k, i) ORDER BY i"
    ))
    .bind(&ns)
    .bind(&keys)
    .execute(pool)
    .await
    .unwrap();
}

/// Each pending row's `n` and the transaction that claimed it (0: none).
async fn claims(pool: &sqlx::PgPool, table: &str) -> HashMap<i64, i64> {
    sqlx::query_as::<_, (i64, i64)>(&format!(
        "SELECT (payload->>'n')::int8, xmax::text::int8 FROM {table}"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// A daemon relaying `table` with batches of `batch_size`, after its first row went
/// through, with the broker then answering every request `rtt` late.
async fn slowed_relay(r: &Relayed, batch_size: u32, rtt: Duration) -> Daemon {
    let mut cfg = config(&r.table, &r.cluster.bootstrap_servers());
    cfg.relay.tables[0].batch_size = batch_size;
    // No row waits for a poll: each is claimed upon its notification or right after the
    // batches in flight.
    cfg.relay.tables[0].poll_interval = Duration::from_secs(120);
    let daemon = Daemon::start(cfg).await;
    insert_keyed(&r.pool, &r.table, &[(0, "warm-up")]).await;
    drained(&r.pool, &r.table, Duration::from_secs(20)).await;
    r.cluster.broker_round_trip_time(-1, rtt).unwrap();
    daemon
}

/// Polls the claims until `reached` holds, failing if row `waiting` left the outbox
/// first (its batch was acknowledged before the state came about).
async fn while_in_flight(
    r: &Relayed,
    waiting: i64,
    what: &str,
    reached: impl Fn(&HashMap<i64, i64>) -> bool,
) -> HashMap<i64, i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let claims = claims(&r.pool, &r.table).await;
        assert!(
            claims.contains_key(&waiting),
            "row {waiting} was acknowledged before {what}: {claims:?}"
        );
        if reached(&claims) {
            return claims;
        }
        assert!(Instant::now() < deadline, "never {what}: {claims:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A daemon relaying `table`, its broker answering every request `rtt` late from the
/// start, after its first row went through.
async fn slow_relay(r: &Relayed, rtt: Duration) -> Daemon {
    r.cluster.broker_round_trip_time(-1, rtt).unwrap();
    let mut cfg = config(&r.table, &r.cluster.bootstrap_servers());
    cfg.relay.tables[0].poll_interval = Duration::from_secs(120);
    let daemon = Daemon::start(cfg).await;
    insert_keyed(&r.pool, &r.table, &[(0, "warm-up")]).await;
    drained(&r.pool, &r.table, Duration::from_secs(30)).await;
    daemon
}

/// `outboxd_relay_early_batches_total` of the table.
fn early_batches(daemon: &Daemon, r: &Relayed) -> f64 {
    daemon.metric("outboxd_relay_early_batches_total", &[("table", &r.table)])
}

/// How many batches of the table `outboxd_relay_batch_phase_seconds` counted in `phase`.
fn phase(daemon: &Daemon, r: &Relayed, phase: &str) -> f64 {
    daemon.metric(
        "outboxd_relay_batch_phase_seconds_count",
        &[("table", &r.table), ("phase", phase)],
    )
}

/// Reads the rows `0..count` back: each once, each key in order.
async fn all_arrive(r: &Relayed, count: i64) {
    r.cluster
        .broker_round_trip_time(-1, Duration::ZERO)
        .unwrap();
    drained(&r.pool, &r.table, Duration::from_secs(20)).await;
    let received = consume_all_in_order(&r.cluster.bootstrap_servers(), &r.topic, count).await;
    assert_exactly_once(&received, 0, count);
}

/// Row 1 (key `a`) waits for a slow broker. Rows 2 (key `b`) and 3 (key `a`), committed
/// meanwhile: 2 is claimed by another transaction before 1 is acknowledged, 3 is not
/// claimed until 1 is, and 3 arrives after 1, without waiting for a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_other_keys_go_out_while_a_batch_waits_for_kafka() {
    let r = relayed("pipeline", 1).await;
    let daemon = slowed_relay(&r, 100, Duration::from_secs(2)).await;
    insert_keyed(&r.pool, &r.table, &[(1, "a")]).await;
    while_in_flight(&r, 1, "row 1 was claimed", |c| c[&1] != 0).await;
    insert_keyed(&r.pool, &r.table, &[(2, "b"), (3, "a")]).await;
    let claims = while_in_flight(&r, 1, "row 2 was claimed", |c| c[&2] != 0).await;
    assert_ne!(claims[&1], claims[&2], "row 2 is in a batch of its own");
    assert_eq!(
        claims[&3], 0,
        "row 3 waits for row 1 of its key: {claims:?}"
    );
    all_arrive(&r, 4).await;
    assert_eq!(early_batches(&daemon, &r), 1.0);
    // Four batches (the warm-up, rows 1, 2 and 3), the early one among them, each counted
    // once in every phase.
    eventually(
        "every batch's commit is counted",
        Duration::from_secs(5),
        || async { phase(&daemon, &r, "commit") == 4.0 },
    )
    .await;
    assert_eq!(phase(&daemon, &r, "claim"), 4.0);
    assert_eq!(phase(&daemon, &r, "kafka"), 4.0);
    daemon.stop().await.unwrap();
}

/// Batches of 4: one row in flight leaves room for 3. Of 6 rows of new keys committed
/// meanwhile, the early batch takes the first 3 and leaves the rest to the next claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_batch_takes_no_more_than_the_rest_of_the_batch_size() {
    let r = relayed("pipelimit", 1).await;
    let daemon = slowed_relay(&r, 4, Duration::from_secs(2)).await;
    insert_keyed(&r.pool, &r.table, &[(1, "a")]).await;
    while_in_flight(&r, 1, "row 1 was claimed", |c| c[&1] != 0).await;
    let keys = ["c2", "c3", "c4", "c5", "c6", "c7"];
    let rows: Vec<(i64, &str)> = (2..8).zip(keys).collect();
    insert_keyed(&r.pool, &r.table, &rows).await;
    let claims = while_in_flight(&r, 1, "rows 2-4 were claimed", |c| {
        (2..5).all(|n| c[&n] != 0)
    })
    .await;
    let early: Vec<i64> = (2..8).filter(|n| claims[n] != 0).collect();
    assert_eq!(early, [2, 3, 4], "{claims:?}");
    assert!((3..5).all(|n| claims[&n] == claims[&2]), "{claims:?}");
    all_arrive(&r, 8).await;
    daemon.stop().await.unwrap();
}

/// With a broker that is always as slow (every batch waits as long as the first), a row
/// committed while a batch waits is not claimed until that batch is acknowledged (only a
/// slower acknowledgement than usual is worth a transaction of its own), and then at once,
/// without waiting for a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_as_slow_as_usual_claims_nothing_early() {
    let r = relayed("pipeusual", 1).await;
    let daemon = slow_relay(&r, Duration::from_millis(500)).await;
    insert_keyed(&r.pool, &r.table, &[(1, "a")]).await;
    while_in_flight(&r, 1, "row 1 was claimed", |c| c[&1] != 0).await;
    insert_keyed(&r.pool, &r.table, &[(2, "b")]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let claims = claims(&r.pool, &r.table).await;
        if !claims.contains_key(&1) {
            break;
        }
        assert_eq!(claims[&2], 0, "row 2 was claimed early: {claims:?}");
        assert!(Instant::now() < deadline, "row 1 never went: {claims:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    all_arrive(&r, 3).await;
    assert_eq!(early_batches(&daemon, &r), 0.0);
    daemon.stop().await.unwrap();
}
