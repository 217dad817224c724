//! Two relays on one table with four lanes: each lane has one owner, rows arrive exactly
//! once and in key order, and a survivor takes over every lane.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_lanes_and_the_survivor_takes_all() {
    let Relayed {
        pool,
        table,
        topic,
        cluster,
    } = relayed("lanes", 4).await;
    let mut cfg = config(&table, &cluster.bootstrap_servers());
    cfg.relay.tables[0].lanes = 4;
    cfg.relay.tables[0].batch_size = 200;
    let a = Daemon::start(cfg.clone()).await;
    let b = Daemon::start(cfg).await;
    let owned = |d: &Daemon| d.metric("outboxd_relay_lanes_owned", &[("table", &table)]);
    eventually("lanes split 2/2", Duration::from_secs(15), || async {
        owned(&a) == 2.0 && owned(&b) == 2.0
    })
    .await;

    insert_rows(&pool, &table, 0, 4000, 100).await;
    drained(&pool, &table, Duration::from_secs(30)).await;
    let published = |d: &Daemon| d.metric("outboxd_relay_published_total", &[("table", &table)]);
    assert!(
        published(&a) > 0.0 && published(&b) > 0.0,
        "both relays published"
    );
    assert_eq!(published(&a) + published(&b), 4000.0);

    a.stop().await.unwrap();
    eventually(
        "survivor owns all lanes",
        Duration::from_secs(15),
        || async { owned(&b) == 4.0 },
    )
    .await;
    insert_rows(&pool, &table, 4000, 2000, 100).await;
    drained(&pool, &table, Duration::from_secs(30)).await;

    let received = consume(
        &cluster.bootstrap_servers(),
        &topic,
        6000,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_exactly_once(&received, 0, 6000);
    assert_first_deliveries_in_key_order(&received);
    b.stop().await.unwrap();
}
