//! Outbox storage: the rows the relay claims and the statements it runs, one module per
//! database backend (PostgreSQL today).

pub mod postgres;

/// A claimed outbox row, every column already cast to what the message needs.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    /// The id column as text.
    pub id: String,
    /// Message key; NULL makes the row a dead row.
    pub key: Option<String>,
    /// Message value; NULL makes the row a dead row.
    pub payload: Option<Vec<u8>>,
    /// The headers JSON object as text.
    pub headers: Option<String>,
    /// The `event-id` header (falls back to `id`).
    pub event_id: Option<String>,
    /// The `event-type` header.
    pub event_type: Option<String>,
    /// The `aggregate-type` header.
    pub aggregate_type: Option<String>,
    /// Creation time as Unix seconds.
    pub created_at: Option<f64>,
    /// The topic, when it comes from `topic_column`.
    pub topic: Option<String>,
}

/// A row to move to the dead-row table.
#[derive(Debug, Clone)]
pub struct DeadRow {
    /// The id column as text.
    pub id: String,
    /// Why it will never be published as it is.
    pub reason: String,
    /// How often Kafka refused it (0 for rows that could not become a message).
    pub attempts: i32,
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or is unreachable.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The table does not match the configured mapping.
    #[error("{0}")]
    Schema(String),
}
