//! `[relay]` and `[[relay.tables]]`: which outbox tables are published, and how their
//! columns map onto Kafka messages.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::column::{self, Column};

/// `[relay]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// One entry per outbox table to publish; tables are relayed independently.
    pub tables: Vec<TableConfig>,
}

/// `[[relay.tables]]`: one outbox table. Column names are used exactly as written (they are
/// quoted in SQL, so they are case-sensitive); an empty string turns an optional column off
/// (`""` is no name for a required one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// The outbox table, optionally schema-qualified (`"app.outbox"`; on MySQL the schema is
    /// the database, on SQLite an attached database). Required.
    pub table: String,
    /// Topic template over column names of this mapping, e.g. `"events.{event_type}"` or
    /// `"{aggregate_type}.events"`. Exactly one of `topic` and `topic_column` must be set.
    /// A template without columns is one topic for every row, checked against Kafka's
    /// topic name rules at start-up.
    pub topic: Option<String>,
    /// A column whose value is the topic name. Exactly one of `topic` and `topic_column`.
    pub topic_column: Option<Column>,
    /// Globs (`*` any run, `?` one character) the topic a row renders must match, else
    /// the row goes to the dead rows with the reason: rows name topics, and must not reach
    /// a consumer's dead-letter topic or another service's. Required with `topic_column`
    /// and with a template that starts with a column (`"{aggregate_type}.events"`); a
    /// template with a literal start (`"events.{event_type}"`) defaults to that start
    /// followed by `*` (`["events.*"]`).
    pub allowed_topics: Vec<String>,
    /// The column used as the Kafka message key: the aggregate id. Kafka sends equal keys to
    /// one partition, which is what keeps events of one aggregate in order. A row whose key
    /// is NULL is moved to the dead-row table.
    pub key_column: Column,
    /// The primary key column. Any type that casts to and from text (bigint, uuid, text).
    /// On MySQL it should be indexed (the reference table's primary key is): claims and
    /// deletes find rows by it.
    pub id_column: Column,
    /// The column that orders rows (publication order). Defaults to `id_column`; set it when
    /// the id is not monotonic, e.g. a uuid id with a separate bigserial sequence column.
    pub order_column: Option<Column>,
    /// Cursor mode on PostgreSQL: a column holding the id of the transaction that wrote the
    /// row (`xid8 DEFAULT pg_current_xact_id()`), indexed together with the order column
    /// (`CREATE INDEX ... (xid_column, order_column)`). Claims then read an index range
    /// after the lane's position instead of the whole table, with the same fence on
    /// transactions still running. Rows written before the column existed (NULL) are
    /// still published, in the order of the transactions that wrote them. Unset: claims
    /// read the whole table, which suits tables of up to a few hundred thousand rows.
    #[serde(with = "column::optional")]
    pub xid_column: Option<Column>,
    /// Stable event id, sent as the `event-id` header so consumers can deduplicate.
    /// Empty: the `id_column` value is sent instead.
    #[serde(with = "column::optional")]
    pub event_id_column: Option<Column>,
    /// The message value. `jsonb`, `json` and text columns are sent as their UTF-8 text,
    /// `bytea` (PostgreSQL), `BLOB`/`VARBINARY` (MySQL) and BLOB values (SQLite) as raw
    /// bytes. A row whose payload is NULL is moved to the dead-row table.
    pub payload_column: Column,
    /// A JSON object column; each entry becomes a Kafka header (strings as they are, other
    /// values as JSON text), including `traceparent`/`tracestate` for W3C trace context.
    /// Empty: no extra headers.
    #[serde(with = "column::optional")]
    pub headers_column: Option<Column>,
    /// Sent as the `event-type` header. Empty: no such header.
    #[serde(with = "column::optional")]
    pub event_type_column: Option<Column>,
    /// Sent as the `aggregate-type` header. Empty: no such header.
    #[serde(with = "column::optional")]
    pub aggregate_type_column: Option<Column>,
    /// Row creation time, used for `outboxd_relay_publish_delay_seconds` and
    /// `outboxd_relay_oldest_pending_seconds`: a time column, or a number of Unix epoch
    /// seconds or milliseconds (integer or floating). A number above 100,000,000,000 is
    /// read as milliseconds (as seconds it would be after the year 5000), any other as
    /// seconds. On SQLite text is read as an ISO 8601 time (the reference table writes UTC
    /// ISO 8601). Empty: those metrics stay empty.
    #[serde(with = "column::optional")]
    pub created_at_column: Option<Column>,
    /// Rows claimed, published and deleted per transaction. On PostgreSQL (integer order
    /// column) they are claimed 1,000 at a time, each chunk published while the next is
    /// claimed; the transaction commits once all of them are acknowledged.
    pub batch_size: u32,
    /// While a full batch is sent and acknowledged, claim the next one on a second
    /// connection (in the first one's snapshot, right after its rows), so the database work
    /// of one batch overlaps the sending of and the wait for the previous one. The next batch
    /// is sent only after the previous one committed, and rolled back if it failed, so order
    /// and the failure handling are as without it. When a batch that did not fill waits
    /// for Kafka twice as long as such batches usually take, the same connection claims
    /// the rows committed meanwhile whose keys that batch does not hold, up to the rest of
    /// `batch_size`, and sends them at once: a slow acknowledgement then no longer holds
    /// up every row committed while it is awaited. Each lane
    /// then uses two connections. PostgreSQL only, and not in cursor mode: MySQL and SQLite
    /// lanes, and cursor-mode lanes, always claim one batch at a time.
    pub prefetch: bool,
    /// How often an idle lane looks for rows when no NOTIFY arrives (notifications are lost
    /// while the LISTEN connection is down, and tables without the trigger never send one).
    /// On MySQL and SQLite, which have no notifications, this is the wake-up latency.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// LISTEN channel fed by the `outboxd_notify` trigger. Empty string: polling only.
    /// PostgreSQL only: with MySQL or SQLite the default is ignored and any other value is
    /// a configuration error.
    #[serde(with = "column::optional")]
    pub notify_channel: Option<String>,
    /// Number of lanes the table is split into by key hash (`hashtext(key)` on PostgreSQL,
    /// `CRC32(key)` on MySQL). Each lane is owned by exactly one running outboxd (an advisory
    /// lock on PostgreSQL, `GET_LOCK` on MySQL), so `lanes = 1` is leader election with hot
    /// standbys and more lanes spread one table over replicas while keeping per-key order.
    /// SQLite has one writer: `lanes` must be 1, owned through a lock on the database file
    /// itself (one lock byte per table), which every path to the file meets.
    pub lanes: u32,
    /// How often lane ownership is reconsidered: free lanes are taken, and a replica holding
    /// more than its fair share hands the surplus back when others have joined.
    #[serde(with = "humantime_serde")]
    pub rebalance_interval: Duration,
    /// What happens to a published row: `"delete"` it, `"mark"` it by setting
    /// `published_column`, or nothing (`"cursor"`: for append-only tables; each lane keeps
    /// its position in `outboxd_relay_cursors`, advanced in the transaction that records
    /// the batch as published). Cursor mode needs an integer `order_column` the database
    /// assigns (a sequence, or SQLite's `INTEGER PRIMARY KEY`) and is refused on MySQL.
    pub on_published: OnPublished,
    /// How rows are read: `"poll"` (claims on the table, as `on_published` says) or
    /// `"wal"` (PostgreSQL only: inserts are read from the write-ahead log through logical
    /// replication, in commit order, without scanning or changing the table; see
    /// `[relay.tables.wal]`). With `"wal"`, `on_published` has no effect and `"mark"` is
    /// refused.
    pub capture: Capture,
    /// `[relay.tables.wal]`: the replication slot and publication of `capture = "wal"`.
    pub wal: WalConfig,
    /// The column set in `mark` mode: a time column (set to the current time; the row is
    /// pending while it is NULL) or a boolean column (set to true; pending while false or
    /// NULL). Also accepted under its former name `published_at_column`.
    #[serde(alias = "published_at_column")]
    pub published_column: Column,
    /// In `mark` mode with a time column, how long published rows are kept before the
    /// purge removes them; boolean marks carry no time, so those rows are never purged.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the maintenance task runs: retention purge (mark mode), backlog gauges,
    /// cleanup of attempt counters.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// A row Kafka refuses for good (too large, invalid topic, unknown topic) is retried this
    /// many times, then moved to `outboxd_dead_rows` with the reason; rows of other keys keep
    /// flowing meanwhile, later rows of the same key wait behind it.
    pub max_attempts: u32,
    /// The names of the headers outboxd adds to every message.
    pub header_names: HeaderNames,
    /// Further columns sent as headers, by header name: `{ tenant = "tenant_id" }`. Each
    /// value is sent as text (a string as it is, any other value as its JSON text); a
    /// NULL value sends no header.
    pub header_columns: BTreeMap<String, Column>,
    /// What a row whose payload is NULL becomes: a `"dead_row"` (moved to the dead rows
    /// with the reason) or a `"tombstone"` (a message with the key and no value, which
    /// deletes the key from a compacted topic).
    pub null_payload: NullPayload,
}

