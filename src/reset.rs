//! `outboxd consumer reset`: moves a consumer group's committed offsets on its topics to
//! their start, their end, or the first message at or after a time, so that a read model
//! can be rebuilt from its topics; and, when asked, forgets what `sql` handlers recorded in
//! `outboxd_inbox`, so that the events have their effect again.
//!
//! The group must have no other member: where the brokers describe groups, a group with
//! members is refused before anything else; then the reset joins the group itself and
//! goes on only if it was given every partition of the topics (another member would hold
//! some), commits the new offsets as that member, and leaves.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::{Config, HandlerConfig};
use crate::db::Database;

/// How long the reset waits to be given the group's partitions.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the offsets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The first message each partition still holds.
    Earliest,
    /// After the last message (only messages written later are read).
    Latest,
    /// The first message written at or after this time (the end where there is none).
    Time(SystemTime),
}

/// Parses `earliest`, `latest` or an RFC 3339 time.
pub fn parse_target(s: &str) -> Result<Target, String> {
    match s {
        "earliest" => Ok(Target::Earliest),
        "latest" => Ok(Target::Latest),
        _ => humantime::parse_rfc3339_weak(s)
            .map(Target::Time)
            .map_err(|_| {
                format!("`{s}` is not earliest, latest or an RFC 3339 time (2026-12-06T08:00:00Z)")
            }),
    }
}

/// `outboxd consumer reset`
#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The consumer group (default: `consumer.group_id`).
    #[arg(long)]
    pub group: Option<String>,
    /// `earliest`, `latest`, or an RFC 3339 time (the first message at or after it).
    #[arg(long, value_parser = parse_target)]
    pub to: Target,
    /// A topic to reset (repeatable; default: `consumer.topics`).
    #[arg(long)]
    pub topic: Vec<String>,
    /// Also delete what this `sql` handler recorded in `outboxd_inbox` (repeatable), so
    /// that the events have their effect again: for a read model rebuilt from scratch.
    #[arg(long = "clear-inbox")]
    pub clear_inbox: Vec<String>,
}

/// What to reset.
#[derive(Debug, Clone)]
pub struct Reset {
    /// The consumer group.
    pub group: String,
    /// Its topics.
    pub topics: Vec<String>,
    /// Where the offsets go.
    pub to: Target,
    /// `sql` handlers whose inbox entries are deleted.
    pub clear_inbox: Vec<String>,
}

impl Reset {
    /// The reset `args` ask for, the group and topics defaulting to `[consumer]`'s.
    pub fn new(config: &Config, args: ResetArgs) -> Result<Self, String> {
        let consumer = config.consumer.as_ref();
        let group = args
            .group
            .or_else(|| consumer.map(|c| c.group_id.clone()))
            .unwrap_or_default();
        let topics = match args.topic.is_empty() {
            true => consumer.map(|c| c.topics.clone()).unwrap_or_default(),
            false => args.topic,
        };
        if group.is_empty() || topics.is_empty() {
            return Err("consumer reset needs a group and topics: [consumer] in the configuration, or --group and --topic".into());
        }
        Ok(Reset {
            group,
            topics,
            to: args.to,
            clear_inbox: args.clear_inbox,
        })
    }
}

