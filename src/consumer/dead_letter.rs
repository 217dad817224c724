//! Dead letters: the original key, value and headers, plus context headers named in the
//! configured dialect, produced to the dead-letter topic and acknowledged before the
//! original offset moves on. Headers the message brought in the reserved namespaces are
//! dropped first, so only outboxd's context steers `dlq replay`; the error text is scrubbed
//! of secrets and bounded.

use std::sync::Arc;
use std::time::SystemTime;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::config::DeadLetterDialect;
use crate::handlers::{ErrorClass, Received};
use crate::kafka::ProducerSlot;
use crate::reserved_headers::{is_reserved, REPLAY_COUNT};

/// The most of an error text a dead letter carries, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Header of a dead letter sent without the original value and headers, naming why.
pub const STRIPPED: &str = "outboxd-dlt-stripped";

/// Why and where a message failed.
pub struct Failure<'a> {
    /// Handler name (`-` for unrouted messages).
    pub handler: &'a str,
    /// Handler calls made.
    pub attempts: u32,
    /// The error class.
    pub class: ErrorClass,
    /// The last error.
    pub message: &'a str,
}

/// Produces dead letters.
pub struct DeadLetters {
    producer: Arc<ProducerSlot>,
    topic_template: String,
    dialect: DeadLetterDialect,
    group_id: String,
}

impl DeadLetters {
    /// Dead letters to `topic_template` (`{topic}` = original topic).
    pub fn new(
        producer: Arc<ProducerSlot>,
        topic_template: &str,
        dialect: DeadLetterDialect,
        group_id: &str,
    ) -> Self {
        DeadLetters {
            producer,
            topic_template: topic_template.to_owned(),
            dialect,
            group_id: group_id.to_owned(),
        }
    }

    /// The dead-letter topic of `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        self.topic_template.replace("{topic}", topic)
    }

    /// Produces the dead letter of `m` and waits for Kafka's acknowledgement. With
    /// `stripped`, the original value and headers are left out and the header
    /// [`STRIPPED`] says why (Kafka refused the whole dead letter).
    pub async fn send(
        &self,
        m: &Received,
        failure: &Failure<'_>,
        stripped: Option<&str>,
    ) -> Result<(), KafkaError> {
        let topic = self.topic_for(m.topic());
        let mut headers = OwnedHeaders::new();
        if stripped.is_none() {
            headers = original_headers(m);
        }
        let note = stripped.map(|why| (STRIPPED, bounded(why).into_bytes()));
        for (name, value) in self.context(m, failure).into_iter().chain(note) {
            headers = headers.insert(Header {
                key: name,
                value: Some(&value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(value) = m.payload().filter(|_| stripped.is_none()) {
            record = record.payload(value);
        }
        let producer = self.producer.get();
        let result = match producer.send_result(record) {
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            },
            Err((e, _)) => Err(e),
        };
        if result.is_err() {
            self.producer.renew_if_fatal(&producer);
        }
        result
    }

    /// Context headers in the configured dialect. Fields a dialect has no name for keep
    /// their `outboxd-dlt-*` name. Spring reads partition, offset and timestamp as
    /// big-endian binary numbers.
    fn context(&self, m: &Received, f: &Failure<'_>) -> Vec<(&'static str, Vec<u8>)> {
        let text = |s: &str| s.as_bytes().to_vec();
        let timestamp = m.timestamp().to_millis().unwrap_or(-1);
        let failed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let (topic, class) = (text(m.topic()), text(f.class.as_str()));
        let (partition, offset) = (
            text(&m.partition().to_string()),
            text(&m.offset().to_string()),
        );
        let message = bounded(f.message).into_bytes();
        let (group, handler) = (text(&self.group_id), text(f.handler));
        let (ts, attempts) = (text(&timestamp.to_string()), text(&f.attempts.to_string()));
        match self.dialect {
            DeadLetterDialect::Outboxd => vec![
                ("outboxd-dlt-original-topic", topic),
                ("outboxd-dlt-original-partition", partition),
                ("outboxd-dlt-original-offset", offset),
                ("outboxd-dlt-original-timestamp", ts),
                ("outboxd-dlt-consumer-group", group),
                ("outboxd-dlt-handler", handler),
                ("outboxd-dlt-attempts", attempts),
                ("outboxd-dlt-error-class", class),
                ("outboxd-dlt-error-message", message),
                ("outboxd-dlt-failed-at", text(&failed_at)),
            ],
            DeadLetterDialect::Spring => vec![
                ("kafka_dlt-original-topic", topic),
                (
                    "kafka_dlt-original-partition",
                    m.partition().to_be_bytes().to_vec(),
                ),
                (
                    "kafka_dlt-original-offset",
                    m.offset().to_be_bytes().to_vec(),
                ),
                (
                    "kafka_dlt-original-timestamp",
                    timestamp.to_be_bytes().to_vec(),
                ),
                ("kafka_dlt-original-consumer-group", group),
                ("kafka_dlt-exception-fqcn", class),
                ("kafka_dlt-exception-message", message),
                ("outboxd-dlt-handler", handler),
                ("outboxd-dlt-attempts", attempts),
                ("outboxd-dlt-failed-at", text(&failed_at)),
            ],
            DeadLetterDialect::Connect => vec![
                ("__connect.errors.topic", topic),
                ("__connect.errors.partition", partition),
                ("__connect.errors.offset", offset),
                ("__connect.errors.connector.name", group),
                ("__connect.errors.stage", handler),
                ("__connect.errors.class.name", class.clone()),
                ("__connect.errors.exception.class.name", class),
                ("__connect.errors.exception.message", message),
                ("outboxd-dlt-original-timestamp", ts),
                ("outboxd-dlt-attempts", attempts),
                ("outboxd-dlt-failed-at", text(&failed_at)),
            ],
        }
    }
}

/// The message's own headers without the reserved ones; a replay count it carried (a
/// replayed message that failed again) is kept as a number, so the loop guard goes on
/// counting.
fn original_headers(m: &Received) -> OwnedHeaders {
    if !m.headers_read() {
        // Never by design (`Local::reads_headers`): said aloud if it ever happens.
        debug_assert!(
            false,
            "a message that may be dead-lettered is taken with its headers"
        );
        tracing::error!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            "this dead letter carries none of the message's original headers: they were not read"
        );
    }
    let mut headers = OwnedHeaders::new();
    let mut replays = None;
    for h in m.headers().iter().flat_map(|h| h.iter()) {
        if h.key == REPLAY_COUNT {
            replays = h
                .value
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<u32>().ok());
        } else if !is_reserved(h.key) {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    if let Some(n) = replays {
        headers = headers.insert(Header {
            key: REPLAY_COUNT,
            value: Some(n.to_string().as_bytes()),
        });
    }
    headers
}

/// An error text fit for a header: secrets scrubbed, at most [`MAX_ERROR_MESSAGE`] bytes
/// (cut at a character boundary, marked with `...`).
fn bounded(text: &str) -> String {
    let text = crate::secrets::scrub(text);
    if text.len() <= MAX_ERROR_MESSAGE {
        return text.into_owned();
    }
    let mut end = MAX_ERROR_MESSAGE - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_are_bounded_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_ERROR_MESSAGE && cut.ends_with("..."));
        assert_eq!(bounded("short"), "short");
    }
}
