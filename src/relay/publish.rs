//! Turning claimed rows into Kafka messages and publishing a batch: every row is enqueued
//! in order without waiting (the producer pipelines them, also while the lane claims more
//! rows of the batch), then every delivery report is awaited. Each row ends with exactly
//! one outcome.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use super::store::ClaimedRow;
use crate::config::{HeaderNames, NullPayload, TableConfig};
use crate::glob::glob_match;
use crate::reserved_headers::is_reserved;
use crate::topic::{check_topic, TemplateError, TopicNameError, TopicTemplate};

/// What happened to one row of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// Kafka acknowledged it (acks=all).
    Delivered {
        /// When the delivery report arrived.
        at: SystemTime,
        /// The topic it went to.
        topic: Arc<str>,
    },
    /// Kafka refused this message for good (too large, invalid or unknown topic).
    Refused(String),
    /// A failure that says nothing about the row (broker down, timeout): try again later.
    Failed(String),
    /// The row cannot become a message (NULL key or payload, bad headers, bad topic).
    Bad(String),
}

/// Which row field a column name maps to, for rendering topic templates.
#[derive(Debug, Clone, Copy)]
pub enum Field {
    /// `id_column`
    Id,
    /// `key_column`
    Key,
    /// `event_id_column`
    EventId,
    /// `event_type_column`
    EventType,
    /// `aggregate_type_column`
    AggregateType,
}

