//! SQLite: one lane per table, held as a lock on a byte of the database file itself (see
//! `lock`), so one relay at a time reads the outbox. A claim is a plain read; the rows leave the outbox in
//! a short `BEGIN IMMEDIATE` transaction once Kafka acknowledged them, so SQLite's single
//! write lock is never held while waiting for Kafka. No notifications: the lane polls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};
use sqlx::{ConnectOptions, Executor, Row};

use crate::config::TableConfig;

mod lock;
mod statements;

use super::preflight;
use super::{
    position_after, purge_in_batches, Census, ClaimedRow, Lane, LaneOwner, LaneSession, Mark,
    Membership, NewEvent, Position, Settled, Settlement, Store, StoreError,
};
use lock::LaneLock;
use statements::{check_table, columns, decode, q, quote_table, TableSql, NOW};

/// One outbox table in SQLite.
pub struct SqliteStore {
    config: TableConfig,
    sql: Arc<TableSql>,
    opts: SqliteConnectOptions,
    pool: SqlitePool,
    /// The database file, whose lock byte for this table is the lane lock; `None` for an
    /// in-memory database (one process by nature).
    database_file: Option<PathBuf>,
    mark: Option<Mark>,
}

impl SqliteStore {
    /// Checks table `t` and renders its statements.
    pub async fn open(
        opts: SqliteConnectOptions,
        pool: SqlitePool,
        t: &TableConfig,
    ) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        let columns = columns(&mut conn, &t.table).await?;
        let uses = check_table(t, &columns)?;
        let names: Vec<String> = columns.into_iter().map(|c| c.name).collect();
        let database_file = lock::database_file(opts.get_filename());
        Ok(SqliteStore {
            config: t.clone(),
            sql: Arc::new(TableSql::new(t, &names, uses)),
            opts,
            pool,
            database_file,
            mark: uses.mark,
        })
    }

    /// Takes the lane lock, or `None` when another relay holds it.
    fn lock(&self) -> Result<Option<Option<LaneLock>>, StoreError> {
        let Some(path) = &self.database_file else {
            return Ok(Some(None));
        };
        Ok(lock::try_lock(path, &self.config.table)?.map(Some))
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn join(&self) -> Result<Box<dyn Membership>, StoreError> {
        Ok(Box::new(SingleLane))
    }

    async fn acquire_lane(&self, _lane: u32) -> Result<Option<Lane>, StoreError> {
        let Some(lock) = self.lock()? else {
            return Ok(None);
        };
        let conn = self.opts.connect().await?;
        Ok(Some(Lane::Single(Box::new(SqliteLane {
            conn,
            _lock: lock,
            sql: self.sql.clone(),
            claimed: Vec::new(),
        }))))
    }

    async fn stats(&self) -> Result<(i64, Option<f64>), StoreError> {
        let row = sqlx::query(&self.sql.stats).fetch_one(&self.pool).await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    async fn purge(&self, retention_secs: f64) -> Result<u64, StoreError> {
        let Some(purge) = &self.sql.purge else {
            return Ok(0);
        };
        purge_in_batches(|| async {
            Ok(sqlx::query(purge)
                .bind(retention_secs)
                .execute(&self.pool)
                .await?
                .rows_affected())
        })
        .await
    }

    async fn cleanup_attempts(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query(&self.sql.cleanup_attempts)
            .bind(&self.sql.table)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn dead_rows(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outboxd_dead_rows WHERE source_table = ?1")
                .bind(&self.config.table)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn lane_owners(&self) -> Result<Vec<LaneOwner>, StoreError> {
        // Holding the lock for a moment tells whether someone else holds it.
        let held_elsewhere = self.database_file.is_some() && self.lock()?.is_none();
        Ok(held_elsewhere
            .then_some(LaneOwner {
                lane: 0,
                pid: None,
                client: None,
                application: None,
            })
            .into_iter()
            .collect())
    }

    async fn preflight(&self) -> Result<preflight::TableCheck, StoreError> {
        let names = preflight::Quoted::new(&self.config, q, quote_table);
        preflight::sqlite(&self.pool, &self.config, &names, self.mark).await
    }
}

/// SQLite has one lane; whoever holds the table's lock byte of the database file owns it.
struct SingleLane;

#[async_trait]
impl Membership for SingleLane {
    async fn census(&mut self, _lanes: u32) -> Result<Census, StoreError> {
        Ok(Census {
            members: 1,
            ..Census::default()
        })
    }
}

/// The lane: its lock and a dedicated connection.
struct SqliteLane {
    conn: SqliteConnection,
    _lock: Option<LaneLock>,
    sql: Arc<TableSql>,
    /// Ids of the rows claimed and not yet committed or released, with their positions
    /// (cursor mode).
    claimed: Vec<(String, Position)>,
}

impl SqliteLane {
    async fn run(&mut self, statement: &str) -> Result<(), StoreError> {
        Executor::execute(&mut self.conn, statement).await?;
        Ok(())
    }

    async fn finish(&mut self, ids: &[&str]) -> Result<(), StoreError> {
        if !ids.is_empty() {
            let ids = serde_json::to_string(ids).expect("strings serialise");
            sqlx::query(&self.sql.finish)
                .bind(ids)
                .execute(&mut self.conn)
                .await?;
        }
        Ok(())
    }

    /// Cursor mode: moves the lane's position to `to` (nothing when `None`).
    async fn advance(&mut self, to: Option<(Position, i64)>) -> Result<(), StoreError> {
        let Some((to, high)) = to else {
            return Ok(());
        };
        sqlx::query(&format!(
            "INSERT INTO outboxd_relay_cursors (source_table, lanes, lane, xid, position, high) \
             VALUES (?1, 1, 0, ?2, ?3, ?4) ON CONFLICT (source_table, lanes, lane) DO UPDATE \
             SET xid = excluded.xid, position = excluded.position, \
             high = max(high, excluded.high), updated_at = {NOW}"
        ))
        .bind(&self.sql.table)
        .bind(to.xid)
        .bind(to.ord)
        .bind(high)
        .execute(&mut self.conn)
        .await?;
        Ok(())
    }

    async fn settle_in_tx(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        if !self.sql.cursor {
            self.finish(s.finished).await?;
        }
        let mut counts = HashMap::new();
        for (id, error) in s.refused {
            let attempts: i32 = sqlx::query_scalar(&format!(
                "INSERT INTO outboxd_relay_attempts (source_table, row_id, attempts, last_error) \
                 VALUES (?1, ?2, 1, ?3) ON CONFLICT (source_table, row_id) DO UPDATE \
                 SET attempts = attempts + 1, last_error = excluded.last_error, updated_at = {NOW} \
                 RETURNING attempts"
            ))
            .bind(&self.sql.table)
            .bind(*id)
            .bind(error)
            .fetch_one(&mut self.conn)
            .await?;
            counts.insert((*id).to_owned(), attempts);
        }
        let (dead, still_refused) = s.dead_rows(&counts);
        let mut moved = 0;
        for d in &dead {
            sqlx::query(&self.sql.copy_dead)
                .bind(&self.sql.table)
                .bind(&d.id)
                .bind(&d.reason)
                .bind(d.attempts)
                .execute(&mut self.conn)
                .await?;
            // Cursor mode changes no row: the copy is the move, and the position passes it.
            moved += match self.sql.cursor {
                true => 1,
                false => sqlx::query(&self.sql.delete_one)
                    .bind(&d.id)
                    .execute(&mut self.conn)
                    .await?
                    .rows_affected(),
            };
            sqlx::query(
                "DELETE FROM outboxd_relay_attempts WHERE source_table = ?1 AND row_id = ?2",
            )
            .bind(&self.sql.table)
            .bind(&d.id)
            .execute(&mut self.conn)
            .await?;
        }
        if self.sql.cursor {
            let claimed = std::mem::take(&mut self.claimed);
            let passed: std::collections::HashSet<&str> = s
                .finished
                .iter()
                .copied()
                .chain(dead.iter().map(|d| d.id.as_str()))
                .collect();
            self.advance(position_after(&claimed, |id| passed.contains(id)))
                .await?;
        }
        Ok(Settled {
            dead,
            moved,
            still_refused,
        })
    }

    /// Runs `work` in a `BEGIN IMMEDIATE` transaction (SQLite's write lock, taken up front
    /// so the transaction never has to upgrade and fail with SQLITE_BUSY).
    async fn immediate<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.run("BEGIN IMMEDIATE").await?;
        match work(self).await {
            Ok(done) => {
                self.run("COMMIT").await?;
                Ok(done)
            }
            Err(e) => {
                let _ = self.run("ROLLBACK").await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl LaneSession for SqliteLane {
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        let rows = sqlx::query(&self.sql.claim)
            .bind(i64::from(limit))
            .fetch_all(&mut self.conn)
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for r in &rows {
            let position = Position {
                xid: 0,
                ord: r.try_get(10)?,
            };
            claimed.push((r.try_get::<String, _>(0)?, position));
        }
        self.claimed = claimed;
        rows.iter().map(decode).collect()
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        let claimed = std::mem::take(&mut self.claimed);
        if claimed.is_empty() {
            return Ok(());
        }
        self.immediate(async |lane: &mut Self| {
            if lane.sql.cursor {
                return lane.advance(position_after(&claimed, |_| true)).await;
            }
            let ids: Vec<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
            lane.finish(&ids).await
        })
        .await
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        // Nothing was written: the rows are still in the outbox. A cursor lane keeps its
        // claim for a settlement, which advances the position past the rows done.
        if !self.sql.cursor {
            self.claimed.clear();
        }
        Ok(())
    }

    async fn settle(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.immediate(async |lane: &mut Self| lane.settle_in_tx(s).await)
            .await
    }
}

/// Inserts `event` into table `t` through its column mapping; returns the new row's id.
pub async fn emit(
    opts: &SqliteConnectOptions,
    t: &TableConfig,
    event: &NewEvent<'_>,
) -> Result<String, StoreError> {
    let mut conn = opts.connect().await?;
    check_table(t, &columns(&mut conn, &t.table).await?)?;
    let headers = serde_json::Value::Object(event.headers.clone()).to_string();
    let columns = event.columns(t, &headers);
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        quote_table(&t.table),
        columns
            .iter()
            .map(|(c, _)| q(c))
            .collect::<Vec<_>>()
            .join(", "),
        (1..=columns.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (_, value) in &columns {
        query = query.bind(*value);
    }
    let done = query.execute(&mut conn).await?;
    Ok(done.last_insert_rowid().to_string())
}
