//! Handlers: where consumed messages are delivered. One file per kind; each implements
//! [`Handle`], and [`Handler`] dispatches statically (no boxed future per message).

mod batch;
mod command;
mod http;
mod http_batch;
mod kafka;
mod log;
mod received;
mod sql;
mod sql_batch;

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use rdkafka::message::{Headers, Message};

use crate::config::HandlerConfig;
use crate::kafka::ProducerSlot;
pub use received::{Received, ReceivedHeaders};

/// A consumed message as handlers see it.
pub struct Event {
    /// The message, detached from the consumer.
    pub message: Received,
}

impl Event {
    /// The first header called `name`, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let headers = self.message.headers()?;
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    }

    /// The `event-id` header, else `topic/partition/offset` (stable across redeliveries).
    pub fn event_id(&self) -> Cow<'_, str> {
        match self.header("event-id") {
            Some(id) => Cow::Borrowed(id),
            None => Cow::Owned(format!(
                "{}/{}/{}",
                self.message.topic(),
                self.message.partition(),
                self.message.offset()
            )),
        }
    }

    /// The `event-type` header.
    pub fn event_type(&self) -> Option<&str> {
        self.header("event-type")
    }

    /// The value, empty when the message has none.
    pub fn value(&self) -> &[u8] {
        self.message.payload().unwrap_or_default()
    }

    /// The key as text (lossy).
    pub fn key(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.message.key().unwrap_or_default())
    }
}

/// Why a message is parked on the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The handler kept failing in a retryable way until the policy gave up.
    RetryableExhausted,
    /// The handler said the message can never succeed (4xx, constraint violation, ...).
    Permanent,
    /// The payload could not be decoded as the handler needs it.
    Decode,
    /// No route matched.
    Unrouted,
}

impl ErrorClass {
    /// The name used in headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RetryableExhausted => "retryable_exhausted",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Decode => "decode",
            ErrorClass::Unrouted => "unrouted",
        }
    }
}

/// What one handler call decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled; the offset may move past it.
    Done,
    /// Failed in a way that may pass later; retry per the policy.
    Retry(String),
    /// As `Retry`, and the downstream asked not to be called again before this long
    /// (HTTP `Retry-After`).
    RetryAfter(String, std::time::Duration),
    /// As `Retry` (with the wait the downstream asked for, if any), for a call that failed
    /// together with others in one batch: outage detection counts the batch's failure
    /// once, on the call that carries `Retry` or `RetryAfter`.
    RetryShared(String, Option<std::time::Duration>),
    /// Will never succeed as it is; dead-letter it now.
    DeadLetter(ErrorClass, String),
}

/// A handler kind.
pub trait Handle {
    /// Delivers `event`; `attempt` counts from 1.
    fn handle(&self, event: &Event, attempt: u32) -> impl Future<Output = Outcome> + Send;
}