/// Why a table's topic settings cannot be used (validation reports the same problems
/// before start-up).
#[derive(Debug, thiserror::Error)]
pub enum TopicSourceError {
    /// The template does not parse.
    #[error("topic")]
    Template(#[from] TemplateError),
    /// A template without columns is not a topic name.
    #[error("topic")]
    Name(#[from] TopicNameError),
    /// A template that starts with a column needs `allowed_topics`.
    #[error("allowed_topics: required for this topic template")]
    AllowedTopics,
}

/// Where a row's topic comes from.
#[derive(Debug, Clone)]
pub enum TopicSource {
    /// One topic for every row (a template without columns), checked once.
    Fixed(Arc<str>),
    /// A template over mapped columns, and the globs its result must match.
    Template(TopicTemplate, Vec<(String, Field)>, Vec<String>),
    /// The `topic_column` value, and the globs it must match.
    Column(Vec<String>),
}

impl TopicSource {
    /// The topic source of table `t`.
    pub fn new(t: &TableConfig) -> Result<Self, TopicSourceError> {
        let Some(template) = &t.topic else {
            return Ok(TopicSource::Column(t.allowed_topics.clone()));
        };
        let template = TopicTemplate::parse(template, &t.mapped_columns())?;
        if template.columns().next().is_none() {
            let mut topic = String::new();
            let no_columns = template.render_into(&mut topic, |_| None);
            debug_assert!(no_columns.is_ok(), "a template without columns renders");
            check_topic(&topic)?;
            return Ok(TopicSource::Fixed(topic.into()));
        }
        let fields = [
            (Some(&t.id_column), Field::Id),
            (Some(&t.key_column), Field::Key),
            (t.event_id_column.as_ref(), Field::EventId),
            (t.event_type_column.as_ref(), Field::EventType),
            (t.aggregate_type_column.as_ref(), Field::AggregateType),
        ]
        .into_iter()
        .filter_map(|(c, f)| Some((c?.to_string(), f)))
        .collect();
        let allowed = match template.literal_prefix() {
            _ if !t.allowed_topics.is_empty() => t.allowed_topics.clone(),
            Some(prefix) => vec![format!("{prefix}*")],
            None => return Err(TopicSourceError::AllowedTopics),
        };
        Ok(TopicSource::Template(template, fields, allowed))
    }

    /// Row `row`'s topic; `scratch` is reused to render it. A rendered topic equal to
    /// the `last` one shares it, checked once: the rows of a batch mostly go to a few
    /// topics.
    fn topic_of(
        &self,
        row: &ClaimedRow,
        scratch: &mut String,
        last: &mut Option<Arc<str>>,
    ) -> Result<Arc<str>, String> {
        let out = scratch;
        let allowed = match self {
            TopicSource::Fixed(topic) => return Ok(topic.clone()),
            TopicSource::Column(allowed) => {
                out.clear();
                out.push_str(row.topic().ok_or("topic column is NULL")?);
                allowed
            }
            TopicSource::Template(template, fields, allowed) => {
                let value = |column: &str| {
                    let field = fields.iter().find(|(c, _)| c == column)?.1;
                    match field {
                        Field::Id => Some(row.id()),
                        Field::Key => row.key(),
                        Field::EventId => row.event_id(),
                        Field::EventType => row.event_type(),
                        Field::AggregateType => row.aggregate_type(),
                    }
                };
                template
                    .render_into(out, value)
                    .map_err(|c| format!("topic template column `{c}` is NULL"))?;
                allowed
            }
        };
        if let Some(topic) = last.as_ref().filter(|t| ***t == **out) {
            return Ok(topic.clone());
        }
        check_topic(out).map_err(|e| e.to_string())?;
        if !allowed.iter().any(|glob| glob_match(glob, out)) {
            return Err(format!(
                "topic `{out}` is not in allowed_topics ({})",
                allowed.join(", ")
            ));
        }
        let topic: Arc<str> = Arc::from(out.as_str());
        *last = Some(topic.clone());
        Ok(topic)
    }
}

/// How a table's rows become messages: their topic, the headers outboxd adds, and what a
/// NULL payload becomes.
#[derive(Debug, Clone)]
pub struct MessageShape {
    /// Where each row's topic comes from.
    pub topics: TopicSource,
    names: HeaderNames,
    /// The names of `header_columns`, in the order the claim returns their values.
    header_columns: Vec<String>,
    null_payload: NullPayload,
}

impl MessageShape {
    /// The message shape of table `t`.
    pub fn new(t: &TableConfig) -> Result<Self, TopicSourceError> {
        Ok(MessageShape {
            topics: TopicSource::new(t)?,
            names: t.header_names.clone(),
            header_columns: t.header_columns.keys().cloned().collect(),
            null_payload: t.null_payload,
        })
    }
}

/// A header's value from JSON: a string as it is, any other value as its JSON text.
fn header_value<'v>(value: &'v serde_json::Value, text: &'v mut String) -> &'v [u8] {
    match value {
        serde_json::Value::String(s) => s.as_bytes(),
        other => {
            *text = other.to_string();
            text.as_bytes()
        }
    }
}

/// A row ready to send.
struct Prepared {
    topic: Arc<str>,
    headers: OwnedHeaders,
}

fn prepare(
    row: &ClaimedRow,
    shape: &MessageShape,
    scratch: &mut String,
    last_topic: &mut Option<Arc<str>>,
) -> Result<Prepared, String> {
    if let Some(problem) = &row.unreadable {
        return Err(problem.clone());
    }
    if row.key().is_none() {
        return Err("key column is NULL".into());
    }
    if row.payload.is_none() && shape.null_payload == NullPayload::DeadRow {
        return Err(
            "payload column is NULL (null_payload = \"tombstone\" sends it as a tombstone)".into(),
        );
    }
    let topic = shape.topics.topic_of(row, scratch, last_topic)?;
    let extra = match row.headers() {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(serde_json::Value::Null) => serde_json::Map::new(),
            Ok(_) => return Err("headers column is not a JSON object".into()),
            Err(e) => return Err(format!("headers column is not valid JSON: {e}")),
        },
    };
    let columns = match row.header_columns() {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<Vec<serde_json::Value>>(text)
            .map_err(|e| format!("header_columns cannot be read: {e}"))?,
    };
    let names = &shape.names;
    let mut headers = OwnedHeaders::new_with_capacity(3 + extra.len() + shape.header_columns.len());
    let event_id = row.event_id().unwrap_or(row.id());
    headers = headers.insert(Header {
        key: &names.event_id,
        value: Some(event_id.as_bytes()),
    });
    for (name, value) in [
        (&names.event_type, row.event_type()),
        (&names.aggregate_type, row.aggregate_type()),
    ] {
        if let Some(value) = value.filter(|_| !name.is_empty()) {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
    }
    let mut text = String::new();
    for (key, value) in shape.header_columns.iter().zip(&columns) {
        if !value.is_null() {
            headers = headers.insert(Header {
                key,
                value: Some(header_value(value, &mut text)),
            });
        }
    }
    if let Some(key) = extra.keys().find(|k| is_reserved(k)) {
        return Err(format!(
            "headers column sets `{key}`, a header only outboxd writes (dead-letter context, replay count)"
        ));
    }
    for (key, value) in &extra {
        headers = headers.insert(Header {
            key,
            value: Some(header_value(value, &mut text)),
        });
    }
    Ok(Prepared { topic, headers })
}

/// Whether Kafka refused this message for a reason that retrying will not change: what
/// [`crate::kafka::is_refusal`] says, or a topic that does not exist (a row named it).
fn is_refusal(e: &KafkaError) -> bool {
    crate::kafka::is_refusal(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
        )
}

fn classify(e: &KafkaError) -> RowOutcome {
    if is_refusal(e) {
        RowOutcome::Refused(e.to_string())
    } else {
        RowOutcome::Failed(e.to_string())
    }
}

/// Why a row was not enqueued at shutdown.
const NOT_SENT: &str = "not sent: shutting down while the producer's local queue was full";

/// A batch being published: rows are enqueued in order as they are claimed (the producer
/// sends them while the next rows are claimed), then every delivery report is awaited.
pub struct Publication<'p> {
    producer: &'p FutureProducer,
    shape: &'p MessageShape,
    /// Shutdown: a row that then finds the producer's local queue full is not enqueued.
    stop: &'p CancellationToken,
    /// A row was left unsent at shutdown: every later row is left too, so that none
    /// overtakes it.
    abandoned: bool,
    outcomes: Vec<Option<RowOutcome>>,
    pending: Vec<(usize, DeliveryFuture, Arc<str>)>,
    /// Reused to render each row's topic.
    scratch: String,
    /// The topic rendered last, checked.
    last_topic: Option<Arc<str>>,
}

impl<'p> Publication<'p> {
    /// An empty publication on `producer`, with room for `rows` rows; it stops waiting for
    /// room in the producer's queue once `stop` is cancelled.
    pub fn new(
        producer: &'p FutureProducer,
        shape: &'p MessageShape,
        stop: &'p CancellationToken,
        rows: usize,
    ) -> Self {
        Publication {
            producer,
            shape,
            stop,
            abandoned: false,
            outcomes: Vec::with_capacity(rows),
            pending: Vec::with_capacity(rows),
            scratch: String::new(),
            last_topic: None,
        }
    }

