//! MySQL 8 and MariaDB 10.6+: claims by reading the lane's next ids, locking those rows
//! with `SELECT ... FOR UPDATE SKIP LOCKED`, and deleting (or marking) them in the same
//! transaction once Kafka acknowledged them; lanes and members through `GET_LOCK`
//! held on their own connections (released with them); lane filter on `CRC32(key)`.
//! No notifications: lanes poll. The statements are in `statements`, the locks in `locks`.

mod locks;
mod statements;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool};
use sqlx::{ConnectOptions, Executor, Row};

use crate::config::TableConfig;

use super::{
    check_column_use, check_columns, preflight, purge_in_batches, ClaimedRow, Lane, LaneOwner,
    LaneSession, Mark, Membership, NewEvent, Settled, Settlement, Store, StoreError,
};
use locks::{get_lock, identity, LockNames, MEMBER_SLOTS};
use statements::{columns, index_on, kind_of, placeholders, q, quote_table, TableSql};

/// How often a batch's delete is tried when InnoDB reports a deadlock or lock wait timeout.
const COMMIT_ATTEMPTS: u64 = 5;

/// A deadlock (1213) or lock wait timeout (1205): the statement may succeed when retried.
fn is_lock_conflict(e: &StoreError) -> bool {
    let StoreError::Database(sqlx::Error::Database(db)) = e else {
        return false;
    };
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .is_some_and(|e| matches!(e.number(), 1205 | 1213))
}

/// One outbox table in MySQL or MariaDB.
pub struct MySqlStore {
    config: TableConfig,
    sql: Arc<TableSql>,
    opts: MySqlConnectOptions,
    pool: MySqlPool,
    locks: LockNames,
    mark: Option<Mark>,
}

impl MySqlStore {
    /// Checks table `t` and renders its statements.
    pub async fn open(
        opts: MySqlConnectOptions,
        pool: MySqlPool,
        t: &TableConfig,
    ) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        let columns = columns(&mut conn, &t.table).await?;
        let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
        check_columns(t, &names)?;
        let uses = check_column_use(t, &columns, kind_of)?;
        let id_index = index_on(&mut conn, &t.table, &t.id_column).await?;
        if id_index.is_none() {
            tracing::warn!(column = %t.id_column, "the id column has no index: every claim and delete scans the table");
        }
        Ok(MySqlStore {
            config: t.clone(),
            sql: Arc::new(TableSql::new(t, &columns, id_index.as_deref(), uses)),
            opts,
            pool,
            locks: LockNames::new(&identity(&mut conn, &t.table).await?),
            mark: uses.mark,
        })
    }
}

#[async_trait]
impl Store for MySqlStore {
    async fn join(&self) -> Result<Box<dyn Membership>, StoreError> {
        let conn = self.opts.connect().await?;
        let member = locks::join(conn, &self.locks, self.config.lanes).await?;
        member.map(|m| Box::new(m) as Box<dyn Membership>).ok_or_else(|| {
            StoreError::Schema(format!(
                "table `{}`: all {MEMBER_SLOTS} relay member slots are taken; at most {MEMBER_SLOTS} relays can serve one MySQL table",
                self.config.table
            ))
        })
    }

    async fn acquire_lane(&self, lane: u32) -> Result<Option<Lane>, StoreError> {
        let mut conn = self.opts.connect().await?;
        // Without gap locks a claim never blocks the application's inserts.
        conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await?;
        if !get_lock(&mut conn, &self.locks.lane(lane)).await? {
            return Ok(None);
        }
        Ok(Some(Lane::Single(Box::new(MySqlLane {
            conn,
            ids: self.sql.ids_of_lane(lane),
            sql: self.sql.clone(),
            claimed: Vec::new(),
        }))))
    }

