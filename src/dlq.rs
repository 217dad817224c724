//! `outboxd dlq replay`: re-publishes dead letters to their original topic (read from the
//! context headers of any dialect) or to another topic, without the dead-letter headers and
//! with a replay counter; a consumer group of its own records how far it got.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::Config;
use crate::handlers::ReceivedHeaders;

use crate::reserved_headers::is_reserved;
pub use crate::reserved_headers::REPLAY_COUNT;

const ORIGINAL_TOPIC: &[&str] = &[
    "outboxd-dlt-original-topic",
    "kafka_dlt-original-topic",
    "__connect.errors.topic",
];
const ERROR_CLASS: &[&str] = &[
    "outboxd-dlt-error-class",
    "kafka_dlt-exception-fqcn",
    "__connect.errors.class.name",
];

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The dead-letter topic to read.
    pub topic: String,
    /// `None`: each message's original topic; `Some(t)`: topic `t`.
    pub to: Option<String>,
    /// Only dead letters written at or after this time.
    pub since: Option<SystemTime>,
    /// Only dead letters written before this time.
    pub until: Option<SystemTime>,
    /// Only this key.
    pub key: Option<String>,
    /// Replay at most this many.
    pub limit: Option<u64>,
    /// At most this many per second.
    pub rate: Option<f64>,
    /// Count and summarise only: nothing is produced or committed.
    pub dry_run: bool,
    /// Refuse messages already replayed this many times (loop guard).
    pub max_replays: u32,
    /// The consumer group recording progress.
    pub group: String,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Report {
    /// Messages read (up to the end of the topic as it was at start).
    pub read: u64,
    /// Messages produced to their target (or, in a dry run, that would be).
    pub replayed: u64,
    /// Messages passed over by `--since`, `--until` or `--key`.
    pub filtered: u64,
    /// Messages refused by the loop guard.
    pub refused: u64,
    /// Messages without an original-topic header (with `--to ORIGINAL`).
    pub no_origin: u64,
    /// Messages whose original topic this dead-letter topic does not belong to (with
    /// `--to ORIGINAL`; see [`may_return_to`]).
    pub not_allowed: u64,
    /// Dry run: counts by (error class, event type).
    pub by_class: BTreeMap<(String, String), u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "read {}, replayed {}, filtered out {}, refused by the loop guard {}, without original topic {}, original topic not allowed {}",
            self.read, self.replayed, self.filtered, self.refused, self.no_origin, self.not_allowed
        )?;
        if !self.by_class.is_empty() {
            writeln!(
                f,
                "{:<24} {:<32} {:>8}",
                "error class", "event type", "count"
            )?;
            for ((class, event_type), n) in &self.by_class {
                writeln!(f, "{class:<24} {event_type:<32} {n:>8}")?;
            }
        }
        Ok(())
    }
}

/// Parses `--since`/`--until`: an RFC 3339 time, or a duration meaning "that long ago".
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_duration(s).map(|d| SystemTime::now() - d))
        .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration such as 2h"))
}

/// Parses `--rate N/s` (or a bare number).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    match n.parse::<f64>() {
        Ok(r) if r > 0.0 => Ok(r),
        _ => Err(format!("`{s}` is not a rate such as 100/s")),
    }
}

/// The last header of the first name present: a dead letter's context comes after the
/// message's own headers, so the last is the dead-letter writer's.
fn header<'a>(headers: &'a ReceivedHeaders, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|name| {
        headers
            .iter()
            .filter(|h| h.key == *name)
            .last()
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    })
}

/// Whether a dead letter on `dead_letter_topic` may go back to `original`, the topic its
/// header names: `consumer.dead_letter_topic` (default `{topic}.dlq`) must map `original`
/// to this dead-letter topic; a template without `{topic}` allows the topics of
/// `consumer.topics`. Anything else needs `--to`.
pub fn may_return_to(config: &Config, dead_letter_topic: &str, original: &str) -> bool {
    let template = config
        .consumer
        .as_ref()
        .map_or("{topic}.dlq", |c| c.dead_letter_topic.as_str());
    if template.contains("{topic}") {
        template.replace("{topic}", original) == dead_letter_topic
    } else {
        config
            .consumer
            .as_ref()
            .is_some_and(|c| c.topics.iter().any(|t| t == original))
    }
}

/// Why a replay stopped; progress is committed only after a replay that did not fail, so
/// running it again replays what it had not.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Kafka failed at `what`.
    #[error("{what}")]
    Kafka {
        /// What was asked.
        what: String,
        /// Why it failed.
        #[source]
        source: KafkaError,
    },
    /// The dead-letter topic does not exist.
    #[error("topic {0} does not exist")]
    NoTopic(String),
    /// Nothing arrived although the topic's end was not reached.
    #[error("no message arrived for 30 s before the end of the topic")]
    Idle,
    /// A replayed message was not acknowledged.
    #[error("replaying to {topic} failed; progress not committed, run again")]
    Delivery {
        /// Where it went.
        topic: String,
        /// Why it failed.
        #[source]
        source: KafkaError,
    },
    /// The producer ended before every delivery report was in.
    #[error("the producer went away; progress not committed")]
    ProducerGone,
}

/// `ReplayError::Kafka` for `what`.
fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> ReplayError {
    let what = what.into();
    move |source| ReplayError::Kafka { what, source }
}

