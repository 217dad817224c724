//! `[handlers.NAME]`: where consumed messages are delivered. `kind` picks the handler;
//! each kind has its own keys, plus an optional `[handlers.NAME.retry]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::consumer::{OutageOverride, RetryOverride};

/// One handler.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HandlerConfig {
    /// POST the message value to an HTTP endpoint.
    Http(HttpHandlerConfig),
    /// Run a program with the value on stdin.
    Command(CommandHandlerConfig),
    /// Run a SQL statement with parameters from the JSON payload, exactly once per event.
    Sql(SqlHandlerConfig),
    /// Forward the message to another topic.
    Kafka(KafkaHandlerConfig),
    /// Log the message and succeed.
    Log(LogHandlerConfig),
}

impl HandlerConfig {
    /// The handler's retry override.
    pub fn retry(&self) -> &RetryOverride {
        match self {
            HandlerConfig::Http(h) => &h.retry,
            HandlerConfig::Command(h) => &h.retry,
            HandlerConfig::Sql(h) => &h.retry,
            HandlerConfig::Kafka(h) => &h.retry,
            HandlerConfig::Log(h) => &h.retry,
        }
    }

    /// The handler's outage override.
    pub fn outage(&self) -> &OutageOverride {
        match self {
            HandlerConfig::Http(h) => &h.outage,
            HandlerConfig::Command(h) => &h.outage,
            HandlerConfig::Sql(h) => &h.outage,
            HandlerConfig::Kafka(h) => &h.outage,
            HandlerConfig::Log(h) => &h.outage,
        }
    }
}

/// `kind = "http"`: 2xx is done; 408, 429, 5xx, the `retry_statuses` and timeouts are
/// retried; other statuses dead-letter the message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHandlerConfig {
    /// Endpoint receiving `POST` with the message value as body and CloudEvents binary-mode
    /// headers (`ce-specversion`, `ce-id`, `ce-type`, `ce-source`, `ce-time`), plus
    /// `traceparent`/`tracestate` when the message carries them; with `batch_size` above 1,
    /// batches of structured events instead.
    pub url: String,
    /// Whole-request timeout; a timeout is retried.
    #[serde(with = "humantime_serde", default = "default_http_timeout")]
    pub timeout: Duration,
    /// Extra request headers (e.g. `authorization`); values of credential-like headers are
    /// redacted by check-config.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Statuses retried on top of 408, 429 and 5xx, e.g. `[401, 403]` while a token
    /// rotates or `[409]` for an endpoint that answers conflicts until an earlier event
    /// arrived; other 4xx (and 3xx) dead-letter at once.
    #[serde(default)]
    pub retry_statuses: Vec<u16>,
    /// Above 1: the events that arrive together, up to this many (the heads of different
    /// keys), go in one POST in CloudEvents batched content mode
    /// (`application/cloudevents-batch+json`, a JSON array of structured events) instead of
    /// one POST each in binary mode. A 2xx makes every event of the batch final; a status
    /// that dead-letters splits the batch in halves, sent again apart, until the event at
    /// fault is alone; a retryable failure retries each event alone (a batch of one), so
    /// batches need `max_attempts` of at least 2. Up to four batches run at once;
    /// `consumer.max_in_flight` bounds the calls in flight.
    #[serde(default = "default_one")]
    pub batch_size: usize,
    /// How long the first call of a batch waits for more while fewer than `batch_size` wait.
    #[serde(with = "humantime_serde", default)]
    pub batch_linger: Duration,
    /// Overrides of `[consumer.retry]`.
    #[serde(default)]
    pub retry: RetryOverride,
    /// Overrides of `[consumer.outage]`.
    #[serde(default)]
    pub outage: OutageOverride,
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_one() -> usize {
    1
}

/// The variables that describe the event to a `command` handler's child. A configuration
/// loaded from the environment ignores them, so an `outboxd` started by a handler does not
/// read them as its own keys.
pub mod event_vars {
    /// The message's topic.
    pub const TOPIC: &str = "OUTBOXD_TOPIC";
    /// Its partition.
    pub const PARTITION: &str = "OUTBOXD_PARTITION";
    /// Its offset.
    pub const OFFSET: &str = "OUTBOXD_OFFSET";
    /// Its key (lossy UTF-8).
    pub const KEY: &str = "OUTBOXD_KEY";
    /// The `event-id` header, else `topic/partition/offset`.
    pub const EVENT_ID: &str = "OUTBOXD_EVENT_ID";
    /// The `event-type` header, or empty.
    pub const EVENT_TYPE: &str = "OUTBOXD_EVENT_TYPE";
    /// This call's attempt number, from 1.
    pub const ATTEMPT: &str = "OUTBOXD_ATTEMPT";
    /// All of them.
    pub const ALL: &[&str] = &[TOPIC, PARTITION, OFFSET, KEY, EVENT_ID, EVENT_TYPE, ATTEMPT];
}

