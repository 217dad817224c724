//! Helpers for consumer tests: producing input, a consumer configuration, a scriptable
//! HTTP server, committed offsets.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use outboxd::config::{Config, ConsumerConfig, HandlerConfig, OptionValue, RouteConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::unique;

/// A test message: partition, key, value, headers.
pub type Msg<'a> = (i32, &'a str, &'a [u8], &'a [(&'a str, &'a str)]);

/// Produces `(partition, key, value, headers)` messages to `topic`, awaiting each ack.
pub async fn produce(bootstrap: &str, topic: &str, messages: &[Msg<'_>]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut deliveries = Vec::new();
    for (partition, key, value, headers) in messages {
        let mut h = OwnedHeaders::new();
        for (k, v) in *headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let record = FutureRecord::to(topic)
            .partition(*partition)
            .key(*key)
            .payload(*value)
            .headers(h);
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("enqueued"),
        );
    }
    for delivery in deliveries {
        delivery.await.unwrap().expect("test message produced");
    }
}

/// An event to produce: partition, key, value, event id.
pub type Identified = (i32, String, String, String);

/// Produces `events`, each with its `event-id` header and the `extra` headers.
pub async fn produce_identified(
    bootstrap: &str,
    topic: &str,
    events: &[Identified],
    extra: &[(&str, &str)],
) {
    let headers: Vec<Vec<(&str, &str)>> = events
        .iter()
        .map(|(.., id)| {
            std::iter::once(("event-id", id.as_str()))
                .chain(extra.iter().copied())
                .collect()
        })
        .collect();
    let messages: Vec<Msg<'_>> = events
        .iter()
        .zip(&headers)
        .map(|((p, k, v, _), h)| (*p, k.as_str(), v.as_bytes(), &h[..]))
        .collect();
    produce(bootstrap, topic, &messages).await;
}

/// `n` JSON events `{"n": i}` on `partition`, each with event-id `<prefix>-<i>` and
/// event type `type`.
pub async fn produce_events(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    prefix: &str,
    event_type: &str,
    range: std::ops::Range<i64>,
) {
    let bodies: Vec<(String, String, String)> = range
        .map(|i| {
            (
                format!("k{i}"),
                format!("{{\"n\": {i}}}"),
                format!("{prefix}-{i}"),
            )
        })
        .collect();
    let headers: Vec<[(&str, &str); 2]> = bodies
        .iter()
        .map(|(_, _, id)| [("event-id", id.as_str()), ("event-type", event_type)])
        .collect();
    let messages: Vec<Msg<'_>> = bodies
        .iter()
        .zip(&headers)
        .map(|((k, v, _), h)| (partition, k.as_str(), v.as_bytes(), &h[..]))
        .collect();
    produce(bootstrap, topic, &messages).await;
}

/// `total` events spread evenly over partitions `0..partitions` (ids `<prefix>-<n>`);
/// returns how many were produced (`total` rounded down to a multiple of `partitions`).
pub async fn produce_spread(
    bootstrap: &str,
    topic: &str,
    partitions: i64,
    prefix: &str,
    total: i64,
) -> i64 {
    let share = total / partitions;
    for p in 0..partitions {
        produce_events(
            bootstrap,
            topic,
            p as i32,
            prefix,
            "E",
            (p * share)..((p + 1) * share),
        )
        .await;
    }
    share * partitions
}

/// A consumer-only configuration: `topics`, one route per `(glob, event type, handler)`.
pub fn consumer_config(
    bootstrap: &str,
    topics: &[&str],
    routes: &[(&str, Option<&str>, &str)],
    handlers: Vec<(&str, HandlerConfig)>,
) -> Config {
    let mut c = Config {
        shutdown_timeout: Duration::from_secs(10),
        ..Config::default()
    };
    c.kafka.brokers = Some(bootstrap.into());
    c.kafka
        .options
        .insert("session.timeout.ms".into(), OptionValue::Int(6000));
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    let mut consumer: ConsumerConfig = toml::from_str(&format!(
        "group_id = \"{}\"\ntopics = []\n",
        unique("group")
    ))
    .unwrap();
    consumer.topics = topics.iter().map(|t| t.to_string()).collect();
    consumer.retry.initial = Duration::from_millis(20);
    consumer.retry.max_delay = Duration::from_millis(100);
    consumer.routes = routes
        .iter()
        .map(|(topic, event_type, handler)| RouteConfig {
            topic: topic.to_string(),
            event_type: event_type.map(str::to_owned),
            handler: handler.to_string(),
        })
        .collect();
    c.consumer = Some(consumer);
    c.handlers = handlers
        .into_iter()
        .map(|(n, h)| (n.to_owned(), h))
        .collect();
    c
}

/// A consumer of `topic` whose one route goes to an http handler `web` posting to `url`.
pub fn web_consumer(bootstrap: &str, topic: &str, url: &str) -> Config {
    consumer_config(
        bootstrap,
        &[topic],
        &[(topic, None, "web")],
        vec![("web", http_to(url, ""))],
    )
}

/// A fresh topic `prefix…` with `partitions` partitions and its `.dlq` topic on a new mock
/// cluster: `(topic, cluster, bootstrap servers)`.
pub fn consuming(prefix: &str, partitions: i32) -> (String, crate::helpers::Cluster, String) {
    let topic = unique(prefix);
    let cluster = crate::helpers::cluster(&topic, partitions);
    cluster.create_topic(&format!("{topic}.dlq"), 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    (topic, cluster, bootstrap)
}

/// An http handler posting to `url`, plus extra TOML lines.
pub fn http_to(url: &str, extra: &str) -> HandlerConfig {
    handler(&format!("kind = \"http\"\nurl = \"{url}\"\n{extra}"))
}

/// A handler from its TOML text, e.g. `kind = "log"`.
pub fn handler(toml_text: &str) -> HandlerConfig {
    toml::from_str(toml_text).unwrap()
}

/// One request the test server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A local HTTP server answering from a script of statuses (then `fallback`), optionally
/// slowly.
#[derive(Clone)]
pub struct TestServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    fallback: Arc<Mutex<u16>>,
    delay: Arc<Mutex<Duration>>,
}

impl TestServer {
    pub async fn start(script: &[u16], fallback: u16) -> TestServer {
        let server = TestServer {
            url: String::new(),
            requests: Arc::default(),
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            fallback: Arc::new(Mutex::new(fallback)),
            delay: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/events", axum::routing::post(answer))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestServer { url, ..server }
    }

    pub fn set_fallback(&self, status: u16) {
        *self.fallback.lock().unwrap() = status;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn bodies(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect()
    }
}

async fn answer(State(s): State<TestServer>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let delay = *s.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    s.requests.lock().unwrap().push(Request { headers, body });
    let next = s.script.lock().unwrap().pop_front();
    StatusCode::from_u16(next.unwrap_or(*s.fallback.lock().unwrap())).unwrap()
}

/// The group's committed offset of `topic`/`partition` (None when nothing is committed).
pub fn committed(bootstrap: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    match committed.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The group id of a consumer config.
pub fn group_of(c: &Config) -> String {
    c.consumer.as_ref().unwrap().group_id.clone()
}