/// `[relay.tables.header_names]`: the names of the headers outboxd adds. Debezium's outbox
/// event router sends the event id as `id`: `event_id = "id"` keeps its consumers working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    /// The event id (`event_id_column`, else the id column).
    pub event_id: String,
    /// The event type (`event_type_column`), when mapped. Empty: not sent (the column
    /// may still be used in the topic template).
    pub event_type: String,
    /// The aggregate type (`aggregate_type_column`), when mapped. Empty: not sent (the
    /// column may still be used in the topic template).
    pub aggregate_type: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            event_id: "event-id".into(),
            event_type: "event-type".into(),
            aggregate_type: "aggregate-type".into(),
        }
    }
}

/// What a row with a NULL payload becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NullPayload {
    /// A dead row, with the reason (the default).
    #[default]
    DeadRow,
    /// A message with the key and no value.
    Tombstone,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            table: String::new(),
            topic: None,
            topic_column: None,
            allowed_topics: Vec::new(),
            key_column: known("aggregate_id"),
            id_column: known("id"),
            order_column: None,
            xid_column: None,
            event_id_column: Some(known("event_id")),
            payload_column: known("payload"),
            headers_column: Some(known("headers")),
            event_type_column: Some(known("event_type")),
            aggregate_type_column: Some(known("aggregate_type")),
            created_at_column: Some(known("created_at")),
            batch_size: 1000,
            prefetch: true,
            poll_interval: Duration::from_millis(500),
            notify_channel: Some("outboxd".into()),
            lanes: 1,
            rebalance_interval: Duration::from_secs(5),
            on_published: OnPublished::Delete,
            capture: Capture::Poll,
            wal: WalConfig::default(),
            published_column: known("published_at"),
            retention: Duration::from_secs(7 * 24 * 3600),
            maintenance_interval: Duration::from_secs(10),
            max_attempts: 10,
            header_names: HeaderNames::default(),
            header_columns: BTreeMap::new(),
            null_payload: NullPayload::DeadRow,
        }
    }
}

