//! `[consumer]`, `[consumer.retry]` and `[[consumer.routes]]`: which topics are read, where
//! each message goes, how failures are retried and dead-lettered.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[consumer]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Kafka consumer group; committed offsets belong to it. Required.
    pub group_id: String,
    /// Topics to read, exact names. Required.
    pub topics: Vec<String>,
    /// Where messages that cannot be handled go; `{topic}` is the original topic.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Header names of dead letters: `"outboxd"`, `"spring"` (`kafka_dlt-*`, read by Spring
    /// Kafka) or `"connect"` (`__connect.errors.*`, as Kafka Connect writes them).
    #[serde(default)]
    pub dead_letter_headers: DeadLetterDialect,
    /// What happens to a message no route matches: `"dead_letter"` (class `unrouted`),
    /// `"skip"` (its offset is committed, it is logged), or `"fail"` (it holds its lane, the
    /// key or with `ordering = "partition"` the partition, until a restart with a route
    /// for it; the partition stops once its window is full; other partitions go on).
    #[serde(default)]
    pub unrouted: Unrouted,
    /// What is delivered one at a time: `"key"` (the messages of one key, in offset order;
    /// keys of a partition run side by side), `"partition"` (the messages of one
    /// partition, in offset order) or `"none"` (nothing waits for another message).
    #[serde(default)]
    pub ordering: Ordering,
    /// Handler calls running at the same time, over all partitions (a message sleeping in
    /// backoff does not count).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Messages of one partition fetched above its committed offset (final or not); when
    /// reached, the partition is not read further until its lowest open message is final.
    #[serde(default = "default_max_pending")]
    pub max_pending_per_partition: usize,
    /// Bytes of one partition's messages waiting or in delivery (keys, values and headers,
    /// and about 512 bytes of bookkeeping each); when reached, the partition is not read
    /// further until some are final. One message is always taken, whatever its size.
    #[serde(default = "default_max_pending_bytes")]
    pub max_pending_bytes_per_partition: usize,
    /// The most commit metadata the brokers accept (their `offset.metadata.max.bytes`); a
    /// map of final offsets that does not fit is left out of the commit.
    #[serde(default = "default_offset_metadata_max_bytes")]
    pub offset_metadata_max_bytes: usize,
    /// Default retry policy of every handler; `[handlers.NAME.retry]` overrides keys.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Default outage detection of every handler; `[handlers.NAME.outage]` overrides keys.
    #[serde(default)]
    pub outage: OutagePolicy,
    /// Routes, tried in order; the first match picks the handler.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

fn default_dead_letter_topic() -> String {
    "{topic}.dlq".into()
}

fn default_max_in_flight() -> usize {
    16
}

fn default_max_pending() -> usize {
    10_000
}

fn default_max_pending_bytes() -> usize {
    1 << 20
}

fn default_offset_metadata_max_bytes() -> usize {
    4096
}

/// What the consumer delivers one at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Per key, in offset order; messages without a key are one key of their own.
    #[default]
    Key,
    /// Per partition, in offset order.
    Partition,
    /// No order: every message is delivered as soon as a call is free.
    None,
}

/// `[[consumer.routes]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Topic name or glob (`*` any run of characters, `?` one character).
    pub topic: String,
    /// Matched against the message's `event-type` header when set.
    pub event_type: Option<String>,
    /// A handler named in `[handlers.NAME]`.
    pub handler: String,
}

/// Dead-letter header naming.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterDialect {
    /// `outboxd-dlt-*` headers (see the README).
    #[default]
    Outboxd,
    /// Spring Kafka's `kafka_dlt-*` headers (partition, offset and timestamp as big-endian
    /// binary numbers, as Spring writes them).
    Spring,
    /// Kafka Connect's `__connect.errors.*` headers.
    Connect,
}

/// Policy for messages no route matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unrouted {
    /// Park it on the dead-letter topic with class `unrouted`.
    #[default]
    DeadLetter,
    /// Commit past it.
    Skip,
    /// Hold its lane at it.
    Fail,
}

/// A complete retry policy: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Delay before the first retry (before jitter).
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Factor between consecutive delays (>= 1).
    pub multiplier: f64,
    /// Upper bound of one delay.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Handler calls in all, the first included; then the message is dead-lettered with
    /// class `retryable_exhausted`.
    pub max_attempts: u32,
    /// Time from the first call after which no retry starts; then dead-lettered.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            max_attempts: 8,
            max_elapsed: Duration::from_secs(600),
        }
    }
}

/// `[handlers.NAME.retry]`: any key left out comes from `[consumer.retry]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOverride {
    /// See [`RetryPolicy::initial`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub initial: Option<Duration>,
    /// See [`RetryPolicy::multiplier`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// See [`RetryPolicy::max_delay`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Duration>,
    /// See [`RetryPolicy::max_attempts`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// See [`RetryPolicy::max_elapsed`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_elapsed: Option<Duration>,
}

impl RetryOverride {
    /// This override applied over `base`.
    pub fn over(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            initial: self.initial.unwrap_or(base.initial),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            max_elapsed: self.max_elapsed.unwrap_or(base.max_elapsed),
        }
    }
}

/// `[consumer.outage]`: when a handler counts as *down* (its downstream failing for many
/// keys at once) rather than one message being poison, and how it is probed while down.
/// While a handler is down no call starts for it but one probe (a real waiting message) at
/// a time; failures then use up no message's retry budget, and nothing is dead-lettered for
/// the outage. The first call that succeeds brings it back, with its calls ramped up from
/// one to `max_in_flight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutagePolicy {
    /// Detect outages; `false` leaves every failure to the retry policy (each message
    /// retried on its own, then dead-lettered).
    pub enabled: bool,
    /// Retryable failures in a row (no call of the handler succeeding or answering for good
    /// between them) that make the handler down, ...
    pub failures: u32,
    /// ... when they came from at least this many different keys (with `ordering =
    /// "partition"`, partitions), so that a poison key, or a few, never does ...
    pub keys: u32,
    /// ... within this long (older failures are forgotten).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Time from going down to the first probe call; it doubles after each failed probe.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Upper bound of the probe interval.
    #[serde(with = "humantime_serde")]
    pub max_probe_interval: Duration,
}

impl Default for OutagePolicy {
    fn default() -> Self {
        OutagePolicy {
            enabled: true,
            failures: 10,
            keys: 3,
            window: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1),
            max_probe_interval: Duration::from_secs(30),
        }
    }
}

/// `[handlers.NAME.outage]`: any key left out comes from `[consumer.outage]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutageOverride {
    /// See [`OutagePolicy::enabled`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// See [`OutagePolicy::failures`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    /// See [`OutagePolicy::keys`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<u32>,
    /// See [`OutagePolicy::window`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// See [`OutagePolicy::probe_interval`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub probe_interval: Option<Duration>,
    /// See [`OutagePolicy::max_probe_interval`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_probe_interval: Option<Duration>,
}

impl OutageOverride {
    /// This override applied over `base`.
    pub fn over(&self, base: &OutagePolicy) -> OutagePolicy {
        OutagePolicy {
            enabled: self.enabled.unwrap_or(base.enabled),
            failures: self.failures.unwrap_or(base.failures),
            keys: self.keys.unwrap_or(base.keys),
            window: self.window.unwrap_or(base.window),
            probe_interval: self.probe_interval.unwrap_or(base.probe_interval),
            max_probe_interval: self.max_probe_interval.unwrap_or(base.max_probe_interval),
        }
    }
}
