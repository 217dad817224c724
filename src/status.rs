//! `outboxd status`: per relay table the backlog, dead rows and lane owners; per consumer
//! partition the committed offset, high watermark and lag; which handlers of the outboxd
//! running here are down. Reads only.

use std::time::Duration;

use crate::config::{Capture, Config};
use crate::db::Database;
use crate::relay::store::{self, LaneOwner, StoreError};
use crate::relay::wal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// One entry per `[[relay.tables]]`.
    pub relay: Vec<TableStatus>,
    /// The consumer group, when `[consumer]` is configured.
    pub consumer: Option<GroupStatus>,
}

/// One outbox table.
#[derive(Debug, Serialize)]
pub struct TableStatus {
    /// Table name.
    pub table: String,
    /// Rows waiting to be published (none for a WAL table: see `slot_lag_bytes`).
    pub pending: Option<i64>,
    /// Age of the oldest waiting row.
    pub oldest_pending_seconds: Option<f64>,
    /// Rows in `outboxd_dead_rows` for this table.
    pub dead_rows: i64,
    /// Configured lanes.
    pub lanes: u32,
    /// Who holds each owned lane (a WAL table: the session reading its slot, as lane 0).
    pub owners: Vec<LaneOwner>,
    /// A WAL table: bytes of WAL between the server's position and its slot's confirmed
    /// one (none while the slot does not exist).
    pub slot_lag_bytes: Option<i64>,
}

/// The consumer group.
#[derive(Debug, Serialize)]
pub struct GroupStatus {
    /// Group id.
    pub group: String,
    /// One entry per partition of every configured topic.
    pub partitions: Vec<PartitionStatus>,
    /// The handlers of the outboxd that serves `http.listen` on this host, as its
    /// `/metrics` tells; None when none answers there.
    pub handlers: Option<Vec<HandlerStatus>>,
}

/// One handler of the running process.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct HandlerStatus {
    /// `[handlers.NAME]`, or `-` for the dead-letter producer.
    pub handler: String,
    /// Down: its downstream fails for many keys at once; only probed.
    pub down: bool,
}

/// One partition.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (the next message it will read), if any.
    pub committed: Option<i64>,
    /// The offset after the last message in the partition.
    pub high_watermark: i64,
    /// Messages not yet committed by the group.
    pub lag: i64,
}