impl TableConfig {
    /// The column rows are published in order of.
    pub fn order_column(&self) -> &Column {
        self.order_column.as_ref().unwrap_or(&self.id_column)
    }

    /// The columns a topic template may name: every column of this mapping that is set.
    pub fn mapped_columns(&self) -> Vec<&str> {
        [Some(&self.id_column), Some(&self.key_column)]
            .into_iter()
            .chain([
                self.event_id_column.as_ref(),
                self.event_type_column.as_ref(),
                self.aggregate_type_column.as_ref(),
            ])
            .flatten()
            .map(Column::as_str)
            .collect()
    }
}

/// A column name of the defaults.
fn known(name: &str) -> Column {
    Column::new(name).expect("default column names are not empty")
}

/// How a table's rows are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// Lanes claim rows with SQL (the default).
    #[default]
    Poll,
    /// Inserts are read from PostgreSQL's write-ahead log (logical replication, `pgoutput`).
    Wal,
}

/// `[relay.tables.wal]`: where `capture = "wal"` reads from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// The logical replication slot (`pgoutput`). Created when missing, together with the
    /// initial snapshot `snapshot` asks for; a slot a DBA created is used as it is (no
    /// snapshot). Lower-case letters, digits and `_`, at most 63. Default:
    /// `outboxd_<table>` (the table name's schema dot as `_`).
    pub slot: Option<String>,
    /// The publication the slot streams. Created `FOR TABLE <table> WITH (publish =
    /// 'insert')` when missing; an existing one is used as it is (it must include the
    /// table). Default: the slot's name.
    pub publication: Option<String>,
    /// When outboxd creates the slot: `"all"` publishes every row already in the table
    /// (read in the slot's exported snapshot, so the switch to the stream neither skips
    /// nor repeats a row), then the stream; `"new"` only rows committed after the slot.
    pub snapshot: Snapshot,
    /// Logical decoding messages written with `pg_logical_emit_message(true, '<prefix>',
    /// content)` under this prefix are relayed too, as rows of this mapping: the content
    /// is a JSON object whose fields are named like the mapped columns (`aggregate_id`,
    /// `event_type`, `payload`, ...; a string field is sent as it is, any other value as
    /// its JSON text). Without an id field the message's WAL position is its id. Unset:
    /// messages are ignored.
    pub message_prefix: Option<String>,
    /// Relay the table's inserts. `false`: only the logical decoding messages of
    /// `message_prefix` (a table-less outbox): the table need not exist, `table` only
    /// names this entry (metrics, the default slot name), and the publication is created
    /// without tables.
    pub inserts: bool,
    /// How often the replication connection reports its position to PostgreSQL when
    /// nothing else made it report (keeps the slot advancing on an idle database).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            slot: None,
            publication: None,
            snapshot: Snapshot::All,
            message_prefix: None,
            inserts: true,
            status_interval: Duration::from_secs(1),
        }
    }
}

/// Which rows a newly created slot starts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Snapshot {
    /// Every row already in the table, then the stream (the default).
    #[default]
    All,
    /// Only rows committed after the slot was created.
    New,
}

impl TableConfig {
    /// The replication slot of `capture = "wal"`.
    pub fn wal_slot(&self) -> String {
        self.wal.slot.clone().unwrap_or_else(|| {
            let name: String = format!("outboxd_{}", self.table)
                .chars()
                .map(|c| match c {
                    'a'..='z' | '0'..='9' | '_' => c,
                    'A'..='Z' => c.to_ascii_lowercase(),
                    _ => '_',
                })
                .collect();
            name.chars().take(63).collect()
        })
    }

    /// The publication of `capture = "wal"`.
    pub fn wal_publication(&self) -> String {
        self.wal
            .publication
            .clone()
            .unwrap_or_else(|| self.wal_slot())
    }
}

/// What the relay does with a row once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPublished {
    /// Delete the row in the claiming transaction (default; keeps the table small).
    Delete,
    /// Set `published_column` (to the current time, or to true); the maintenance task
    /// purges rows with an old time.
    Mark,
    /// Change no row: each lane keeps the position of the last row it published.
    Cursor,
}