/// `kind = "command"`: exit 0 is done, an exit code in `retry_exit_codes` (or death by a
/// signal, or a timeout) is retried, any other code dead-letters the message. The child
/// starts in a process group of its own with a clean environment: `PATH`, the variables
/// `inherit_env` names, `env`, and the event variables; nothing else of outboxd's
/// environment (such as `OUTBOXD_DATABASE__URL`) reaches it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandHandlerConfig {
    /// The program, run directly (never through a shell). The value arrives on stdin;
    /// `OUTBOXD_TOPIC`, `OUTBOXD_PARTITION`, `OUTBOXD_OFFSET`, `OUTBOXD_KEY`,
    /// `OUTBOXD_EVENT_ID`, `OUTBOXD_EVENT_TYPE` and `OUTBOXD_ATTEMPT` describe it.
    pub program: PathBuf,
    /// Arguments, passed literally.
    #[serde(default)]
    pub args: Vec<String>,
    /// The child is killed after this long; that counts as retryable.
    #[serde(with = "humantime_serde", default = "default_command_timeout")]
    pub timeout: Duration,
    /// Exit codes meaning "try again later" (e.g. 75, EX_TEMPFAIL).
    #[serde(default)]
    pub retry_exit_codes: Vec<i32>,
    /// Variables set in the child's environment, e.g. `env = { LANG = "C.UTF-8" }`; a
    /// `PATH` here replaces outboxd's. Names starting with `OUTBOXD_` are reserved.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of outboxd's own environment variables passed on to the child when set, e.g.
    /// `["HOME", "TZ"]`. Only `PATH` passes without being named here.
    #[serde(default)]
    pub inherit_env: Vec<String>,
    /// Overrides of `[consumer.retry]`.
    #[serde(default)]
    pub retry: RetryOverride,
    /// Overrides of `[consumer.outage]`.
    #[serde(default)]
    pub outage: OutageOverride,
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `kind = "sql"`: runs `statement` on `[database]` in one transaction with an insert of
/// `(handler, event id)` into `outboxd_inbox`; an event already there succeeds without a
/// second effect. Serialization, deadlock and connection errors are retried; constraint
/// and data errors dead-letter the message; a payload that is not JSON dead-letters at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlHandlerConfig {
    /// A statement with placeholders: `$1`, `$2`, ... on PostgreSQL, `?` on MySQL and
    /// SQLite. On PostgreSQL parameter types come from the statement (bool, integers,
    /// floats, numeric, text, json/jsonb, uuid; write `$1::text::timestamptz` for others);
    /// MySQL and SQLite receive each JSON value as what it is (number, string, boolean,
    /// NULL; arrays and objects as JSON text) and convert it to the column's type.
    pub statement: String,
    /// JSON pointers into the payload, one per placeholder (`"/amount"`; `""` is the whole
    /// payload). A pointer that finds nothing binds NULL.
    #[serde(default)]
    pub params: Vec<String>,
    /// On PostgreSQL, the longest the transaction's statements may run or wait for a lock
    /// (`statement_timeout` and `lock_timeout` of the transaction); past it the call fails
    /// and is retried. MySQL waits for locks as long as the server's
    /// `innodb_lock_wait_timeout` says (50 s by default), SQLite 10 s for a locked
    /// database (outboxd's busy timeout).
    #[serde(with = "humantime_serde", default = "default_sql_timeout")]
    pub timeout: Duration,
    /// Events applied in one transaction: calls that arrive while a transaction runs wait
    /// for the next one, which takes up to this many (the heads of different keys, never
    /// two messages of one key), with one multi-row inbox insert on PostgreSQL and one
    /// commit. A message that fails for good inside a batch is taken out and the others
    /// run again without it; a batch that fails retryably is retried, each message on its
    /// own, so batches need `max_attempts` of at least 2. Up to four batches run at once,
    /// each on a connection of its own (one on SQLite). Calls in flight are bounded by
    /// `consumer.max_in_flight` over all handlers, so batches are at most that large. 1: one
    /// transaction per event.
    #[serde(default = "default_sql_batch_size")]
    pub batch_size: usize,
    /// How long the first call of a batch waits for more when fewer than `batch_size` are
    /// waiting. Zero (the default): it runs at once, and the calls that arrive while it
    /// runs make the next batch.
    #[serde(with = "humantime_serde", default)]
    pub batch_linger: Duration,
    /// Overrides of `[consumer.retry]`.
    #[serde(default)]
    pub retry: RetryOverride,
    /// Overrides of `[consumer.outage]`.
    #[serde(default)]
    pub outage: OutageOverride,
}

fn default_sql_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_sql_batch_size() -> usize {
    100
}

/// `kind = "kafka"`: produce key, value and headers to `topic` and await the acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaHandlerConfig {
    /// Target topic.
    pub topic: String,
    /// Overrides of `[consumer.retry]`.
    #[serde(default)]
    pub retry: RetryOverride,
    /// Overrides of `[consumer.outage]`.
    #[serde(default)]
    pub outage: OutageOverride,
}

/// `kind = "log"`: log topic, partition, offset, key and event type at info; always done.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogHandlerConfig {
    /// Overrides of `[consumer.retry]` (a log handler never fails; accepted for symmetry).
    #[serde(default)]
    pub retry: RetryOverride,
    /// Overrides of `[consumer.outage]` (accepted for symmetry).
    #[serde(default)]
    pub outage: OutageOverride,
}