/// Why a reset did not happen, or happened in part.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// A Kafka call failed.
    #[error("{what}")]
    Kafka {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: KafkaError,
    },
    /// The brokers describe the group with members.
    #[error("consumer group {group} has {members} active member(s); stop its consumers first")]
    Active {
        /// The group.
        group: String,
        /// How many members it has.
        members: usize,
    },
    /// Another member holds some of the partitions.
    #[error("consumer group {group} has another member, which holds {held} of the {all} partitions; stop its consumers first")]
    Held {
        /// The group.
        group: String,
        /// Partitions not given to the reset.
        held: usize,
        /// Partitions of the topics.
        all: usize,
    },
    /// A topic does not exist.
    #[error("topic {0} does not exist")]
    NoTopic(String),
    /// A name given to `--clear-inbox` is no `sql` handler of the configuration.
    #[error("--clear-inbox {0}: no sql handler of that name in the configuration")]
    NotSqlHandler(String),
    /// The offsets moved, but the database could not be opened to clear the inbox.
    #[error("the offsets were reset, but the database could not be opened to clear the inbox")]
    Database(#[source] crate::db::OpenError),
    /// The offsets moved, but the inbox could not be cleared.
    #[error("the offsets were reset, but clearing the inbox of {handler} failed")]
    Inbox {
        /// The handler.
        handler: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> ResetError {
    let what = what.into();
    move |source| ResetError::Kafka { what, source }
}

/// One partition's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset committed before, if any.
    pub from: Option<i64>,
    /// The offset committed now.
    pub to: i64,
}

/// What a reset did.
#[derive(Debug, Default)]
pub struct Report {
    /// Each partition's offsets.
    pub moved: Vec<Moved>,
    /// Inbox entries deleted, by handler.
    pub cleared: Vec<(String, u64)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for m in &self.moved {
            let from = m.from.map_or("none".to_owned(), |o| o.to_string());
            writeln!(f, "{} [{}]: {from} -> {}", m.topic, m.partition, m.to)?;
        }
        for (handler, n) in &self.cleared {
            writeln!(f, "inbox of {handler}: {n} entries deleted")?;
        }
        Ok(())
    }
}

/// Runs a reset (blocking for its Kafka part: call from a blocking thread or outside a
/// runtime; the inbox is cleared on `runtime`).
pub fn run(
    config: &Config,
    bootstrap: &str,
    r: &Reset,
    runtime: &tokio::runtime::Runtime,
) -> Result<Report, ResetError> {
    for name in &r.clear_inbox {
        if !matches!(config.handlers.get(name), Some(HandlerConfig::Sql(_))) {
            return Err(ResetError::NotSqlHandler(name.clone()));
        }
    }
    let moved = offsets(config, bootstrap, r)?;
    let mut report = Report {
        moved,
        cleared: Vec::new(),
    };
    if !r.clear_inbox.is_empty() {
        report.cleared = runtime.block_on(clear_inbox(config, &r.clear_inbox))?;
    }
    Ok(report)
}

fn offsets(config: &Config, bootstrap: &str, r: &Reset) -> Result<Vec<Moved>, ResetError> {
    let timeout = Duration::from_secs(10);
    let mut client = ClientConfig::new();
    for (k, v) in config.kafka.consumer_properties() {
        client.set(k, v.to_string());
    }
    // A static member's id would make the reset take a running member's place.
    client.remove("group.instance.id");
    let consumer: BaseConsumer = client
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &r.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(kafka("kafka consumer"))?;
    // Brokers that do not describe groups (librdkafka's mock cluster) answer with an
    // error: the join below still finds another member.
    if let Ok(groups) = consumer.fetch_group_list(Some(&r.group), timeout) {
        if let Some(g) = groups.groups().iter().find(|g| g.name() == r.group) {
            if !g.members().is_empty() {
                return Err(ResetError::Active {
                    group: r.group.clone(),
                    members: g.members().len(),
                });
            }
        }
    }
    let mut all = BTreeSet::new();
    for topic in &r.topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(kafka(format!("metadata of {topic}")))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(ResetError::NoTopic(topic.clone()));
        }
        all.extend(partitions.into_iter().map(|p| (topic.clone(), p)));
    }
    let topics: Vec<&str> = r.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(kafka("joining the group"))?;
    let given = given_partitions(&consumer)?;
    if given != all {
        return Err(ResetError::Held {
            group: r.group.clone(),
            held: all.difference(&given).count(),
            all: all.len(),
        });
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition) in &all {
        list.add_partition(topic, *partition);
    }
    let before = consumer
        .committed_offsets(list.clone(), timeout)
        .map_err(kafka("committed offsets"))?;
    let targets = targets(&consumer, &all, r.to, timeout)?;
    let mut commit = TopicPartitionList::new();
    let mut moved = Vec::new();
    for ((topic, partition), to) in all.iter().zip(targets) {
        commit
            .add_partition_offset(topic, *partition, Offset::Offset(to))
            .map_err(kafka("offsets"))?;
        let from = before
            .find_partition(topic, *partition)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0);
        moved.push(Moved {
            topic: topic.clone(),
            partition: *partition,
            from,
            to,
        });
    }
    consumer
        .commit(&commit, CommitMode::Sync)
        .map_err(kafka("committing the new offsets"))?;
    consumer.unsubscribe();
    Ok(moved)
}