    /// Enqueues `rows` after everything enqueued so far; waits only while the producer's
    /// local queue is full, and not once shutting down: that row and every later one then
    /// fail unsent (they stay in the outbox).
    pub async fn send(&mut self, rows: &[ClaimedRow]) {
        for row in rows {
            let i = self.outcomes.len();
            self.outcomes.push(None);
            if self.abandoned {
                self.outcomes[i] = Some(RowOutcome::Failed(NOT_SENT.into()));
                continue;
            }
            let prepared = match prepare(row, self.shape, &mut self.scratch, &mut self.last_topic) {
                Ok(p) => p,
                Err(reason) => {
                    self.outcomes[i] = Some(RowOutcome::Bad(reason));
                    continue;
                }
            };
            let key = row.key().unwrap_or_default();
            let topic = prepared.topic;
            let record = FutureRecord::<str, [u8]>::to(&topic)
                .key(key)
                .headers(prepared.headers);
            // No payload: a tombstone (`prepare` let it through only when configured so).
            let mut record = match row.payload.as_deref() {
                Some(payload) => record.payload(payload),
                None => record,
            };
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        self.pending.push((i, delivery, topic));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: let deliveries drain, then enqueue this
                        // same row again (order is kept: nothing later was enqueued).
                        record = back;
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(2)) => {}
                            () = self.stop.cancelled() => {
                                self.abandoned = true;
                                self.outcomes[i] = Some(RowOutcome::Failed(NOT_SENT.into()));
                                break;
                            }
                        }
                    }
                    Err((e, _)) => {
                        self.outcomes[i] = Some(classify(&e));
                        break;
                    }
                }
            }
        }
    }

    /// Awaits every delivery report: one outcome per row sent, in sending order.
    pub async fn finish(mut self) -> Vec<RowOutcome> {
        for (i, delivery, topic) in std::mem::take(&mut self.pending) {
            self.outcomes[i] = Some(match delivery.await {
                Ok(Ok(_)) => RowOutcome::Delivered {
                    at: SystemTime::now(),
                    topic,
                },
                Ok(Err((e, _))) => classify(&e),
                Err(_canceled) => RowOutcome::Failed("producer dropped the message".into()),
            });
        }
        self.outcomes
            .into_iter()
            .map(|o| o.expect("every row got an outcome"))
            .collect()
    }
}