/// What handlers may need from the daemon.
pub struct HandlerDeps {
    /// The database, for `sql` handlers.
    pub database: Option<crate::db::Database>,
    /// The shared producer, for `kafka` handlers.
    pub producer: Arc<ProducerSlot>,
    /// The metrics, for batching handlers.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Why a handler could not be built or take a reload.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `url` is not a URL.
    #[error("url")]
    Url(#[source] url::ParseError),
    /// A configured header name is not one.
    #[error("headers: `{name}`")]
    HeaderName {
        /// The name as configured.
        name: String,
        /// Why.
        source: reqwest::header::InvalidHeaderName,
    },
    /// A configured header value is not one.
    #[error("headers: value of `{name}`")]
    HeaderValue {
        /// The header.
        name: String,
        /// Why.
        source: reqwest::header::InvalidHeaderValue,
    },
    /// The HTTP client could not be built.
    #[error("http client")]
    Client(#[source] reqwest::Error),
    /// A `sql` handler without `[database]`.
    #[error("a sql handler needs [database]")]
    NoDatabase,
}

/// A handler that could not be built or take a reload, by name.
#[derive(Debug, thiserror::Error)]
#[error("handlers.{name}")]
pub struct HandlerError {
    /// `[handlers.NAME]`
    pub name: String,
    /// Why.
    #[source]
    pub source: SetupError,
}

/// Any handler.
pub enum Handler {
    /// `kind = "http"`
    Http(http::HttpHandler),
    /// `kind = "command"`
    Command(command::CommandHandler),
    /// `kind = "sql"`
    Sql(Box<sql::SqlHandler>),
    /// `kind = "kafka"`
    Kafka(kafka::KafkaHandler),
    /// `kind = "log"`
    Log(log::LogHandler),
}

impl Handler {
    /// Builds handler `name` from its (validated) configuration.
    pub fn build(
        name: &str,
        config: &HandlerConfig,
        deps: &HandlerDeps,
    ) -> Result<Self, HandlerError> {
        Self::of_kind(name, config, deps).map_err(|source| HandlerError {
            name: name.to_owned(),
            source,
        })
    }

    fn of_kind(name: &str, config: &HandlerConfig, deps: &HandlerDeps) -> Result<Self, SetupError> {
        Ok(match config {
            HandlerConfig::Http(c) => {
                Handler::Http(http::HttpHandler::new(name, c, &deps.metrics)?)
            }
            HandlerConfig::Command(c) => Handler::Command(command::CommandHandler::new(c)),
            HandlerConfig::Sql(c) => {
                let database = deps.database.clone().ok_or(SetupError::NoDatabase)?;
                Handler::Sql(Box::new(sql::SqlHandler::new(
                    name,
                    c,
                    database,
                    &deps.metrics,
                )))
            }
            HandlerConfig::Kafka(c) => {
                Handler::Kafka(kafka::KafkaHandler::new(c, deps.producer.clone()))
            }
            HandlerConfig::Log(_) => Handler::Log(log::LogHandler),
        })
    }

    /// Applies the reloadable settings of `config` (http headers and timeout, command
    /// timeout); the caller has checked that the kind is unchanged.
    pub fn reconfigure(&self, config: &HandlerConfig) -> Result<(), SetupError> {
        match (self, config) {
            (Handler::Http(h), HandlerConfig::Http(c)) => h.reconfigure(c),
            (Handler::Command(h), HandlerConfig::Command(c)) => {
                h.reconfigure(c);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// False for a handler that reads no header of the messages it gets and never
    /// dead-letters one (a dead letter carries them): `log` while its line is off.
    pub fn reads_headers(&self) -> bool {
        match self {
            Handler::Log(h) => h.logs(),
            _ => true,
        }
    }

    /// True for a handler whose every call ends without waiting for anything
    /// ([`Handler::handle_at_once`] answers).
    pub fn answers_at_once(&self) -> bool {
        matches!(self, Handler::Log(_))
    }

    /// Delivers `event` on the spot if this handler never waits (`log`); `None` for the
    /// others, which [`Handler::handle`] calls.
    pub fn handle_at_once(&self, event: &Event, _attempt: u32) -> Option<Outcome> {
        match self {
            Handler::Log(h) => Some(h.log(event)),
            _ => None,
        }
    }

    /// Delivers `event` with whichever handler this is. The call's state is boxed as the
    /// call begins: a message waiting for its turn then holds a few hundred bytes instead
    /// of the largest handler's state (about 6 KiB), which a window of messages waiting
    /// in key order multiplied.
    pub async fn handle(&self, event: &Event, attempt: u32) -> Outcome {
        match self {
            Handler::Http(h) => Box::pin(h.handle(event, attempt)).await,
            Handler::Command(h) => Box::pin(h.handle(event, attempt)).await,
            Handler::Sql(h) => Box::pin(h.handle(event, attempt)).await,
            Handler::Kafka(h) => Box::pin(h.handle(event, attempt)).await,
            Handler::Log(h) => h.log(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rdkafka::message::Timestamp;

    fn event(headers: &[(String, Vec<u8>)], value: Option<Vec<u8>>) -> Event {
        let mut h = ReceivedHeaders::default();
        for (k, v) in headers {
            h.push(k.as_bytes(), Some(v));
        }
        Event {
            message: Received::new(
                "t".into(),
                3,
                42,
                Timestamp::NotAvailable,
                None,
                value.as_deref(),
                Some(h),
            ),
        }
    }

    proptest! {
        /// Arbitrary header bytes never break decoding: an event id that is not UTF-8 falls
        /// back to topic/partition/offset.
        #[test]
        fn arbitrary_headers_decode_without_panicking(
            headers in proptest::collection::vec(("(event-id|event-type|traceparent|[a-z]{1,8})", proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
            value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        ) {
            let e = event(&headers, value);
            let id = e.event_id();
            prop_assert!(!id.is_empty() || headers.iter().any(|(k, v)| k == "event-id" && v.is_empty()));
            let first_id = headers.iter().find(|(k, _)| k == "event-id");
            if let Some((_, bytes)) = first_id {
                if std::str::from_utf8(bytes).is_err() {
                    prop_assert_eq!(id.as_ref(), "t/3/42");
                }
            }
            let _ = (e.event_type(), e.key(), e.value(), e.header("traceparent"));
        }
    }
}