/// Polls until the group gave this consumer its partitions.
fn given_partitions(consumer: &BaseConsumer) -> Result<BTreeSet<(String, i32)>, ResetError> {
    let started = Instant::now();
    while started.elapsed() < JOIN_TIMEOUT {
        // Messages fetched meanwhile are not handled; nothing is committed for them.
        let _ = consumer.poll(Duration::from_millis(100));
        let assignment = consumer.assignment().map_err(kafka("assignment"))?;
        if assignment.count() > 0 {
            return Ok(assignment
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect());
        }
    }
    Err(ResetError::Kafka {
        what: format!("joining the group: no partition given within {JOIN_TIMEOUT:?}"),
        source: KafkaError::Global(rdkafka::types::RDKafkaErrorCode::OperationTimedOut),
    })
}

/// Each partition's new offset, in the order of `all`.
fn targets(
    consumer: &BaseConsumer,
    all: &BTreeSet<(String, i32)>,
    to: Target,
    timeout: Duration,
) -> Result<Vec<i64>, ResetError> {
    let mut offsets = Vec::new();
    let times = match to {
        Target::Time(at) => {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64;
            let mut query = TopicPartitionList::new();
            for (topic, partition) in all {
                query
                    .add_partition_offset(topic, *partition, Offset::Offset(ms))
                    .map_err(kafka("offsets"))?;
            }
            Some(
                consumer
                    .offsets_for_times(query, timeout)
                    .map_err(kafka("offsets for the time"))?,
            )
        }
        _ => None,
    };
    for (topic, partition) in all {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, timeout)
            .map_err(kafka(format!("watermarks of {topic} [{partition}]")))?;
        offsets.push(match to {
            Target::Earliest => low,
            Target::Latest => high,
            // No message at or after the time: the end.
            Target::Time(_) => times
                .as_ref()
                .and_then(|t| t.find_partition(topic, *partition))
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(high),
        });
    }
    Ok(offsets)
}

/// Deletes the inbox entries of `handlers`; how many each had.
async fn clear_inbox(
    config: &Config,
    handlers: &[String],
) -> Result<Vec<(String, u64)>, ResetError> {
    let inbox = |handler: &str, source| ResetError::Inbox {
        handler: handler.to_owned(),
        source,
    };
    let database = Database::open(&config.database).map_err(ResetError::Database)?;
    let mut cleared = Vec::new();
    for handler in handlers {
        let deleted = match &database {
            Database::Postgres { pool, .. } => {
                sqlx::query("DELETE FROM outboxd_inbox WHERE handler = $1")
                    .bind(handler)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            }
            Database::MySql { pool, .. } => {
                sqlx::query("DELETE FROM outboxd_inbox WHERE handler = ?")
                    .bind(handler)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            }
            Database::Sqlite { pool, .. } => {
                sqlx::query("DELETE FROM outboxd_inbox WHERE handler = ?")
                    .bind(handler)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            }
        };
        cleared.push((handler.clone(), deleted.map_err(|e| inbox(handler, e))?));
    }
    database.close().await;
    Ok(cleared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("earliest"), Ok(Target::Earliest));
        assert_eq!(parse_target("latest"), Ok(Target::Latest));
        assert_eq!(
            parse_target("2026-12-06T08:00:00Z"),
            Ok(Target::Time(
                UNIX_EPOCH + Duration::from_secs(1_796_544_000)
            ))
        );
        assert!(parse_target("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
