//! An `http` handler's batch: the events that arrive together in one POST, in CloudEvents
//! batched content mode (`application/cloudevents-batch+json`: a JSON array of structured
//! events). A 2xx makes every event final. A status that dead-letters names no event, so
//! the batch is split in halves, each sent again, until the event at fault is alone and
//! dead-lettered; the others succeed in their halves. A retryable failure (408, 429, 5xx,
//! a timeout, no connection) fails every event of the batch, recorded once by outage
//! detection; each is retried alone, as a batch of one.

use std::future::Future;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use prometheus::IntCounter;
use rdkafka::message::Message;
use serde_json::{Map, Value};

use super::{Event, Outcome};

/// The batched content mode's media type.
pub(super) const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Headers carried over from the message when present (as attributes in structured mode).
pub(super) const PASSED_THROUGH: &[&str] = &["traceparent", "tracestate"];

/// `event` as a structured CloudEvent: the attributes binary mode sends as `ce-` headers
/// (`specversion`, `id`, `type`, `source`, `time`), `datacontenttype` (the message's
/// `content-type` header, else `application/json`), the value as `data` when it is JSON of
/// a JSON content type, else as `data_base64` (no data for an empty value), and
/// `traceparent`/`tracestate` when the message carries them.
pub(super) fn structured(event: &Event) -> Value {
    let m = &event.message;
    let mut e = Map::new();
    e.insert("specversion".into(), "1.0".into());
    e.insert("id".into(), event.event_id().into_owned().into());
    e.insert(
        "type".into(),
        event.event_type().unwrap_or(m.topic()).to_owned().into(),
    );
    e.insert("source".into(), m.topic().to_owned().into());
    if let Some(ms) = m.timestamp().to_millis().filter(|ms| *ms >= 0) {
        let at = UNIX_EPOCH + Duration::from_millis(ms as u64);
        e.insert(
            "time".into(),
            humantime::format_rfc3339_millis(at).to_string().into(),
        );
    }
    let content_type = event.header("content-type").unwrap_or("application/json");
    e.insert("datacontenttype".into(), content_type.to_owned().into());
    let value = event.value();
    let json = is_json(content_type)
        .then(|| serde_json::from_slice::<Value>(value).ok())
        .flatten();
    match json {
        Some(data) => {
            e.insert("data".into(), data);
        }
        None if !value.is_empty() => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(value);
            e.insert("data_base64".into(), encoded.into());
        }
        None => {}
    }
    for name in PASSED_THROUGH {
        if let Some(value) = event.header(name) {
            e.insert((*name).to_owned(), value.to_owned().into());
        }
    }
    Value::Object(e)
}

/// `application/json`, or any `+json` type, parameters aside.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
}

/// Sends `events` with `post` as one batch, and halves of it while a status dead-letters
/// it; one outcome per event.
pub(super) async fn send_all<F, Fut>(
    events: &[Value],
    post: &F,
    splits: &IntCounter,
) -> Vec<Outcome>
where
    F: Fn(&[Value]) -> Fut,
    Fut: Future<Output = Outcome>,
{
    match post(events).await {
        Outcome::Done => vec![Outcome::Done; events.len()],
        Outcome::DeadLetter(..) if events.len() > 1 => {
            splits.inc();
            let (first, second) = events.split_at(events.len() / 2);
            let mut outcomes = Box::pin(send_all(first, post, splits)).await;
            outcomes.extend(Box::pin(send_all(second, post, splits)).await);
            outcomes
        }
        dead @ Outcome::DeadLetter(..) => vec![dead],
        retry => {
            let (error, after) = match &retry {
                Outcome::RetryAfter(e, after) => (e.clone(), Some(*after)),
                Outcome::Retry(e) => (e.clone(), None),
                Outcome::RetryShared(e, after) => (e.clone(), *after),
                Outcome::Done | Outcome::DeadLetter(..) => (String::new(), None),
            };
            let shared = Outcome::RetryShared(error, after);
            // The first carries the failure for outage detection; the others share it,
            // with the wait the downstream asked for.
            let mut outcomes = vec![retry];
            outcomes.resize(events.len(), shared);
            outcomes
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Timestamp;

    use super::*;
    use crate::handlers::{Received, ReceivedHeaders};

    fn event(value: &[u8], headers: &[(&str, &str)]) -> Event {
        let mut h = ReceivedHeaders::default();
        for (k, v) in headers {
            h.push(k.as_bytes(), Some(v.as_bytes()));
        }
        Event {
            message: Received::new(
                "orders".into(),
                0,
                7,
                Timestamp::CreateTime(1_765_000_000_123),
                Some(b"k"),
                Some(value),
                Some(h),
            ),
        }
    }

    #[test]
    fn a_json_value_is_data_and_anything_else_data_base64() {
        let e = structured(&event(
            br#"{"n": 1}"#,
            &[
                ("event-id", "e-1"),
                ("event-type", "OrderPlaced"),
                ("traceparent", "00-1-2-01"),
            ],
        ));
        assert_eq!(
            e,
            serde_json::json!({
                "specversion": "1.0", "id": "e-1", "type": "OrderPlaced", "source": "orders",
                "time": "2025-12-06T05:46:40.123Z", "datacontenttype": "application/json",
                "data": {"n": 1}, "traceparent": "00-1-2-01",
            })
        );
        let e = structured(&event(
            b"\x00\x01",
            &[("content-type", "application/octet-stream")],
        ));
        assert_eq!(e["data_base64"], "AAE=");
        assert_eq!(e["id"], "orders/0/7", "no event-id: topic/partition/offset");
        let e = structured(&event(b"not json", &[]));
        assert_eq!(
            e["data_base64"], "bm90IGpzb24=",
            "JSON content type, not JSON"
        );
        assert!(is_json("application/vnd.x+json; charset=utf-8"));
    }
}
