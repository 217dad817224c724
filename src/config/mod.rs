//! Typed configuration: the TOML file's schema, its defaults, loading through figment
//! (defaults < file < `OUTBOXD_` environment), validation and redaction.
//!
//! The doc comment on every field is the reference documentation of that key.

mod backend;
pub mod column;
mod consumer;
mod handlers;
mod load;
mod redact;
mod relay;
mod rules;
mod validate;
mod validate_consumer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backend::Backend;
pub use column::Column;
pub use consumer::{
    ConsumerConfig, DeadLetterDialect, Ordering, OutageOverride, OutagePolicy, RetryOverride,
    RetryPolicy, RouteConfig, Unrouted,
};
pub use handlers::{
    event_vars, CommandHandlerConfig, HandlerConfig, HttpHandlerConfig, KafkaHandlerConfig,
    LogHandlerConfig, SqlHandlerConfig,
};
pub use load::{load, ConfigError};
pub use redact::{is_secret_name, redact_url, REDACTED};
pub use relay::{
    Capture, HeaderNames, NullPayload, OnPublished, RelayConfig, Snapshot, TableConfig, WalConfig,
};
pub use rules::Problem;

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How long a SIGTERM/SIGINT drain may take: claiming stops at once and each lane's
    /// batches in flight (one, or two overlapping ones) commit once Kafka acknowledged them,
    /// or roll back (their rows stay) if that has not happened within half of this. Past the deadline outboxd exits with
    /// status 1 and any open transaction is rolled back by the database (rows stay).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// The application database that holds the outbox tables.
    pub database: DatabaseConfig,
    /// The Kafka cluster events are published to.
    pub kafka: KafkaConfig,
    /// The operations endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub http: HttpConfig,
    /// Logging to stderr.
    pub log: LogConfig,
    /// The relay half: which outbox tables to publish. Optional.
    pub relay: RelayConfig,
    /// The consumer half: which topics to read and where messages go. Optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<ConsumerConfig>,
    /// Named handlers that `[[consumer.routes]]` deliver to.
    pub handlers: BTreeMap<String, HandlerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shutdown_timeout: Duration::from_secs(30),
            database: DatabaseConfig::default(),
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            relay: RelayConfig::default(),
            consumer: None,
            handlers: BTreeMap::new(),
        }
    }
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection URL; its scheme picks the backend: `postgres://user:password@host:5432/db`,
    /// `mysql://user:password@host:3306/db` (MySQL 8, MariaDB 10.6+; `mariadb://` too) or
    /// `sqlite://PATH?mode=rwc` (`mode=rwc` creates the file). Required when a relay
    /// table or a `sql` handler is configured. Prefer `url_file` or `OUTBOXD_DATABASE__URL` for a URL with a
    /// password; `check-config` prints it with the password redacted.
    pub url: Option<String>,
    /// A file whose content (trimmed) is the connection URL, e.g. a mounted secret. Mutually
    /// exclusive with `url`.
    pub url_file: Option<PathBuf>,
    /// Size of the shared pool used for maintenance, purges, readiness checks and `sql`
    /// handlers. Each owned relay lane, each table's member registration (PostgreSQL,
    /// MySQL) and each LISTEN uses one dedicated connection on top of this.
    pub max_connections: u32,
    /// How long to wait for a new database connection before counting it as a failure.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Apply the embedded migrations of the backend (reference outbox table, on PostgreSQL
    /// its NOTIFY trigger, outboxd's own tables) when `outboxd run` starts, as `outboxd
    /// migrate` does.
    pub migrate: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            url_file: None,
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            migrate: false,
        }
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `"host:9092,host2:9092"`. The value `"embedded"` starts librdkafka's
    /// in-process mock cluster: for trying outboxd out and for tests only, it keeps nothing.
    pub brokers: Option<String>,
    /// Raw librdkafka properties passed to every client (`security.protocol`, `sasl.*`,
    /// `ssl.*`, `compression.type`, `linger.ms`, `message.timeout.ms`, ...). Values may be
    /// strings, numbers or booleans. `enable.idempotence` and `acks` are fixed by outboxd
    /// (true, all) because the ordering and delivery guarantees rest on them.
    pub options: BTreeMap<String, OptionValue>,
    /// librdkafka properties for producers only (the relay, dead letters, `kafka`
    /// handlers, `dlq replay`), on top of `options`: `linger.ms`, `compression.type`,
    /// `message.timeout.ms`, ...
    pub producer_options: BTreeMap<String, OptionValue>,
    /// librdkafka properties for consumers only (the consumer half, `dlq replay`,
    /// `status`), on top of `options`: `session.timeout.ms`, `fetch.max.bytes`, ...
    /// Consumer properties in the shared table make the producer log a warning.
    pub consumer_options: BTreeMap<String, OptionValue>,
}

impl KafkaConfig {
    /// The properties for a producer: `options`, then `producer_options`.
    pub fn producer_properties(&self) -> impl Iterator<Item = (&String, &OptionValue)> {
        self.options.iter().chain(&self.producer_options)
    }

    /// The properties for a consumer: `options`, then `consumer_options`.
    pub fn consumer_properties(&self) -> impl Iterator<Item = (&String, &OptionValue)> {
        self.options.iter().chain(&self.consumer_options)
    }
}

/// A librdkafka property value; TOML numbers and booleans are accepted and passed on as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    /// A string, passed as is.
    Text(String),
    /// An integer such as `linger.ms = 5`.
    Int(i64),
    /// A float such as `batch.size.ratio = 0.5`.
    Float(f64),
    /// A boolean such as `enable.ssl.certificate.verification = false`.
    Bool(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Text(s) => f.write_str(s),
            OptionValue::Int(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the operations endpoint: `/metrics` (Prometheus text format), `/healthz`
    /// (the process answers) and `/readyz` (database and Kafka reachable, else 503).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter in `tracing` EnvFilter syntax, e.g. `"info"` or `"info,outboxd::relay=debug"`.
    pub level: String,
    /// `"text"` for humans, `"json"` for log shippers (one JSON object per line). Lines of
    /// the relay carry the table and lane they are about as spans (`table{table=outbox}:
    /// lane{lane=0}:` in text; `span` and `spans` in JSON).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The consumer's topics and their dead-letter topics (created up front by the embedded
    /// broker).
    pub fn consumed_topics(&self) -> Vec<String> {
        let Some(c) = &self.consumer else {
            return Vec::new();
        };
        c.topics
            .iter()
            .flat_map(|t| [t.clone(), c.dead_letter_topic.replace("{topic}", t)])
            .collect()
    }

    /// Whether relay tables or a `sql` handler need `[database]`.
    pub fn needs_database(&self) -> bool {
        !self.relay.tables.is_empty()
            || self
                .handlers
                .values()
                .any(|h| matches!(h, HandlerConfig::Sql(_)))
    }

    /// The configuration with every secret replaced by `"<redacted>"`, for printing and logs.
    pub fn redacted(&self) -> Config {
        redact::redacted(self)
    }

    /// The secret values in the configuration (passwords, tokens, secret options, headers
    /// and variables), for scrubbing text that leaves the process.
    pub fn secret_values(&self) -> Vec<String> {
        redact::secret_values(self)
    }
}