/// Runs a replay (blocking: call from a blocking thread).
pub fn run(config: &Config, bootstrap: &str, r: &Replay) -> Result<Report, ReplayError> {
    let timeout = Duration::from_secs(10);
    let mut client = ClientConfig::new();
    for (k, v) in config.kafka.consumer_properties() {
        client.set(k, v.to_string());
    }
    let consumer: BaseConsumer = client
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &r.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(kafka("kafka consumer"))?;
    let producer: FutureProducer = crate::kafka::producer_config(&config.kafka, bootstrap)
        .create()
        .map_err(kafka("kafka producer"))?;

    // Where to start (the group's committed offsets) and where to stop (the end now).
    let metadata = consumer
        .fetch_metadata(Some(&r.topic), timeout)
        .map_err(kafka(format!("metadata of {}", r.topic)))?;
    let mut wanted = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        wanted.add_partition(&r.topic, p.id());
    }
    if wanted.count() == 0 {
        return Err(ReplayError::NoTopic(r.topic.clone()));
    }
    let committed = consumer
        .committed_offsets(wanted.clone(), timeout)
        .map_err(kafka("committed offsets"))?;
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for e in wanted.elements() {
        let (low, high) = consumer
            .fetch_watermarks(&r.topic, e.partition(), timeout)
            .map_err(kafka("watermarks"))?;
        let start = match committed
            .find_partition(&r.topic, e.partition())
            .map(|c| c.offset())
        {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        if start < high {
            ends.insert(e.partition(), high);
            assignment
                .add_partition_offset(&r.topic, e.partition(), Offset::Offset(start))
                .map_err(kafka("assignment"))?;
        }
    }
    let mut report = Report::default();
    let mut deliveries = Vec::new();
    if ends.is_empty() {
        return Ok(report);
    }
    consumer.assign(&assignment).map_err(kafka("assignment"))?;

    let started = Instant::now();
    let mut progress = TopicPartitionList::new();
    let deadline_idle = Duration::from_secs(30);
    let mut last_message = Instant::now();
    while !ends.is_empty() {
        if r.limit.is_some_and(|l| report.replayed >= l) {
            break;
        }
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            if last_message.elapsed() > deadline_idle {
                return Err(ReplayError::Idle);
            }
            continue;
        };
        let m = polled.map_err(kafka(format!("reading {}", r.topic)))?;
        last_message = Instant::now();
        let (partition, offset) = (m.partition(), m.offset());
        let Some(end) = ends.get(&partition).copied() else {
            continue;
        };
        if offset >= end {
            ends.remove(&partition);
            continue;
        }
        report.read += 1;
        if let Some(delivery) = replay_one(config, &producer, &m, r, &mut report)? {
            deliveries.push(delivery);
        }
        progress
            .add_partition_offset(&r.topic, partition, Offset::Offset(offset + 1))
            .map_err(kafka("progress"))?;
        if offset + 1 >= end {
            ends.remove(&partition);
        }
        if let Some(rate) = r.rate {
            let due = Duration::from_secs_f64(report.replayed as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    // Progress is committed only once every replayed message was acknowledged.
    for delivery in deliveries {
        match futures::executor::block_on(delivery) {
            Ok(Ok(_)) => {}
            Ok(Err((source, m))) => {
                return Err(ReplayError::Delivery {
                    topic: m.topic().to_owned(),
                    source,
                })
            }
            Err(_) => return Err(ReplayError::ProducerGone),
        }
    }
    if !r.dry_run && progress.count() > 0 {
        consumer
            .commit(&progress, CommitMode::Sync)
            .map_err(kafka("committing replay progress"))?;
    }
    Ok(report)
}

/// Replays one message unless it is filtered out or refused; returns its delivery.
fn replay_one(
    config: &Config,
    producer: &FutureProducer,
    m: &BorrowedMessage<'_>,
    r: &Replay,
    report: &mut Report,
) -> Result<Option<DeliveryFuture>, ReplayError> {
    let at = m
        .timestamp()
        .to_millis()
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
    let key_matches = r
        .key
        .as_deref()
        .is_none_or(|k| m.key() == Some(k.as_bytes()));
    let in_window = at.is_none_or(|at| {
        r.since.is_none_or(|since| at >= since) && r.until.is_none_or(|until| at < until)
    });
    if !key_matches || !in_window {
        report.filtered += 1;
        return Ok(None);
    }
    // Read once, through librdkafka's accessor: rdkafka's own panics on a header name
    // that is not UTF-8.
    let original = ReceivedHeaders::of(m).unwrap_or_default();
    let replays: u32 = header(&original, &[REPLAY_COUNT])
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if replays >= r.max_replays {
        report.refused += 1;
        return Ok(None);
    }
    let target = match (&r.to, header(&original, ORIGINAL_TOPIC)) {
        (Some(to), _) => to.clone(),
        (None, Some(original)) if may_return_to(config, &r.topic, original) => original.to_owned(),
        (None, Some(original)) => {
            tracing::warn!(
                original,
                offset = m.offset(),
                "dead letter names an original topic that does not belong to this dead-letter topic; not replayed (use --to)"
            );
            report.not_allowed += 1;
            return Ok(None);
        }
        (None, None) => {
            report.no_origin += 1;
            return Ok(None);
        }
    };
    report.replayed += 1;
    if r.dry_run {
        let class = header(&original, ERROR_CLASS).unwrap_or("-").to_owned();
        let event_type = header(&original, &["event-type"]).unwrap_or("-").to_owned();
        *report.by_class.entry((class, event_type)).or_default() += 1;
        return Ok(None);
    }
    let mut headers = OwnedHeaders::new();
    for h in original.iter() {
        if !is_reserved(h.key) {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let count = (replays + 1).to_string();
    headers = headers.insert(Header {
        key: REPLAY_COUNT,
        value: Some(count.as_bytes()),
    });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(headers);
    if let Some(key) = m.key() {
        record = record.key(key);
    }
    if let Some(payload) = m.payload() {
        record = record.payload(payload);
    }
    producer
        .send_result(record)
        .map(Some)
        .map_err(|(source, _)| ReplayError::Kafka {
            what: format!("producing to {target}"),
            source,
        })
}