    async fn stats(&self) -> Result<(i64, Option<f64>), StoreError> {
        let row = sqlx::query(&self.sql.stats).fetch_one(&self.pool).await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Finds marked rows past retention with a plain read, then deletes them by primary
    /// key at READ COMMITTED: no pending row is ever locked, so a claim's `SKIP LOCKED`
    /// never passes over one (which could send a later row of its key first).
    async fn purge(&self, retention_secs: f64) -> Result<u64, StoreError> {
        let Some(purge) = &self.sql.purge else {
            return Ok(0);
        };
        let micros = (retention_secs * 1e6) as i64;
        purge_in_batches(|| async {
            let mut conn = self.pool.acquire().await?;
            let ids: Vec<String> = sqlx::query_scalar(purge)
                .bind(micros)
                .fetch_all(&mut *conn)
                .await?;
            if ids.is_empty() {
                return Ok(0);
            }
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let sql = format!("{}{}", self.sql.purge_head, placeholders(ids.len()));
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .await?;
            Ok(self
                .sql
                .bind_ids(sqlx::query(&sql), &ids)
                .execute(&mut *conn)
                .await?
                .rows_affected())
        })
        .await
    }

    /// Finds counters of rows that are no longer pending with a plain read, then deletes
    /// those counters at READ COMMITTED: the outbox itself is never locked.
    async fn cleanup_attempts(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let stale: Vec<String> = sqlx::query_scalar(&self.sql.stale_attempts)
            .bind(&self.sql.table)
            .fetch_all(&mut *conn)
            .await?;
        if stale.is_empty() {
            return Ok(0);
        }
        let sql = format!("{}{}", self.sql.cleanup_head, placeholders(stale.len()));
        let mut query = sqlx::query(&sql).bind(&self.sql.table);
        for id in &stale {
            query = query.bind(id);
        }
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await?;
        Ok(query.execute(&mut *conn).await?.rows_affected())
    }

    async fn dead_rows(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM outboxd_dead_rows WHERE source_table = ?")
                .bind(&self.config.table)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn lane_owners(&self) -> Result<Vec<LaneOwner>, StoreError> {
        let mut owners = Vec::new();
        for lane in 0..self.config.lanes {
            let row = sqlx::query(
                "SELECT CAST(p.ID AS SIGNED), CAST(p.HOST AS CHAR), CAST(p.USER AS CHAR) \
                 FROM information_schema.PROCESSLIST p WHERE p.ID = IS_USED_LOCK(?)",
            )
            .bind(self.locks.lane(lane))
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                owners.push(LaneOwner {
                    lane: i64::from(lane),
                    pid: row.try_get(0)?,
                    client: row.try_get(1)?,
                    application: row.try_get(2)?,
                });
            }
        }
        Ok(owners)
    }

    async fn preflight(&self) -> Result<preflight::TableCheck, StoreError> {
        let names = preflight::Quoted::new(&self.config, q, quote_table);
        preflight::mysql(&self.pool, &self.config, &names, self.mark).await
    }
}

/// A lane: its `GET_LOCK` and its claim transactions, on one connection.
struct MySqlLane {
    conn: MySqlConnection,
    /// The statement finding the lane's next ids.
    ids: String,
    sql: Arc<TableSql>,
    /// Ids of the rows claimed by the open transaction.
    claimed: Vec<String>,
}

impl MySqlLane {
    async fn run(&mut self, statement: &str) -> Result<(), StoreError> {
        Executor::execute(&mut self.conn, statement).await?;
        Ok(())
    }

    /// Deletes (or marks) `ids`, in the open transaction.
    async fn finish(&mut self, ids: &[&str]) -> Result<(), StoreError> {
        for chunk in ids.chunks(1000) {
            let sql = format!("{}{}", self.sql.finish_head, placeholders(chunk.len()));
            let query = self.sql.bind_ids(sqlx::query(&sql), chunk);
            query.execute(&mut self.conn).await?;
        }
        Ok(())
    }

