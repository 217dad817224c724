//! Outbox storage behind one interface: a [`Store`] is one outbox table in one database,
//! with everything the relay runs against it. One module per backend implements it;
//! the relay loop, the maintenance task, `status` and `emit` do not know which database
//! they talk to.

mod columns;
pub mod mysql;
pub mod postgres;
pub mod preflight;
mod row;
pub mod sqlite;

pub use columns::{
    check_column_use, check_columns, epoch_seconds_sql, required_columns, ColumnKind, ColumnUse,
    CreatedAt, Mark, EPOCH_MILLIS_ABOVE,
};
pub use row::{ClaimedRow, Columns, Lenient};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::TableConfig;
use crate::db::Database;

/// What a follower needs to claim the rows after its leader's open claim without passing
/// over them: the leader's view of the outbox and where its claim ends. Only the store
/// that made it reads it.
#[derive(Debug, Clone)]
pub struct Handoff {
    /// The leader transaction's snapshot, to be shared by the follower's transaction.
    snapshot: String,
    /// The order value of the last row the leader claimed.
    after: i64,
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

impl DeadRow {
    /// Row `id`'s dead row, its reason scrubbed of the configuration's secrets.
    pub fn new(id: &str, reason: &str, attempts: i32) -> Self {
        DeadRow {
            id: id.to_owned(),
            reason: crate::secrets::scrub(reason).into_owned(),
            attempts,
        }
    }
}

/// The session holding a lane (`outboxd status`).
#[derive(Debug, serde::Serialize)]
pub struct LaneOwner {
    /// Lane number.
    pub lane: i64,
    /// The owning session: PostgreSQL backend pid or MySQL connection id (none for SQLite,
    /// whose lane is a file lock).
    pub pid: Option<i64>,
    /// Client address or host of the owner, when the database knows it.
    pub client: Option<String>,
    /// Its `application_name` (PostgreSQL) or user (MySQL).
    pub application: Option<String>,
}

/// How a partly failed batch is settled, after its claim was rolled back.
#[derive(Debug)]
pub struct Settlement<'a> {
    /// Acknowledged rows that leave the outbox (deleted or marked).
    pub finished: &'a [&'a str],
    /// Rows Kafka refused, with the error: each refusal is counted.
    pub refused: &'a [(&'a str, String)],
    /// Rows that cannot become a message: they move to the dead rows at once.
    pub bad: &'a [DeadRow],
    /// Refusals after which a row moves to the dead rows.
    pub max_attempts: u32,
}

/// What settling did.
#[derive(Debug, Default)]
pub struct Settled {
    /// Every row moved to the dead rows: the bad ones and the ones refused too often.
    pub dead: Vec<DeadRow>,
    /// How many rows the dead-row move took out of the outbox.
    pub moved: u64,
    /// Refused rows that stay in the outbox for another attempt.
    pub still_refused: usize,
}

