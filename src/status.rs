//! `outboxd status`: per relay table the backlog, dead rows and lane owners; per consumer
//! partition the committed offset, high watermark and lag. Reads only.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::{Connection, Row};

use crate::config::Config;
use crate::relay::store::postgres::{self as pg, TableSql};

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
    /// Rows waiting to be published.
    pub pending: i64,
    /// Age of the oldest waiting row.
    pub oldest_pending_seconds: Option<f64>,
    /// Rows in `outboxd_dead_rows` for this table.
    pub dead_rows: i64,
    /// Configured lanes.
    pub lanes: u32,
    /// Who holds each owned lane.
    pub owners: Vec<LaneOwner>,
}

/// The session holding a lane.
#[derive(Debug, Serialize)]
pub struct LaneOwner {
    /// Lane number.
    pub lane: i64,
    /// Backend pid of the owning connection.
    pub pid: i32,
    /// Client address of the owner.
    pub client: Option<String>,
    /// Its `application_name`.
    pub application: String,
}

/// The consumer group.
#[derive(Debug, Serialize)]
pub struct GroupStatus {
    /// Group id.
    pub group: String,
    /// One entry per partition of every configured topic.
    pub partitions: Vec<PartitionStatus>,
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

/// Gathers the status (database and Kafka must answer).
pub async fn gather(config: &Config, bootstrap: &str) -> Result<Status, String> {
    let mut relay = Vec::new();
    if !config.relay.tables.is_empty() {
        let opts = crate::db::connect_options(&config.database)?;
        let mut conn = sqlx::postgres::PgConnection::connect_with(&opts)
            .await
            .map_err(|e| format!("database: {e}"))?;
        for t in &config.relay.tables {
            relay.push(table_status(&mut conn, t).await?);
        }
    }
    let consumer = match &config.consumer {
        Some(c) => {
            let (bootstrap, options) = (bootstrap.to_owned(), config.kafka.options.clone());
            let (group, topics) = (c.group_id.clone(), c.topics.clone());
            Some(
                tokio::task::spawn_blocking(move || {
                    group_status(&bootstrap, &options, &group, &topics)
                })
                .await
                .map_err(|e| e.to_string())??,
            )
        }
        None => None,
    };
    Ok(Status { relay, consumer })
}

async fn table_status(
    conn: &mut sqlx::postgres::PgConnection,
    t: &crate::config::TableConfig,
) -> Result<TableStatus, String> {
    let shape = pg::introspect(conn, t).await.map_err(|e| e.to_string())?;
    let sql = TableSql::new(t, &shape);
    let (pending, oldest) = pg::stats(&mut *conn, &sql)
        .await
        .map_err(|e| e.to_string())?;
    let dead_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outboxd_dead_rows WHERE source_table = $1")
            .bind(&t.table)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| format!("outboxd_dead_rows: {e} (run outboxd migrate)"))?;
    let (lane_class, _) = crate::relay::lanes::lock_classes(&t.table);
    let owners = sqlx::query(
        "SELECT l.objid::int8, a.pid, a.client_addr::text, a.application_name \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::int8::oid \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1",
    )
    .bind(i64::from(lane_class))
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| e.to_string())?
    .iter()
    .map(|r| LaneOwner {
        lane: r.get(0),
        pid: r.get(1),
        client: r.get(2),
        application: r.get(3),
    })
    .collect();
    Ok(TableStatus {
        table: t.table.clone(),
        pending,
        oldest_pending_seconds: oldest,
        dead_rows,
        lanes: t.lanes,
        owners,
    })
}

fn group_status(
    bootstrap: &str,
    options: &std::collections::BTreeMap<String, crate::config::OptionValue>,
    group: &str,
    topics: &[String],
) -> Result<GroupStatus, String> {
    let timeout = Duration::from_secs(10);
    let mut cfg = ClientConfig::new();
    for (k, v) in options {
        cfg.set(k, v.to_string());
    }
    let consumer: BaseConsumer = cfg
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("kafka: {e}"))?;
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("kafka metadata of {topic}: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition(topic, p.id());
        }
        let committed = consumer
            .committed_offsets(tpl.clone(), timeout)
            .map_err(|e| format!("committed offsets of {topic}: {e}"))?;
        for e in tpl.elements() {
            let (low, high) = consumer
                .fetch_watermarks(topic, e.partition(), timeout)
                .map_err(|err| format!("watermarks of {topic}/{}: {err}", e.partition()))?;
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
    })
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
                    .map(|o| {
                        format!(
                            "{}:pid {}@{}",
                            o.lane,
                            o.pid,
                            o.client.as_deref().unwrap_or("local")
                        )
                    })
                    .collect();
                let oldest = t
                    .oldest_pending_seconds
                    .map_or("-".into(), |s| format!("{s:.1}"));
                writeln!(
                    f,
                    "{:<32} {:>10} {:>12} {:>9} {:>3}/{:<3}  {}",
                    t.table,
                    t.pending,
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
        }
        Ok(())
    }
}
