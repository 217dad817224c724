//! SQLite: one lane per table, held as a lock on a byte of the database file itself (see
//! `sqlite_lock`), so one relay at a time reads the outbox. A claim is a plain read; the rows leave the outbox in
//! a short `BEGIN IMMEDIATE` transaction once Kafka acknowledged them, so SQLite's single
//! write lock is never held while waiting for Kafka. No notifications: the lane polls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{ConnectOptions, Executor, Row};

use crate::config::{Column, OnPublished, TableConfig};

use super::preflight;
use super::sqlite_lock::{self, LaneLock};
use super::{
    check_column_use, check_columns, epoch_seconds_sql, position_after, purge_in_batches, Census,
    ClaimedRow, ColumnKind, ColumnUse, Columns, Lane, LaneOwner, LaneSession, Lenient, Mark,
    Membership, NewEvent, Position, Settled, Settlement, Store, StoreError, PURGE_BATCH,
};

/// The current time as SQLite writes it into the reference table (UTC, ISO 8601).
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Quotes an identifier that validation already restricted to `[A-Za-z_][A-Za-z0-9_$]*`.
fn q(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// `schema.table` -> `"schema"."table"`.
fn quote_table(table: &str) -> String {
    table.split('.').map(q).collect::<Vec<_>>().join(".")
}

/// Unix seconds of a time column: numbers are taken as Unix seconds or milliseconds (see
/// [`epoch_seconds_sql`]), text as a date SQLite understands (ISO 8601).
fn epoch(expr: &str) -> String {
    format!(
        "(CASE WHEN typeof({expr}) IN ('integer', 'real') THEN {} \
         ELSE (julianday({expr}) - 2440587.5) * 86400.0 END)",
        epoch_seconds_sql(expr)
    )
}

/// One column as `pragma_table_info` describes it.
struct TableColumn {
    name: String,
    /// The declared type, as written in `CREATE TABLE`.
    declared: String,
    /// Its place in the primary key (0: not in it).
    pk: i64,
}

/// The table's columns in order; empty when it does not exist.
async fn columns(conn: &mut SqliteConnection, table: &str) -> Result<Vec<TableColumn>, StoreError> {
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (schema, name),
        None => ("main", table),
    };
    let rows = sqlx::query("SELECT name, type, pk FROM pragma_table_info(?, ?) ORDER BY cid")
        .bind(name)
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableColumn {
            name: r.get(0),
            declared: r.get(1),
            pk: r.get(2),
        })
        .collect())
}

/// Checks table `t`'s columns against the mapping: every mapped column exists, a mark
/// column declared boolean is a flag (any other is a time), and cursor mode orders by the
/// table's `INTEGER PRIMARY KEY`.
fn check_table(t: &TableConfig, columns: &[TableColumn]) -> Result<ColumnUse, StoreError> {
    let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    check_columns(t, &names)?;
    let typed: Vec<(String, String)> = columns
        .iter()
        .map(|c| (c.name.clone(), c.declared.to_ascii_uppercase()))
        .collect();
    // SQLite decides a value's type row by row: `epoch` reads numbers and text alike.
    let uses = check_column_use(t, &typed, |ty| match ty.contains("BOOL") {
        true => ColumnKind::Boolean,
        false => ColumnKind::Time,
    })?;
    if t.on_published == OnPublished::Cursor {
        // Only the rowid is assigned under the write lock that also orders commits; SQLite
        // has one writer, so rows become visible in rowid order and a position passes
        // over none. Rows must not be deleted: a deleted highest rowid is handed out again.
        let ord = t.order_column().as_str();
        let keys: Vec<&TableColumn> = columns.iter().filter(|c| c.pk > 0).collect();
        let is_rowid = matches!(keys.as_slice(), [k] if k.name == ord && k.declared.eq_ignore_ascii_case("INTEGER"));
        if !is_rowid {
            return Err(StoreError::Schema(format!(
                "table `{}`: on_published = \"cursor\" on SQLite needs the order column `{ord}` (relay.tables.order_column) to be the table's INTEGER PRIMARY KEY, which SQLite assigns in commit order",
                t.table
            )));
        }
    }
    Ok(uses)
}

/// Every statement of one table, rendered once.
#[derive(Debug)]
struct TableSql {
    table: String,
    /// Cursor mode: the claim reads after the lane's position, and rows are never changed.
    cursor: bool,
    claim: String,
    /// `$1 = JSON array of ids`: delete or mark.
    finish: String,
    /// `$1 = table, $2 = id, $3 = reason, $4 = attempts, $5 = id`: copy to the dead rows.
    copy_dead: String,
    /// `$1 = id`.
    delete_one: String,
    stats: String,
    purge: Option<String>,
    cleanup_attempts: String,
}

