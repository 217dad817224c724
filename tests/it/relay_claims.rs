//! The claims of a PostgreSQL lane. Through the store interface: a batch claimed in chunks
//! never takes a row ahead of an earlier row of its key, and the follower session
//! (`prefetch`) claims the rows after its leader's batch (in its leader's snapshot when
//! handed one), claims nothing once its leader is gone, and a new owner of the lane does
//! not claim past a claim the old owner's follower still holds; a follow prepared ahead of
//! time sees the same rows, and one that is not used ends. Through the daemon:
//! prefetched batches arrive once and in key order, and rows committed during a prefetched
//! drain are claimed right after it, without a poll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outboxd::db::Database;
use outboxd::relay::store::{
    self, ClaimedRow, Lane, LaneSession, PairedSession, Store, StoreError,
};

use crate::helpers::*;

/// The store of a fresh outbox table holding rows `0..rows`, with `prefetch` as given.
async fn table_store(prefix: &str, rows: i64, prefetch: bool) -> (Arc<dyn Store>, String) {
    let pool = db().await;
    let table = outbox_table(&pool, prefix).await;
    insert_rows(&pool, &table, 0, rows, 3).await;
    let mut cfg = config(&table, "unused:9092");
    cfg.database.url = Some(database_url());
    cfg.relay.tables[0].prefetch = prefetch;
    let database = Database::open(&cfg.database).unwrap();
    let store = store::open(&database, &cfg.relay.tables[0]).await.unwrap();
    (store, table)
}

fn ids(rows: &[ClaimedRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id().parse().unwrap()).collect()
}

/// Takes lane 0, which no one holds.
async fn free_lane(store: &dyn Store) -> Lane {
    store
        .acquire_lane(0)
        .await
        .unwrap()
        .expect("lane 0 is free")
}

/// The two sessions of a lane taken with prefetch: the one holding the lane, the other.
fn paired(lane: Lane) -> (Box<dyn PairedSession>, Box<dyn PairedSession>) {
    match lane {
        Lane::Paired(leader, follower) => (leader, follower),
        Lane::Single(_) => panic!("prefetch pairs a lane's sessions"),
    }
}

