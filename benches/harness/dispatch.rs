//! Consumer dispatch: messages produced to a topic, drained by a bare rdkafka consumer
//! (the baseline) and by outboxd's consumer with one handler.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

use crate::processes::{cpu_seconds, kafka_section, Broker, Outboxd};

/// Tansu 0.6 (memory storage) serves a fetch at an offset inside a multi-record batch from
/// the next batch on, and reports the last batch's base offset + 1 as the high watermark
/// (reproduced with confluent-kafka: two 10-record batches give a high watermark of 11, and
/// a fetch at offset 3 returns 10..19). A consumer that reads on from where its last fetch
/// ended never fetches mid-batch, so the runs here are unaffected; one that resumes
/// mid-batch (from a committed offset, or after pausing a partition) skips messages there.
pub async fn produce(broker: &Broker, topic: &str, messages: i64) -> Result<()> {
    produce_range(broker, topic, 0..messages).await
}

/// Produces the messages numbered `range` (key `k<n % 1000>`), awaiting every ack.
pub async fn produce_range(
    broker: &Broker,
    topic: &str,
    range: std::ops::Range<i64>,
) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "5")
        .create()?;
    let mut pending = Vec::new();
    for n in range {
        let payload = format!(
            "{{\"n\": {n}, \"account\": \"acc-{}\", \"amount\": {}, \"currency\": \"EUR\"}}",
            n % 1000,
            n % 977
        );
        let key = format!("k{}", n % 1000);
        let id = format!("bench-{n}");
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        });
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        match producer.send_result(record) {
            Ok(d) => pending.push(d),
            Err((e, _)) => bail!("produce: {e}"),
        }
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The librdkafka properties outboxd's consumer sets for its per-partition queues when a
/// route leads to a `log` handler (see `src/consumer/mod.rs`), so that a bare consumer can
/// fetch the way outboxd does.
pub const OUTBOXD_QUEUES: &[(&str, &str)] = &[
    ("queued.min.messages", "2000"),
    ("queued.max.messages.kbytes", "1024"),
    ("max.partition.fetch.bytes", "262144"),
    ("fetch.queue.backoff.ms", "10"),
];

/// Baseline 2: a bare consumer storing every offset; msgs/s from first to last message.
/// Prints the CPU seconds per 100k messages of this process (the consumer's poll loop and
/// librdkafka's threads) and of the broker. `name` tells runs in one process apart (each
/// has a group of its own).
pub fn bare_consumer(
    name: &str,
    broker_pid: Option<u32>,
    bootstrap: &str,
    options: &[(&str, &str)],
    topic: &str,
    messages: i64,
) -> Result<f64> {
    let mut config = ClientConfig::new();
    for (key, value) in options {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("bench-bare-{name}-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let broker_cpu = || broker_pid.map_or(0.0, cpu_seconds);
    let (own_before, broker_before) = (cpu_seconds(std::process::id()), broker_cpu());
    let mut seen = 0;
    let mut first = None;
    let (mut last, mut longest_gap) = (Instant::now(), Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < messages && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            let now = Instant::now();
            if first.is_some() {
                longest_gap = longest_gap.max(now - last);
            }
            last = now;
            first.get_or_insert(now);
            consumer.store_offset(m.topic(), m.partition(), m.offset())?;
            seen += 1;
        }
    }
    let first = first.context("no message consumed")?;
    let rate = seen as f64 / first.elapsed().as_secs_f64();
    let per_100k = 100_000.0 / seen.max(1) as f64;
    eprintln!(
        "  CPU s per 100k msgs: bare consumer ({name}) {:.2}, broker {:.2}; longest wait between two messages {:.0} ms",
        (cpu_seconds(std::process::id()) - own_before) * per_100k,
        (broker_cpu() - broker_before) * per_100k,
        longest_gap.as_secs_f64() * 1000.0,
    );
    Ok(rate)
}

/// A consumer-only config: group `bench-<name>-<pid>`, one route of `topic` to handler
/// `h` (TOML lines `handler`), and `extra` lines in `[consumer]`.
pub fn consumer_config(
    broker: &Broker,
    url: &str,
    topic: &str,
    name: &str,
    handler: &str,
    extra: &str,
) -> String {
    format!(
        "[database]\nurl = \"{url}\"\n{}\
         [consumer]\ngroup_id = \"bench-{name}-{}\"\ntopics = [\"{topic}\"]\n{extra}[[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"h\"\n[handlers.h]\n{handler}\n",
        kafka_section(
            &broker.bootstrap(),
            &[&[("session.timeout.ms", "6000")], &broker.consumer_options()[..]].concat()
        ),
        std::process::id()
    )
}

/// outboxd's consumer with one handler and `ordering`; msgs/s from the first handled
/// message to the last.
pub async fn dispatch(
    broker: &Broker,
    topic: &str,
    messages: i64,
    name: &str,
    handler: &str,
    url: &str,
    ordering: &str,
) -> Result<(f64, f64)> {
    let name = format!("{name}-{ordering}");
    let extra = format!("ordering = \"{ordering}\"\n");
    let config = consumer_config(broker, url, topic, &name, handler, &extra);
    let broker_cpu = || broker.pid().map_or(0.0, cpu_seconds);
    let broker_before = broker_cpu();
    let mut outboxd = Outboxd::start(&config)?;
    let rate = outboxd
        .rate_until("outboxd_consumer_messages_total", messages as f64)
        .await?;
    let per_100k = 100_000.0 / messages as f64;
    eprintln!(
        "  CPU s per 100k msgs: outboxd {:.2}, broker {:.2}",
        cpu_seconds(outboxd.pid()) * per_100k,
        (broker_cpu() - broker_before) * per_100k,
    );
    let (peak, _) = outboxd.rss();
    outboxd.stop();
    Ok((rate, peak))
}

pub async fn http_sink() -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/events", listener.local_addr()?);
    let app = axum::Router::new().route("/events", axum::routing::post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}