impl Settlement<'_> {
    /// The rows to move to the dead rows, given each refused row's count so far: the bad
    /// rows and those refused `max_attempts` times. Also returns how many refused rows stay.
    pub fn dead_rows(&self, counts: &HashMap<String, i32>) -> (Vec<DeadRow>, usize) {
        let mut dead = self.bad.to_vec();
        let mut still_refused = 0;
        for (id, error) in self.refused {
            let attempts = counts.get(*id).copied().unwrap_or(1);
            if attempts >= self.max_attempts as i32 {
                dead.push(DeadRow::new(
                    id,
                    &format!("kafka refused it {attempts} times; last error: {error}"),
                    attempts,
                ));
            } else {
                still_refused += 1;
            }
        }
        (dead, still_refused)
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or is unreachable.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The table does not exist.
    #[error("table `{0}` does not exist (run `outboxd migrate` for the reference table, or fix relay.tables.table)")]
    NoTable(String),
    /// The table does not match the configured mapping.
    #[error("{0}")]
    Schema(String),
    /// A second session of a lane found the session holding the lane gone: its claims
    /// would no longer be protected by the lane lock, so it stops.
    #[error("lane {lane} of `{table}` was lost: the connection holding its lock is gone")]
    LaneLost {
        /// The table.
        table: String,
        /// The lane.
        lane: u32,
    },
    /// The lane lock of a SQLite database file cannot be used.
    #[error("lane lock on {path}: {source}")]
    LockFile {
        /// The database file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One outbox table in one database.
#[async_trait]
pub trait Store: Send + Sync {
    /// Registers this process as one of the table's relays; the registration lasts as
    /// long as the returned value (and its connection).
    async fn join(&self) -> Result<Box<dyn Membership>, StoreError>;

    /// Takes `lane` on a dedicated connection, or `None` when another relay holds it.
    /// The lane is held until its session holding it is dropped or its connection fails.
    async fn acquire_lane(&self, lane: u32) -> Result<Option<Lane>, StoreError>;

    /// `(pending rows, age of the oldest pending row in seconds)`.
    async fn stats(&self) -> Result<(i64, Option<f64>), StoreError>;

    /// Mark mode: deletes published rows older than `retention_secs`; returns how many.
    async fn purge(&self, retention_secs: f64) -> Result<u64, StoreError>;

    /// Forgets refusal counters of rows that are no longer pending.
    async fn cleanup_attempts(&self) -> Result<u64, StoreError>;

    /// How many of the table's rows are in `outboxd_dead_rows`.
    async fn dead_rows(&self) -> Result<i64, StoreError>;

    /// The sessions holding the table's lanes, by lane.
    async fn lane_owners(&self) -> Result<Vec<LaneOwner>, StoreError>;

    /// `check-config --connect`: the kinds of statement the relay runs on this table that
    /// the database refuses, and in mark mode whether an index serves the claim of pending
    /// rows. Changes nothing.
    async fn preflight(&self) -> Result<preflight::TableCheck, StoreError>;

    /// Wakes the lanes through `wake` whenever rows are committed, until `stop`.
    /// Backends without notifications return at once: their lanes poll.
    async fn listen(&self, _wake: watch::Sender<()>, _stop: CancellationToken) {}
}

/// What a relay sees of the relays serving a table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Relays serving the table, this one included (at least 1).
    pub members: u32,
    /// Lanes any relay holds.
    pub taken: HashSet<u32>,
    /// Set when another relay runs with a different `lanes` setting (saying which, where
    /// the backend can tell): its lanes cut the keys differently, so claiming beside it
    /// would break per-key order.
    pub other_lanes: Option<String>,
}

/// This process's registration among the relays of one table, with its `lanes` setting.
#[async_trait]
pub trait Membership: Send {
    /// Who serves the table now.
    async fn census(&mut self, lanes: u32) -> Result<Census, StoreError>;
}

/// A held lane: one session, or two that take turns when the store can claim the next
/// batch while the one before it waits for Kafka (`prefetch`).
pub enum Lane {
    /// One session claims one batch at a time.
    Single(Box<dyn LaneSession>),
    /// The session holding the lane, and a second one. The second one's claims are taken
    /// only while the first still holds the lane, and a later owner of the lane waits for
    /// them to end before it claims.
    Paired(Box<dyn PairedSession>, Box<dyn PairedSession>),
}

/// One session of a held lane: its claim cycle.
#[async_trait]
pub trait LaneSession: Send {
    /// Claims up to `limit` of the lane's pending rows in publication order. They stay
    /// claimed, out of every other relay's reach, until [`commit`](Self::commit) or
    /// [`rollback`](Self::rollback).
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError>;

    /// Whether [`claim_more`](Self::claim_more) extends a claim: the lane then claims a
    /// batch in chunks and publishes each chunk while claiming the next.
    fn claims_in_chunks(&self) -> bool {
        false
    }

    /// Claims up to `limit` further rows of the lane into the open claim (after `claim`),
    /// in publication order after the rows already claimed; nothing when the store does
    /// not extend claims.
    async fn claim_more(&mut self, _limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        Ok(Vec::new())
    }

    /// The claimed rows leave the outbox (deleted, or marked published).
    async fn commit(&mut self) -> Result<(), StoreError>;

    /// The claimed rows stay in the outbox as they were.
    async fn rollback(&mut self) -> Result<(), StoreError>;

    /// Settles a partly failed batch in one transaction, after its rollback.
    async fn settle(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError>;
}

/// A session of a [`Lane::Paired`]: besides its own claims, it hands its claim over to the
/// other session of the pair, follows the other's, and claims around the other's keys.
#[async_trait]
pub trait PairedSession: LaneSession {
    /// Claims, like [`claim`](LaneSession::claim), up to `limit` pending rows of the lane
    /// whose key is none of `keys` (a NULL key counts as the empty one). Rows of those keys
    /// are left for a later claim, together with every later row of their keys, so that a
    /// batch of other keys can be sent while theirs still waits for Kafka.
    async fn claim_around(
        &mut self,
        limit: u32,
        keys: &[&str],
    ) -> Result<Vec<ClaimedRow>, StoreError>;

    /// Where the other session's claim may begin after this session's open claim (see
    /// [`follow`](Self::follow)); `None` when the store cannot say, and the other then
    /// claims with [`claim`](LaneSession::claim). This session's claim must stay open
    /// until the other's `follow` returned.
    async fn handoff(&mut self) -> Result<Option<Handoff>, StoreError>;

    /// Opens a claim, after the session that gave `handoff`, that
    /// [`claim_more`](LaneSession::claim_more) extends with the rows after that session's
    /// open claim, as that session sees the outbox. Returns the snapshot the next
    /// hand-over from this session will carry, when it is known already (see
    /// [`prepare_follow`](Self::prepare_follow)).
    async fn follow(&mut self, handoff: &Handoff) -> Result<Option<String>, StoreError>;

    /// Between batches (nothing claimed, the last claim committed): begins ahead of time
    /// the transaction in which a later [`follow`](Self::follow) with a handoff carrying
    /// `snapshot` goes on, so that `follow` costs no round trip then. Best effort: when it
    /// fails, `follow` begins as usual. Any other use of the session first ends it, and
    /// [`release`](Self::release) ends it when no follow comes.
    async fn prepare_follow(&mut self, snapshot: &str);

    /// Ends a transaction begun by [`prepare_follow`](Self::prepare_follow) that no
    /// follow will use, so that it does not stay open while the lane waits for rows.
    async fn release(&mut self) -> Result<(), StoreError>;
}

/// Opens table `t` of `db`: checks its columns against the mapping and prepares its
/// statements.
pub async fn open(db: &Database, t: &TableConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match db {
        Database::Postgres { opts, pool, .. } => {
            Arc::new(postgres::PgStore::open(opts.clone(), pool.clone(), t).await?)
        }
        Database::MySql { opts, pool } => {
            Arc::new(mysql::MySqlStore::open(opts.clone(), pool.clone(), t).await?)
        }
        Database::Sqlite { opts, pool } => {
            Arc::new(sqlite::SqliteStore::open(opts.clone(), pool.clone(), t).await?)
        }
    })
}

/// One event to insert the way an application would (`outboxd emit`).
pub struct NewEvent<'a> {
    /// Key column value.
    pub key: &'a str,
    /// Event type column value (when the mapping has one).
    pub event_type: &'a str,
    /// Aggregate type column value (when the mapping has one).
    pub aggregate_type: &'a str,
    /// Payload (JSON text).
    pub payload: &'a str,
    /// Headers as a JSON object (when the mapping has a headers column).
    pub headers: &'a serde_json::Map<String, serde_json::Value>,
}