/// Seconds between `created_at` (Unix seconds) and `at`.
pub fn delay_seconds(created_at: f64, at: SystemTime) -> f64 {
    let at = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    (at - created_at).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::store::Columns;
    use proptest::prelude::*;

    fn typed(event_type: &str) -> ClaimedRow {
        ClaimedRow::new(&Columns {
            id: "1",
            key: Some("k"),
            payload: Some(b"{}"),
            event_type: Some(event_type),
            ..Columns::default()
        })
    }

    fn row(headers: Option<String>, key: Option<String>) -> ClaimedRow {
        ClaimedRow::new(&Columns {
            id: "1",
            key: key.as_deref(),
            payload: Some(b"{}"),
            headers: headers.as_deref(),
            event_type: Some("E"),
            ..Columns::default()
        })
    }

    #[test]
    fn rows_rendering_the_same_topic_share_it_and_every_new_one_is_checked() {
        let (topics, mut scratch, mut last) = (topics(), String::new(), None);
        let mut topic_of = |event_type: &str| {
            prepare(&typed(event_type), &topics, &mut scratch, &mut last).map(|p| p.topic)
        };
        let first = topic_of("A").unwrap();
        let again = topic_of("A").unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same topic is shared");
        assert_eq!(&*topic_of("B").unwrap(), "events.B");
        let err = topic_of("no spaces").unwrap_err();
        assert!(err.contains("topic"), "{err}");
        assert_eq!(&*topic_of("A").unwrap(), "events.A");
    }

    fn table() -> TableConfig {
        TableConfig {
            table: "outbox".into(),
            topic: Some("events.{event_type}".into()),
            ..TableConfig::default()
        }
    }

    fn topics() -> MessageShape {
        MessageShape::new(&table()).unwrap()
    }

    fn header_list(p: &Prepared) -> Vec<(String, Option<String>)> {
        use rdkafka::message::Headers;
        p.headers
            .iter()
            .map(|h| {
                let value = h.value.map(|v| String::from_utf8(v.to_vec()).unwrap());
                (h.key.to_owned(), value)
            })
            .collect()
    }

    #[test]
    fn header_names_and_header_columns_come_from_the_configuration() {
        let mut t = table();
        t.header_names.event_id = "id".into();
        t.header_columns = [("tenant", "tenant_id"), ("count", "n"), ("gone", "g")]
            .into_iter()
            .map(|(h, c)| (h.to_owned(), crate::config::Column::new(c).unwrap()))
            .collect();
        let shape = MessageShape::new(&t).unwrap();
        // Values in the order of the names: count, gone, tenant.
        let row = ClaimedRow::new(&Columns {
            id: "7",
            key: Some("k"),
            payload: Some(b"{}"),
            event_type: Some("E"),
            header_columns: Some(r#"[3, null, "acme"]"#),
            ..Columns::default()
        });
        let p = prepare(&row, &shape, &mut String::new(), &mut None).unwrap();
        let h = |k: &str, v: &str| (k.to_owned(), Some(v.to_owned()));
        assert_eq!(
            header_list(&p),
            [
                h("id", "7"),
                h("event-type", "E"),
                h("count", "3"),
                h("tenant", "acme")
            ]
        );
    }

    #[test]
    fn a_null_payload_is_a_dead_row_or_a_tombstone_as_configured() {
        let null = ClaimedRow::new(&Columns {
            id: "1",
            key: Some("k"),
            event_type: Some("E"),
            ..Columns::default()
        });
        let err = prepare(&null, &topics(), &mut String::new(), &mut None)
            .err()
            .expect("a dead row");
        assert!(err.contains("payload column is NULL"), "{err}");
        let mut t = table();
        t.null_payload = NullPayload::Tombstone;
        let shape = MessageShape::new(&t).unwrap();
        assert!(prepare(&null, &shape, &mut String::new(), &mut None).is_ok());
    }

    #[test]
    fn a_template_without_columns_is_one_topic_checked_once() {
        let t = |topic: &str| TableConfig {
            table: "outbox".into(),
            topic: Some(topic.into()),
            ..TableConfig::default()
        };
        let fixed = MessageShape::new(&t("orders.events")).unwrap();
        assert!(matches!(&fixed.topics, TopicSource::Fixed(name) if &**name == "orders.events"));
        let p = prepare(
            &row(None, Some("k".into())),
            &fixed,
            &mut String::new(),
            &mut None,
        )
        .unwrap();
        assert_eq!(&*p.topic, "orders.events");
        let long = "x".repeat(250);
        let err = TopicSource::new(&t(&long)).unwrap_err();
        assert!(
            matches!(err, TopicSourceError::Name(TopicNameError::TooLong(_))),
            "{err:?}"
        );
    }

    proptest! {
        /// Any text in the headers column becomes headers or a clear reason, never a panic.
        #[test]
        fn any_headers_text_is_decoded_or_refused(text in ".*") {
            match prepare(&row(Some(text), Some("k".into())), &topics(), &mut String::new(), &mut None) {
                Ok(p) => prop_assert_eq!(&*p.topic, "events.E"),
                Err(reason) => prop_assert!(reason.contains("headers column"), "{}", reason),
            }
        }

        /// Any JSON object's entries all become headers.
        #[test]
        fn every_json_object_entry_becomes_a_header(
            entries in proptest::collection::btree_map("[a-z-]{1,12}", any::<i64>(), 0..8)
        ) {
            let json = serde_json::to_string(&entries).unwrap();
            let prepared =
                prepare(&row(Some(json), Some("k".into())), &topics(), &mut String::new(), &mut None).unwrap();
            use rdkafka::message::Headers;
            // event-id and event-type come first.
            prop_assert_eq!(prepared.headers.count(), 2 + entries.len());
        }
    }
}