/// Takes lane 0, retrying until the previous holder's lock is gone.
async fn take_lane(store: &dyn Store) -> Lane {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(session) = store.acquire_lane(0).await.unwrap() {
            return session;
        }
        assert!(Instant::now() < deadline, "lane 0 was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Claims with `follower` until it reports the lane lost (its leader's connection closes
/// asynchronously after the drop); rolls back whatever it claimed meanwhile.
async fn until_lane_lost(follower: &mut dyn LaneSession) -> StoreError {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match follower.claim(10).await {
            Err(e) => return e,
            Ok(_) => follower.rollback().await.unwrap(),
        }
        assert!(Instant::now() < deadline, "the follower kept claiming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts one row of key `key` through `conn`; returns its id.
async fn insert_one(conn: &mut sqlx::PgConnection, table: &str, key: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('account', $1, '{table}', '{{}}') RETURNING id"
    ))
    .bind(key)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Row `a` takes its id, then commits only after the lane claimed the rows after it; the
/// next row of its key, `b`, commits just after it. A further chunk of the same batch must
/// not take `b` while `a` is left for a later batch.
#[tokio::test]
async fn a_chunk_never_takes_a_row_ahead_of_an_earlier_row_of_its_key() {
    use sqlx::Connection;
    let pool = db().await;
    let (store, table) = table_store("chunks", 0, true).await;
    let mut writer = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut writer).await.unwrap();
    let a = insert_one(&mut writer, &table, "late").await;
    insert_rows(&pool, &table, 0, 20, 3).await;

    let (mut lane, _other) = paired(free_lane(store.as_ref()).await);
    assert!(lane.claims_in_chunks());
    let first = ids(&lane.claim(10).await.unwrap());
    assert!(first.iter().all(|id| *id > a), "{a} is not committed yet");
    sqlx::raw_sql("COMMIT").execute(&mut writer).await.unwrap();
    let b = insert_one(&mut writer, &table, "late").await;

    let more = ids(&lane.claim_more(100).await.unwrap());
    assert!(
        !more.contains(&b) || more.contains(&a),
        "the chunk took {b} while {a} of the same key stays behind: {more:?}"
    );
    lane.commit().await.unwrap();
    let rest = ids(&lane.claim(100).await.unwrap());
    let position = |id| rest.iter().position(|r| *r == id);
    if !more.contains(&b) {
        assert!(
            position(a) < position(b),
            "{a} then {b} in the next batch: {rest:?}"
        );
    }
    lane.commit().await.unwrap();
    assert_eq!(count_rows(&pool, &table).await, 0);
}

#[tokio::test]
async fn a_follower_claims_after_its_leader_and_stops_when_the_leader_is_gone() {
    let pool = db().await;
    let (store, table) = table_store("follow", 30, true).await;
    let (mut leader, mut follower) = paired(free_lane(store.as_ref()).await);

    let first = ids(&leader.claim(10).await.unwrap());
    let next = ids(&follower.claim(10).await.unwrap());
    assert_eq!(first.len(), 10);
    assert_eq!(next.len(), 10);
    assert!(
        next.iter().all(|id| id > first.last().unwrap()),
        "the follower claims the rows after the leader's batch: {first:?} then {next:?}"
    );
    leader.commit().await.unwrap();
    follower.rollback().await.unwrap();
    assert_eq!(count_rows(&pool, &table).await, 20);

    drop(leader);
    let error = until_lane_lost(follower.as_mut()).await;
    assert!(
        matches!(error, StoreError::LaneLost { lane: 0, .. }),
        "{error}"
    );
    assert_eq!(
        count_rows(&pool, &table).await,
        20,
        "nothing claimed after the leader left"
    );
}

/// The start of the open transaction that imported `snapshot` (as text), if one is open
/// and idle.
async fn transaction_in(pool: &sqlx::PgPool, snapshot: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT xact_start::text FROM pg_stat_activity WHERE state = 'idle in transaction' \
         AND position($1 IN query) > 0 AND query LIKE '%SET TRANSACTION SNAPSHOT%'",
    )
    .bind(snapshot)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// The follower takes its leader's snapshot and goes on right after the leader's claim:
/// row `a`, committed only after the leader claimed, stays out of the prefetched batch, and
/// so does `b`, the next row of its key; both come in the next fresh claim, `a` first.
#[tokio::test]
async fn a_follower_in_its_leaders_snapshot_leaves_a_late_row_with_the_rest_of_its_key() {
    handed_over_twice("handoff", false).await;
}

/// As above, with the second follow's transaction begun ahead of time (after the leader
/// committed, while the follower claims), as the lane does: the follow uses it.
#[tokio::test]
async fn a_follow_prepared_ahead_of_time_sees_the_same_rows() {
    handed_over_twice("prepared", true).await;
}

async fn handed_over_twice(prefix: &str, prepare: bool) {
    use sqlx::Connection;
    let pool = db().await;
    let (store, table) = table_store(prefix, 0, true).await;
    let mut writer = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut writer).await.unwrap();
    let a = insert_one(&mut writer, &table, "late").await;
    insert_rows(&pool, &table, 0, 30, 3).await;

    let (mut leader, mut follower) = paired(free_lane(store.as_ref()).await);
    let first = ids(&leader.claim(10).await.unwrap());
    let handoff = leader
        .handoff()
        .await
        .unwrap()
        .expect("an integer order column gives a handoff");
    sqlx::raw_sql("COMMIT").execute(&mut writer).await.unwrap();
    let b = insert_one(&mut writer, &table, "late").await;

    let exported = follower.follow(&handoff).await.unwrap();
    let next = ids(&follower.claim_more(10).await.unwrap());
    leader.commit().await.unwrap();
    let snapshot = exported.expect("a follow exports its snapshot for the next one");
    let prepared = if prepare {
        leader.prepare_follow(&snapshot).await;
        let started = transaction_in(&pool, &snapshot).await;
        assert!(started.is_some(), "prepare_follow opened a transaction");
        started
    } else {
        None
    };
    // The roles swap, and the snapshot is handed on.
    let handoff = follower.handoff().await.unwrap().unwrap();
    leader.follow(&handoff).await.unwrap();
    if prepare {
        assert_eq!(
            transaction_in(&pool, &snapshot).await,
            prepared,
            "the follow went on in the prepared transaction"
        );
    }
    let last = ids(&leader.claim_more(100).await.unwrap());
    follower.commit().await.unwrap();
    leader.commit().await.unwrap();
    let taken: Vec<i64> = [first, next, last].concat();
    assert_eq!(taken.len(), 30, "the leader's view, once: {taken:?}");
    assert!(
        taken.is_sorted(),
        "each claim right after the one before: {taken:?}"
    );
    assert!(!taken.contains(&a) && !taken.contains(&b), "{taken:?}");

    let rest = ids(&leader.claim(100).await.unwrap());
    assert_eq!(rest, vec![a, b]);
    leader.commit().await.unwrap();
    assert_eq!(count_rows(&pool, &table).await, 0);
}

/// A follow prepared for a batch that turns out to have no follower ends at once.
#[tokio::test]
async fn a_prepared_follow_that_is_not_used_is_released() {
    let pool = db().await;
    let (store, _table) = table_store("release", 30, true).await;
    let (mut leader, mut follower) = paired(free_lane(store.as_ref()).await);
    leader.claim(10).await.unwrap();
    let handoff = leader.handoff().await.unwrap().unwrap();
    let snapshot = follower.follow(&handoff).await.unwrap().unwrap();
    assert_eq!(follower.claim_more(10).await.unwrap().len(), 10);
    leader.commit().await.unwrap();
    leader.prepare_follow(&snapshot).await;
    assert!(transaction_in(&pool, &snapshot).await.is_some());
    leader.release().await.unwrap();
    assert_eq!(
        transaction_in(&pool, &snapshot).await,
        None,
        "the prepared transaction ended"
    );
    follower.commit().await.unwrap();
    // The session claims as usual afterwards.
    assert_eq!(leader.claim(100).await.unwrap().len(), 10);
    leader.rollback().await.unwrap();
}

#[tokio::test]
async fn a_new_owner_waits_for_the_claim_of_the_old_owners_follower() {
    let pool = db().await;
    let (store, table) = table_store("fence", 30, true).await;
    let (leader, mut follower) = paired(free_lane(store.as_ref()).await);
    let held = ids(&follower.claim(10).await.unwrap());
    assert_eq!(held.len(), 10);

    // The old owner's lock-holding connection goes; its follower's claim stays open.
    drop(leader);
    let (mut newcomer, _other) = paired(take_lane(store.as_ref()).await);
    assert!(
        newcomer.claim(100).await.unwrap().is_empty(),
        "a new owner must not claim past rows the old follower holds"
    );
    newcomer.commit().await.unwrap();

    // The follower's batch ends (committed, as after Kafka acknowledged it).
    follower.commit().await.unwrap();
    let rest = ids(&newcomer.claim(100).await.unwrap());
    assert_eq!(rest.len(), 20);
    assert!(
        rest[0] > *held.last().unwrap(),
        "the new owner starts after the committed claim"
    );
    newcomer.commit().await.unwrap();
    assert_eq!(count_rows(&pool, &table).await, 0);

    let error = until_lane_lost(follower.as_mut()).await;
    assert!(matches!(error, StoreError::LaneLost { .. }), "{error}");
}

#[tokio::test]
async fn without_prefetch_a_lane_has_one_session() {
    let (store, _table) = table_store("noprefetch", 1, false).await;
    assert!(matches!(free_lane(store.as_ref()).await, Lane::Single(_)));
}

/// Batches of 2,500 rows are claimed in chunks of 1,000; the follower claims chunks of
/// the next batch until Kafka acknowledged the current one, and the next cycle claims the
/// rest. With a fast broker the prefetch stops after a chunk or two, with a broker 3 ms
/// away it claims whole batches: every row arrives once, and each key in order, and no
/// transaction stays open once the lanes idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_batches_larger_than_a_chunk_arrive_once_and_in_key_order() {
    for rtt in [Duration::ZERO, Duration::from_millis(3)] {
        let Relayed {
            pool,
            table,
            topic,
            cluster,
        } = relayed("prefetch", 4).await;
        cluster.broker_round_trip_time(-1, rtt).unwrap();
        insert_rows(&pool, &table, 0, 20_000, 100).await;
        let mut cfg = config(&table, &cluster.bootstrap_servers());
        cfg.relay.tables[0].batch_size = 2500;
        cfg.database.url = Some(format!("{}?application_name={table}", database_url()));
        let daemon = Daemon::start(cfg).await;
        let received = consume(
            &cluster.bootstrap_servers(),
            &topic,
            20_000,
            Duration::from_millis(500),
            Duration::from_secs(60),
        )
        .await;
        assert_exactly_once(&received, 0, 20_000);
        assert_first_deliveries_in_key_order(&received);
        drained(&pool, &table, Duration::from_secs(10)).await;
        // No transaction begun ahead of time for a follow stays open while lanes idle.
        let open = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{table}' \
             AND state = 'idle in transaction'"
        );
        eventually(
            "no transaction left open",
            Duration::from_secs(5),
            || async {
                sqlx::query_scalar::<_, i64>(&open)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    == 0
            },
        )
        .await;
        daemon.stop().await.unwrap();
    }
}