/// Why the status could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// `database.url` cannot be used.
    #[error(transparent)]
    Open(#[from] crate::db::OpenError),
    /// A table could not be read.
    #[error("relay.tables `{table}`")]
    Table {
        /// The table.
        table: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A WAL table's slot could not be read.
    #[error("relay.tables `{table}`: its replication slot")]
    Slot {
        /// The table.
        table: String,
        /// Why.
        #[source]
        source: crate::relay::wal::WalError,
    },
    /// The dead-row table could not be read.
    #[error("outboxd_dead_rows (run outboxd migrate)")]
    DeadRows(#[source] StoreError),
    /// Kafka did not answer `what`.
    #[error("kafka: {what}")]
    Kafka {
        /// What was asked.
        what: String,
        /// Why it failed.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The task asking Kafka ended abnormally.
    #[error("kafka status task")]
    Task(#[source] tokio::task::JoinError),
}

/// Gathers the status (database and Kafka must answer).
pub async fn gather(config: &Config, bootstrap: &str) -> Result<Status, StatusError> {
    let mut relay = Vec::new();
    if !config.relay.tables.is_empty() {
        let db = Database::open(&config.database)?;
        for t in &config.relay.tables {
            let status = table_status(&db, t).await;
            if status.is_err() {
                db.close().await;
            }
            relay.push(status?);
        }
        db.close().await;
    }
    let consumer = match &config.consumer {
        Some(c) => {
            let (bootstrap, kafka) = (bootstrap.to_owned(), config.kafka.clone());
            let (group, topics) = (c.group_id.clone(), c.topics.clone());
            let mut status = tokio::task::spawn_blocking(move || {
                group_status(&bootstrap, &kafka, &group, &topics)
            })
            .await
            .map_err(StatusError::Task)??;
            status.handlers = running_handlers(config.http.listen).await;
            Some(status)
        }
        None => None,
    };
    Ok(Status { relay, consumer })
}

async fn table_status(
    db: &Database,
    t: &crate::config::TableConfig,
) -> Result<TableStatus, StatusError> {
    let failed = |source| StatusError::Table {
        table: t.table.clone(),
        source,
    };
    if let (Capture::Wal, Database::Postgres { pool, .. }) = (t.capture, db) {
        let slot = wal::admin::status(pool, t)
            .await
            .map_err(|e| StatusError::Slot {
                table: t.table.clone(),
                source: e,
            })?;
        return Ok(TableStatus {
            table: t.table.clone(),
            pending: None,
            oldest_pending_seconds: None,
            dead_rows: slot.dead_rows,
            lanes: t.lanes,
            owners: slot.reader.into_iter().collect(),
            slot_lag_bytes: slot.lag_bytes,
        });
    }
    let table = store::open(db, t).await.map_err(failed)?;
    let (pending, oldest) = table.stats().await.map_err(failed)?;
    let dead_rows = table.dead_rows().await.map_err(StatusError::DeadRows)?;
    let owners = table.lane_owners().await.map_err(failed)?;
    Ok(TableStatus {
        table: t.table.clone(),
        pending: Some(pending),
        oldest_pending_seconds: oldest,
        dead_rows,
        lanes: t.lanes,
        owners,
        slot_lag_bytes: None,
    })
}

fn group_status(
    bootstrap: &str,
    kafka: &crate::config::KafkaConfig,
    group: &str,
    topics: &[String],
) -> Result<GroupStatus, StatusError> {
    let kafka_failed = |what: String| move |source| StatusError::Kafka { what, source };
    let timeout = Duration::from_secs(10);
    let mut cfg = ClientConfig::new();
    for (k, v) in kafka.consumer_properties() {
        cfg.set(k, v.to_string());
    }
    let consumer: BaseConsumer = cfg
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kafka_failed("consumer client".into()))?;
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(kafka_failed(format!("metadata of {topic}")))?;
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition(topic, p.id());
        }
        let committed = consumer
            .committed_offsets(tpl.clone(), timeout)
            .map_err(kafka_failed(format!("committed offsets of {topic}")))?;
        for e in tpl.elements() {
            let (low, high) = consumer
                .fetch_watermarks(topic, e.partition(), timeout)
                .map_err(kafka_failed(format!(
                    "watermarks of {topic}/{}",
                    e.partition()
                )))?;
            let committed = committed
                .find_partition(topic, e.partition())
                .and_then(|c| match c.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            partitions.push(PartitionStatus {
                topic: topic.clone(),
                partition: e.partition(),
                committed,
                high_watermark: high,
                lag: high - committed.unwrap_or(low),
            });
        }
    }
    Ok(GroupStatus {
        group: group.to_owned(),
        partitions,
        handlers: None,
    })
}

/// Which handlers of the outboxd listening on `listen` are down, from its `/metrics`.
async fn running_handlers(mut listen: std::net::SocketAddr) -> Option<Vec<HandlerStatus>> {
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(handlers_down(&response.text().await.ok()?))
}

/// The `outboxd_consumer_handler_down` samples of a Prometheus text exposition.
fn handlers_down(metrics: &str) -> Vec<HandlerStatus> {
    let mut out: Vec<HandlerStatus> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("outboxd_consumer_handler_down{")?;
            let (labels, value) = rest.split_once('}')?;
            let handler = labels.split_once("handler=\"")?.1.split_once('"')?.0;
            let value: f64 = value.trim().parse().ok()?;
            Some(HandlerStatus {
                handler: handler.to_owned(),
                down: value > 0.0,
            })
        })
        .collect();
    out.sort_by(|a, b| a.handler.cmp(&b.handler));
    out
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.relay.is_empty() {
            writeln!(
                f,
                "{:<32} {:>10} {:>12} {:>9} {:>7}  owners",
                "relay table", "pending", "oldest (s)", "dead", "lanes"
            )?;
            for t in &self.relay {
                let owners: Vec<String> = t
                    .owners
                    .iter()
                    .map(|o| match o.pid {
                        Some(pid) => format!(
                            "{}:pid {pid}@{}",
                            o.lane,
                            o.client.as_deref().unwrap_or("local")
                        ),
                        None => format!("{}:held", o.lane),
                    })
                    .collect();
                let oldest = t
                    .oldest_pending_seconds
                    .map_or("-".into(), |s| format!("{s:.1}"));
                let pending = match (t.pending, t.slot_lag_bytes) {
                    (Some(rows), _) => rows.to_string(),
                    (None, Some(lag)) => format!("{lag} B wal"),
                    (None, None) => "no slot".to_owned(),
                };
                writeln!(
                    f,
                    "{:<32} {:>10} {:>12} {:>9} {:>3}/{:<3}  {}",
                    t.table,
                    pending,
                    oldest,
                    t.dead_rows,
                    t.owners.len(),
                    t.lanes,
                    if owners.is_empty() {
                        "none".to_owned()
                    } else {
                        owners.join(", ")
                    }
                )?;
            }
        }
        if let Some(g) = &self.consumer {
            if !self.relay.is_empty() {
                writeln!(f)?;
            }
            writeln!(f, "consumer group {}", g.group)?;
            writeln!(
                f,
                "{:<40} {:>9} {:>12} {:>14} {:>10}",
                "topic", "partition", "committed", "high watermark", "lag"
            )?;
            for p in &g.partitions {
                let committed = p.committed.map_or("-".into(), |c| c.to_string());
                writeln!(
                    f,
                    "{:<40} {:>9} {:>12} {:>14} {:>10}",
                    p.topic, p.partition, committed, p.high_watermark, p.lag
                )?;
            }
            match &g.handlers {
                None => writeln!(f, "handlers: no outboxd answers at http.listen here")?,
                Some(handlers) => {
                    writeln!(f, "{:<40} state", "handler")?;
                    for h in handlers {
                        let name = match h.handler.as_str() {
                            "-" => "(dead-letter producer)",
                            name => name,
                        };
                        let state = if h.down {
                            "down: only probed; its messages wait"
                        } else {
                            "up"
                        };
                        writeln!(f, "{name:<40} {state}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_down_are_read_from_the_metrics() {
        let text = "# HELP outboxd_consumer_handler_down 1 while down\n\
            outboxd_consumer_handler_down{handler=\"web\"} 1\n\
            outboxd_consumer_handler_down{handler=\"-\"} 0\n\
            outboxd_consumer_in_flight{handler=\"web\"} 3\n";
        assert_eq!(
            handlers_down(text),
            vec![
                HandlerStatus {
                    handler: "-".into(),
                    down: false
                },
                HandlerStatus {
                    handler: "web".into(),
                    down: true
                },
            ]
        );
    }
}