impl TableSql {
    fn new(t: &TableConfig, columns: &[String], uses: ColumnUse) -> Self {
        let table = quote_table(&t.table);
        let id = q(&t.id_column);
        let ord = q(t.order_column());
        let text = |col: Option<&Column>| match col {
            None => "NULL".to_owned(),
            Some(col) => format!("CAST(o.{} AS TEXT)", q(col)),
        };
        let published = q(&t.published_column);
        let (pending, mark_value) = match uses.mark {
            Some(Mark::Flag) => (format!("o.{published} IS NOT TRUE"), "1"),
            _ => (format!("o.{published} IS NULL"), NOW),
        };
        let pending = match t.on_published {
            OnPublished::Delete => "1".to_owned(),
            OnPublished::Mark => pending,
            // Validation restricted the name to letters, digits, `_`, `$` and one `.`.
            OnPublished::Cursor => format!(
                "o.{ord} > coalesce((SELECT position FROM outboxd_relay_cursors \
                 WHERE source_table = '{}' AND lanes = 1 AND lane = 0), -9223372036854775808)",
                t.table
            ),
        };
        let ids = "(SELECT value FROM json_each(?1))";
        let finish = match t.on_published {
            OnPublished::Delete | OnPublished::Cursor => {
                format!("DELETE FROM {table} WHERE {id} IN {ids}")
            }
            OnPublished::Mark => {
                format!("UPDATE {table} SET {published} = {mark_value} WHERE {id} IN {ids}")
            }
        };
        let header_columns = match t.header_columns.is_empty() {
            true => "NULL".to_owned(),
            false => format!(
                "json_array({})",
                t.header_columns
                    .values()
                    .map(|c| format!("o.{}", q(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let created_at = t
            .created_at_column
            .as_ref()
            .map(|c| epoch(&format!("o.{}", q(c))));
        // JSON holds no blobs: a blob value is kept as `\x` and its bytes in hex, as
        // PostgreSQL prints bytea.
        let row_json = format!(
            "json_object({})",
            columns
                .iter()
                .map(|c| {
                    let v = format!("o.{}", q(c));
                    format!(
                        "'{c}', CASE WHEN typeof({v}) = 'blob' THEN '\\x' || hex({v}) ELSE {v} END"
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cursor = t.on_published == OnPublished::Cursor;
        TableSql {
            table: t.table.clone(),
            cursor,
            claim: format!(
                "SELECT CAST(o.{id} AS TEXT), {key}, CAST(o.{payload} AS BLOB), {headers}, {event_id}, \
                 {event_type}, {aggregate_type}, {created_at}, {topic}, {header_columns}, {ord_out} \
                 FROM {table} o WHERE {pending} ORDER BY o.{ord} LIMIT ?1",
                ord_out = if cursor { format!("o.{ord}") } else { "0".to_owned() },
                key = text(Some(&t.key_column)),
                payload = q(&t.payload_column),
                headers = text(t.headers_column.as_ref()),
                event_id = text(t.event_id_column.as_ref()),
                event_type = text(t.event_type_column.as_ref()),
                aggregate_type = text(t.aggregate_type_column.as_ref()),
                topic = text(t.topic_column.as_ref()),
                created_at = created_at.as_deref().unwrap_or("NULL"),
            ),
            finish,
            copy_dead: format!(
                "INSERT INTO outboxd_dead_rows (source_table, row_id, reason, attempts, row_data) \
                 SELECT ?1, ?2, ?3, ?4, {row_json} FROM {table} o WHERE o.{id} = ?2"
            ),
            delete_one: format!("DELETE FROM {table} WHERE {id} = ?1"),
            stats: format!(
                "SELECT count(*), {oldest} FROM {table} o WHERE {pending}",
                pending = match cursor {
                    true => pending.replace("SELECT position", "SELECT high"),
                    false => pending.clone(),
                },
                oldest = match &created_at {
                    None => "NULL".to_owned(),
                    Some(created_at) => format!(
                        "(julianday('now') - 2440587.5) * 86400.0 - min({created_at})"
                    ),
                }
            ),
            purge: (uses.mark == Some(Mark::Time)).then(|| {
                let published = epoch(&format!("o.{published}"));
                format!(
                    "DELETE FROM {table} WHERE {id} IN (SELECT o.{id} FROM {table} o \
                     WHERE {published} < (julianday('now') - 2440587.5) * 86400.0 - ?1 LIMIT {PURGE_BATCH})"
                )
            }),
            cleanup_attempts: match cursor {
                // A published row stays: its counter goes once it is older than any retry.
                true => "DELETE FROM outboxd_relay_attempts WHERE source_table = ?1 \
                         AND updated_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')"
                    .to_owned(),
                false => format!(
                    "DELETE FROM outboxd_relay_attempts WHERE source_table = ?1 AND NOT EXISTS \
                     (SELECT 1 FROM {table} o WHERE o.{id} = outboxd_relay_attempts.row_id AND {pending})"
                ),
            },
        }
    }
}

/// A claimed row; only an id that cannot be read fails the claim (the row could not even
/// be named), any other unreadable column makes the row a dead row.
fn decode(r: &SqliteRow) -> Result<ClaimedRow, StoreError> {
    let mut c = Lenient::new(r);
    let row = ClaimedRow::new(&Columns {
        id: r.try_get(0)?,
        key: c.get(1, "key_column"),
        payload: c.get(2, "payload_column"),
        headers: c.get(3, "headers_column"),
        event_id: c.get(4, "event_id_column"),
        event_type: c.get(5, "event_type_column"),
        aggregate_type: c.get(6, "aggregate_type_column"),
        created_at: c.get(7, "created_at_column"),
        topic: c.get(8, "topic_column"),
        header_columns: c.get(9, "header_columns"),
    });
    Ok(c.finish(row))
}

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
        let database_file = sqlite_lock::database_file(opts.get_filename());
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
        Ok(sqlite_lock::try_lock(path, &self.config.table)?.map(Some))
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