impl NewEvent<'_> {
    /// `(column, value as text)` of every column the mapping of `t` names.
    pub fn columns<'c>(&'c self, t: &'c TableConfig, headers: &'c str) -> Vec<(&'c str, &'c str)> {
        [
            (Some(&t.key_column), self.key),
            (Some(&t.payload_column), self.payload),
            (t.event_type_column.as_ref(), self.event_type),
            (t.aggregate_type_column.as_ref(), self.aggregate_type),
            (t.headers_column.as_ref(), headers),
        ]
        .into_iter()
        .filter_map(|(c, v)| Some((c?.as_str(), v)))
        .collect()
    }
}

/// Inserts `event` into table `t` of `db` through its column mapping; returns the new
/// row's id.
pub async fn emit(
    db: &Database,
    t: &TableConfig,
    event: &NewEvent<'_>,
) -> Result<String, StoreError> {
    match db {
        Database::Postgres { opts, .. } => postgres::emit(opts, t, event).await,
        Database::MySql { opts, .. } => mysql::emit(opts, t, event).await,
        Database::Sqlite { opts, .. } => sqlite::emit(opts, t, event).await,
    }
}

/// A cursor-mode lane's position: the last row it published, in publication order (the
/// transaction that wrote the row where the backend orders by it, then the order column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The writing transaction's id as the backend orders them (0 where it does not).
    pub xid: i64,
    /// The order column's value.
    pub ord: i64,
}

/// Where a cursor lane's position goes after a batch of `claimed` rows (in publication
/// order) of which `passed` tells the ones that are done (published or dead): past the
/// longest run of done rows from the batch's start, with the highest order value in that
/// run. `None` when the first row is not done: the position stays.
pub fn position_after(
    claimed: &[(String, Position)],
    passed: impl Fn(&str) -> bool,
) -> Option<(Position, i64)> {
    let run = claimed.iter().take_while(|(id, _)| passed(id));
    run.fold(None, |acc, (_, p)| match acc {
        None => Some((*p, p.ord)),
        Some((_, high)) => Some((*p, high.max(p.ord))),
    })
}

/// Rows one purge statement removes at most (its `LIMIT`); each batch is its own
/// transaction, so a large purge never holds many locks.
pub const PURGE_BATCH: u64 = 1000;

/// Runs `batch` (one purge statement, returning the rows it removed) until a batch removes
/// fewer than [`PURGE_BATCH`]; returns the total.
pub async fn purge_in_batches<F, Fut>(mut batch: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut total = 0;
    loop {
        let n = batch().await?;
        total += n;
        if n < PURGE_BATCH {
            return Ok(total);
        }
    }
}

/// FNV-1a, masked to a positive i32: the same in every process and version (lock names).
pub fn stable_hash(s: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

/// A random number to spread member slots and the first lane tried across processes.
pub fn random_slot() -> i32 {
    fastrand::i32(0..i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(keys: &[(i64, i64)]) -> Vec<(String, Position)> {
        keys.iter()
            .map(|&(xid, ord)| (ord.to_string(), Position { xid, ord }))
            .collect()
    }

    #[test]
    fn a_position_passes_the_done_rows_up_to_the_first_that_is_not() {
        // Order values out of order across transactions: the highest passed one counts.
        let batch = claimed(&[(10, 7), (11, 3), (12, 9), (13, 4)]);
        let all = position_after(&batch, |_| true);
        assert_eq!(all, Some((Position { xid: 13, ord: 4 }, 9)));
        let until_refused = position_after(&batch, |id| id != "9");
        assert_eq!(until_refused, Some((Position { xid: 11, ord: 3 }, 7)));
        assert_eq!(position_after(&batch, |id| id != "7"), None);
        assert_eq!(position_after(&[], |_| true), None);
    }
}