    async fn settle_in_tx(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.finish(s.finished).await?;
        let mut counts = HashMap::new();
        for (id, error) in s.refused {
            sqlx::query(
                "INSERT INTO outboxd_relay_attempts (source_table, row_id, attempts, last_error) \
                 VALUES (?, ?, 1, ?) ON DUPLICATE KEY UPDATE attempts = attempts + 1, \
                 last_error = VALUES(last_error), updated_at = CURRENT_TIMESTAMP(6)",
            )
            .bind(&self.sql.table)
            .bind(*id)
            .bind(error)
            .execute(&mut self.conn)
            .await?;
            let attempts: i32 = sqlx::query_scalar(
                "SELECT attempts FROM outboxd_relay_attempts WHERE source_table = ? AND row_id = ?",
            )
            .bind(&self.sql.table)
            .bind(*id)
            .fetch_one(&mut self.conn)
            .await?;
            counts.insert((*id).to_owned(), attempts);
        }
        let (dead, still_refused) = s.dead_rows(&counts);
        let mut moved = 0;
        for d in &dead {
            let copy = format!(
                "INSERT INTO outboxd_dead_rows (source_table, row_id, reason, attempts, row_data) \
                 SELECT ?, ?, ?, ?, {} FROM {} o WHERE o.{} = ?",
                self.sql.row_json,
                quote_table(&self.sql.table),
                self.sql.id
            );
            sqlx::query(&copy)
                .bind(&self.sql.table)
                .bind(&d.id)
                .bind(&d.reason)
                .bind(d.attempts)
                .bind(&d.id)
                .execute(&mut self.conn)
                .await?;
            let delete = format!(
                "DELETE FROM {} WHERE {} = ?",
                quote_table(&self.sql.table),
                self.sql.id
            );
            moved += sqlx::query(&delete)
                .bind(&d.id)
                .execute(&mut self.conn)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM outboxd_relay_attempts WHERE source_table = ? AND row_id = ?")
                .bind(&self.sql.table)
                .bind(&d.id)
                .execute(&mut self.conn)
                .await?;
        }
        Ok(Settled {
            dead,
            moved,
            still_refused,
        })
    }
}

#[async_trait]
impl LaneSession for MySqlLane {
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        self.run("START TRANSACTION").await?;
        let ids: Vec<String> = sqlx::query_scalar(&self.ids)
            .bind(i64::from(limit))
            .fetch_all(&mut self.conn)
            .await?;
        if ids.is_empty() {
            self.claimed.clear();
            return Ok(Vec::new());
        }
        // Lock exactly those rows by primary key; the lane lock keeps other relays away
        // from them, SKIP LOCKED guards against anything else that holds one.
        let sql = format!(
            "{}{}{}",
            self.sql.lock_rows,
            placeholders(ids.len()),
            self.sql.lock_tail
        );
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let rows = self
            .sql
            .bind_ids(sqlx::query(&sql), &id_refs)
            .fetch_all(&mut self.conn)
            .await?;
        let rows = rows
            .iter()
            .map(|r| self.sql.decode(r))
            .collect::<Result<Vec<_>, _>>()?;
        self.claimed = rows.iter().map(|r| r.id().to_owned()).collect();
        Ok(rows)
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        let claimed = std::mem::take(&mut self.claimed);
        let ids: Vec<&str> = claimed.iter().map(String::as_str).collect();
        let mut attempt = 1;
        loop {
            let done = async {
                self.finish(&ids).await?;
                self.run("COMMIT").await
            }
            .await;
            match done {
                Err(e) if is_lock_conflict(&e) && attempt < COMMIT_ATTEMPTS => {
                    // InnoDB rolled the transaction back, releasing our row locks. Kafka
                    // has the rows and the lane lock still keeps other relays away from
                    // them, so deleting them in a new transaction is the same commit.
                    let _ = self.run("ROLLBACK").await;
                    tracing::debug!(error = %e, attempt, "lock conflict while committing a batch; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt)).await;
                    self.run("START TRANSACTION").await?;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        self.claimed.clear();
        self.run("ROLLBACK").await
    }

    async fn settle(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.run("START TRANSACTION").await?;
        match self.settle_in_tx(s).await {
            Ok(settled) => {
                self.run("COMMIT").await?;
                Ok(settled)
            }
            Err(e) => {
                let _ = self.run("ROLLBACK").await;
                Err(e)
            }
        }
    }
}

/// Inserts `event` into table `t` through its column mapping (MySQL converts the text
/// values to each column's type); returns the new row's id.
pub async fn emit(
    opts: &MySqlConnectOptions,
    t: &TableConfig,
    event: &NewEvent<'_>,
) -> Result<String, StoreError> {
    let mut conn = opts.connect().await?;
    let names: Vec<String> = columns(&mut conn, &t.table)
        .await?
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    check_columns(t, &names)?;
    let headers = serde_json::Value::Object(event.headers.clone()).to_string();
    let columns = event.columns(t, &headers);
    let sql = format!(
        "INSERT INTO {} ({}) VALUES {}",
        quote_table(&t.table),
        columns
            .iter()
            .map(|(c, _)| q(c))
            .collect::<Vec<_>>()
            .join(", "),
        placeholders(columns.len())
    );
    let mut query = sqlx::query(&sql);
    for (_, value) in &columns {
        query = query.bind(*value);
    }
    let done = query.execute(&mut conn).await?;
    Ok(done.last_insert_id().to_string())
}