/// Polling only, with a poll interval far longer than the test: rows committed while the
/// lane drains a backlog in handed-over snapshots (which do not see them) are claimed at
/// once after the backlog, because a prefetched batch is followed by a fresh claim rather
/// than by a wait for the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_during_a_prefetched_drain_wait_for_no_poll() {
    let Relayed {
        pool,
        table,
        cluster,
        ..
    } = relayed("middrain", 1).await;
    cluster
        .broker_round_trip_time(-1, Duration::from_millis(10))
        .unwrap();
    insert_rows(&pool, &table, 0, 3000, 100).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].batch_size = 100;
    cfg.relay.tables[0].notify_channel = None;
    cfg.relay.tables[0].poll_interval = Duration::from_secs(120);
    let daemon = Daemon::start(cfg).await;
    let published = || daemon.metric("outboxd_relay_published_total", &[("table", &table)]);
    eventually("the drain under way", Duration::from_secs(30), || async {
        published() > 0.0
    })
    .await;
    assert!(
        published() < 2000.0,
        "the rows below go in while the drain is under way"
    );
    insert_rows(&pool, &table, 3000, 100, 100).await;
    drained(&pool, &table, Duration::from_secs(30)).await;
    eventually("every row counted", Duration::from_secs(5), || async {
        published() == 3100.0
    })
    .await;
    daemon.stop().await.unwrap();
}
