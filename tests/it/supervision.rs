//! Supervision: a relay lane that panics is re-acquired and its keys flow again; a part
//! that cannot be restarted alone (a table's lane manager) stops the daemon with exit
//! class 70 after `/healthz` named it, never a clean exit. Run them with
//! `cargo nextest run -E 'test(/panic/)'`.

use std::time::Duration;

use outboxd::ExitClass;

use crate::consumer_helpers::*;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_lane_that_panics_is_reacquired_and_its_keys_flow_again() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("lanepanic", 2).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].lanes = 2;
    outboxd::faults::arm_lane_panic(&table, 0);
    insert_rows(&pool, &table, 0, 200, 20).await;
    let daemon = Daemon::start(cfg).await;
    drained(&pool, &table, Duration::from_secs(30)).await;
    assert_eq!(
        daemon.metric("outboxd_task_panics_total", &[("task", "relay lane")]),
        1.0,
        "the lane panicked once"
    );
    eventually("both lanes owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[]) == 2.0
    })
    .await;
    let (status, body) = http_get(daemon.http_addr, "/healthz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "re-acquired: healthy"
    );
    daemon.stop().await.unwrap();
    let received = consume_all_in_order(&cluster.bootstrap_servers(), &topic, 200).await;
    assert_exactly_once(&received, 0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_lane_that_ends_while_its_manager_acquires_another_is_reacquired() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("laneends", 2).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].lanes = 2;
    // Lane 0 ends as soon as it starts, while the manager goes on to acquire lane 1: its
    // end is learned from its join, whenever the manager gets to it.
    outboxd::faults::arm_lane_end(&table, 0);
    insert_rows(&pool, &table, 0, 200, 20).await;
    let daemon = Daemon::start(cfg).await;
    drained(&pool, &table, Duration::from_secs(30)).await;
    eventually("both lanes owned", Duration::from_secs(10), || async {
        daemon.metric("outboxd_relay_lanes_owned", &[]) == 2.0
    })
    .await;
    daemon.stop().await.unwrap();
    let received = consume_all_in_order(&cluster.bootstrap_servers(), &topic, 200).await;
    assert_exactly_once(&received, 0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_manager_that_panics_fails_healthz_and_ends_run_with_exit_class_70() {
    let Relayed {
        pool: _pool,
        table,
        topic: _,
        cluster,
    } = relayed("managerpanic", 1).await;
    let bootstrap = cluster.bootstrap_servers();
    // A consumer whose one call takes 3 s keeps the drain, and so /healthz, open while the
    // test looks.
    let consumed = unique("slowcall");
    cluster.create_topic(&consumed, 1, 1).unwrap();
    cluster
        .create_topic(&format!("{consumed}.dlq"), 1, 1)
        .unwrap();
    let mut cfg = config(&table, &bootstrap);
    let with_consumer = consumer_config(
        &bootstrap,
        &[&consumed],
        &[(&consumed, None, "slow")],
        vec![(
            "slow",
            handler("kind = \"command\"\nprogram = \"/bin/sleep\"\nargs = [\"3\"]"),
        )],
    );
    cfg.consumer = with_consumer.consumer;
    cfg.handlers = with_consumer.handlers;
    let daemon = Daemon::start(cfg).await;
    produce(&bootstrap, &consumed, &[(0, "k", b"{}", &[])]).await;
    eventually("the slow call runs", Duration::from_secs(30), || async {
        daemon.metric("outboxd_consumer_in_flight", &[]) == 1.0
    })
    .await;
    outboxd::faults::arm_manager_panic(&table);
    let manager = format!("relay manager of {table}");
    eventually(
        "/healthz names the dead manager",
        Duration::from_secs(10),
        || async {
            let (status, body) = http_get(daemon.http_addr, "/healthz").await;
            status == 503 && body.contains(&manager)
        },
    )
    .await;
    let ended = daemon.stop().await;
    let e = ended.expect_err("a panicked manager is never a clean exit");
    assert_eq!(e.class(), ExitClass::Software, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("relay table {table} panicked")),
        "{e}"
    );
}
