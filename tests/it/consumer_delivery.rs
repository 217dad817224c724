//! Consumer: routing, the http handler's outcomes, dead letters in every dialect.

use std::time::Duration;

use crate::consumer_helpers::*;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_topic_glob_and_event_type_and_dead_letters_the_unrouted() {
    let (topic, _cluster, bootstrap) = consuming("orders", 1);
    let created = TestServer::start(&[], 200).await;
    let any = TestServer::start(&[], 200).await;
    let glob = format!("{}*", &topic[..topic.len() - 3]);
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[
            (&glob, Some("OrderCreated"), "created"),
            (&topic, Some("OrderShipped"), "any"),
        ],
        vec![
            ("created", http_to(&created.url, "")),
            ("any", http_to(&any.url, "")),
        ],
    );
    produce(
        &bootstrap,
        &topic,
        &[
            (
                0,
                "a",
                br#"{"n": 0}"#,
                &[("event-type", "OrderCreated"), ("event-id", "e0")],
            ),
            (
                0,
                "a",
                br#"{"n": 1}"#,
                &[("event-type", "OrderShipped"), ("event-id", "e1")],
            ),
            (
                0,
                "a",
                br#"{"n": 2}"#,
                &[("event-type", "OrderLost"), ("event-id", "e2")],
            ),
            (
                0,
                "a",
                br#"{"n": 3}"#,
                &[("event-type", "OrderCreated"), ("event-id", "e3")],
            ),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    eventually("routed", Duration::from_secs(30), || async {
        created.count() == 2 && any.count() == 1
    })
    .await;
    assert_eq!(created.bodies(), [r#"{"n": 0}"#, r#"{"n": 3}"#]);
    assert_eq!(any.bodies(), [r#"{"n": 1}"#]);
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_millis(200),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].n, 2);
    assert_eq!(dead[0].headers["outboxd-dlt-error-class"], "unrouted");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_messages_can_be_skipped() {
    let (topic, _cluster, bootstrap) = consuming("skip", 1);
    let server = TestServer::start(&[], 200).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, Some("Wanted"), "web")],
        vec![("web", http_to(&server.url, ""))],
    );
    cfg.consumer.as_mut().unwrap().unrouted = outboxd::config::Unrouted::Skip;
    let group = group_of(&cfg);
    produce(
        &bootstrap,
        &topic,
        &[
            (0, "a", b"{}", &[("event-type", "Other")]),
            (0, "a", b"{}", &[("event-type", "Wanted")]),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    eventually("wanted delivered", Duration::from_secs(30), || async {
        server.count() == 1
    })
    .await;
    daemon.stop().await.unwrap();
    assert_eq!(
        committed(&bootstrap, &group, &topic, 0),
        Some(2),
        "skipped and delivered are committed"
    );
    assert_eq!(server.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_twice_then_200_is_delivered_once_after_three_attempts() {
    let (topic, _cluster, bootstrap) = consuming("http503", 1);
    let server = TestServer::start(&[503, 503], 200).await;
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![(
            "web",
            handler(&format!(
                "kind = \"http\"\nurl = \"{}\"\n[headers]\nauthorization = \"Bearer t0k3n\"",
                server.url
            )),
        )],
    );
    let group = group_of(&cfg);
    produce(
        &bootstrap,
        &topic,
        &[(
            0,
            "acc-1",
            br#"{"amount": 5}"#,
            &[
                ("event-id", "0b6a8a4e-1b2c-4d5e-8f90-123456789abc"),
                ("event-type", "DepositMade"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ],
        )],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    eventually("three attempts", Duration::from_secs(30), || async {
        server.count() == 3
    })
    .await;
    eventually("offset committed", Duration::from_secs(10), || async {
        committed(&bootstrap, &group, &topic, 0) == Some(1)
    })
    .await;
    let last = server.requests.lock().unwrap()[2].clone();
    let h = |name: &str| last.headers[name].to_str().unwrap().to_owned();
    assert_eq!(h("ce-specversion"), "1.0");
    assert_eq!(h("ce-id"), "0b6a8a4e-1b2c-4d5e-8f90-123456789abc");
    assert_eq!(h("ce-type"), "DepositMade");
    assert_eq!(h("ce-source"), topic);
    assert!(h("ce-time").ends_with('Z'), "{}", h("ce-time"));
    assert_eq!(
        h("traceparent"),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(h("authorization"), "Bearer t0k3n");
    assert_eq!(&last.body[..], br#"{"amount": 5}"#);
    assert_eq!(
        daemon.metric("outboxd_consumer_retries_total", &[("handler", "web")]),
        2.0
    );
    assert_eq!(
        daemon.metric(
            "outboxd_consumer_messages_total",
            &[("handler", "web"), ("outcome", "done")]
        ),
        1.0
    );
    daemon.stop().await.unwrap();
    assert_eq!(
        server.count(),
        3,
        "delivered once: no request after the 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_400_dead_letters_with_context_headers_in_every_dialect() {
    use outboxd::config::DeadLetterDialect::{Connect, Outboxd, Spring};
    let server = TestServer::start(&[], 400).await;
    for dialect in [Outboxd, Spring, Connect] {
        let topic = unique("http400");
        let cluster = cluster(&topic, 1);
        cluster.create_topic(&format!("{topic}.dlq"), 1, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let mut cfg = web_consumer(&bootstrap, &topic, &server.url);
        cfg.consumer.as_mut().unwrap().dead_letter_headers = dialect;
        let group = group_of(&cfg);
        produce(
            &bootstrap,
            &topic,
            &[(
                0,
                "acc-9",
                br#"{"bad": true}"#,
                &[("event-id", "e-400"), ("app", "kept")],
            )],
        )
        .await;
        let daemon = Daemon::start(cfg).await;
        let dead = consume(
            &bootstrap,
            &format!("{topic}.dlq"),
            1,
            Duration::ZERO,
            Duration::from_secs(30),
        )
        .await;
        eventually(
            "offset committed past the dead letter",
            Duration::from_secs(10),
            || async { committed(&bootstrap, &group, &topic, 0) == Some(1) },
        )
        .await;
        daemon.stop().await.unwrap();
        let d = &dead[0];
        assert_eq!(d.key, "acc-9");
        assert_eq!(d.payload, br#"{"bad": true}"#);
        assert_eq!(d.headers["event-id"], "e-400", "original headers kept");
        assert_eq!(d.headers["app"], "kept");
        let h = &d.headers;
        match dialect {
            Outboxd => {
                assert_eq!(h["outboxd-dlt-original-topic"], topic);
                assert_eq!(h["outboxd-dlt-original-partition"], "0");
                assert_eq!(h["outboxd-dlt-original-offset"], "0");
                assert!(h["outboxd-dlt-original-timestamp"].parse::<i64>().unwrap() > 0);
                assert_eq!(h["outboxd-dlt-consumer-group"], group);
                assert_eq!(h["outboxd-dlt-handler"], "web");
                assert_eq!(h["outboxd-dlt-attempts"], "1");
                assert_eq!(h["outboxd-dlt-error-class"], "permanent");
                assert!(h["outboxd-dlt-error-message"].contains("400"), "{h:?}");
                assert!(h["outboxd-dlt-failed-at"].ends_with('Z'));
            }
            Spring => {
                let raw = &d.raw_headers;
                assert_eq!(h["kafka_dlt-original-topic"], topic);
                assert_eq!(raw["kafka_dlt-original-partition"], 0i32.to_be_bytes());
                assert_eq!(raw["kafka_dlt-original-offset"], 0i64.to_be_bytes());
                assert!(
                    i64::from_be_bytes(raw["kafka_dlt-original-timestamp"][..].try_into().unwrap())
                        > 0
                );
                assert_eq!(h["kafka_dlt-original-consumer-group"], group);
                assert_eq!(h["kafka_dlt-exception-fqcn"], "permanent");
                assert!(h["kafka_dlt-exception-message"].contains("400"));
                assert_eq!(h["outboxd-dlt-handler"], "web");
                assert_eq!(h["outboxd-dlt-attempts"], "1");
            }
            Connect => {
                assert_eq!(h["__connect.errors.topic"], topic);
                assert_eq!(h["__connect.errors.partition"], "0");
                assert_eq!(h["__connect.errors.offset"], "0");
                assert_eq!(h["__connect.errors.connector.name"], group);
                assert_eq!(h["__connect.errors.stage"], "web");
                assert_eq!(h["__connect.errors.exception.class.name"], "permanent");
                assert!(h["__connect.errors.exception.message"].contains("400"));
                assert_eq!(h["outboxd-dlt-attempts"], "1");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_server_times_out_retryably_then_dead_letters() {
    let (topic, _cluster, bootstrap) = consuming("hang", 1);
    let server = TestServer::start(&[], 200).await;
    server.set_delay(Duration::from_secs(5));
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![(
            "web",
            handler(&format!(
                "kind = \"http\"\nurl = \"{}\"\ntimeout = \"200ms\"\n[retry]\nmax_attempts = 3",
                server.url
            )),
        )],
    );
    cfg.shutdown_timeout = Duration::from_secs(2);
    produce(&bootstrap, &topic, &[(0, "k", b"{}", &[])]).await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::ZERO,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        dead[0].headers["outboxd-dlt-error-class"],
        "retryable_exhausted"
    );
    assert_eq!(dead[0].headers["outboxd-dlt-attempts"], "3");
    assert!(
        dead[0].headers["outboxd-dlt-error-message"].contains("no answer within"),
        "{:?}",
        dead[0].headers
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_fail_stops_only_that_partition() {
    let (topic, _cluster, bootstrap) = consuming("failpolicy", 2);
    let server = TestServer::start(&[], 200).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, Some("Known"), "web")],
        vec![("web", http_to(&server.url, ""))],
    );
    cfg.consumer.as_mut().unwrap().unrouted = outboxd::config::Unrouted::Fail;
    let group = group_of(&cfg);
    let known: &[(&str, &str)] = &[("event-type", "Known")];
    produce(
        &bootstrap,
        &topic,
        &[
            (0, "a", b"p0-first", known),
            (0, "a", b"p0-unknown", &[("event-type", "Unknown")]),
            (0, "a", b"p0-after", known),
            (1, "b", b"p1-first", known),
            (1, "b", b"p1-second", known),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    eventually(
        "partition 1 and the head of partition 0 handled",
        Duration::from_secs(30),
        || async { server.count() == 3 },
    )
    .await;
    eventually("partition 1 committed", Duration::from_secs(10), || async {
        committed(&bootstrap, &group, &topic, 1) == Some(2)
    })
    .await;
    // Partition 0's commits are its own: it may commit after partition 1 did.
    eventually(
        "partition 0 committed up to the unrouted message",
        Duration::from_secs(10),
        || async { committed(&bootstrap, &group, &topic, 0) == Some(1) },
    )
    .await;
    let mut bodies = server.bodies();
    bodies.sort();
    assert_eq!(bodies, ["p0-first", "p1-first", "p1-second"]);
    daemon.stop().await.unwrap();
}
