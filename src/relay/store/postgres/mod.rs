//! PostgreSQL: lanes and members through session-level advisory locks, claims on the
//! lane's connections (sessions in `lane`, statements in `statements`), wake-up through
//! LISTEN.

mod lane;
mod statements;

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{ConnectOptions, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::TableConfig;

use super::{
    random_slot, stable_hash, LaneOwner, LaneSession, Membership, NewEvent, Store, StoreError,
};
use lane::{LaneKeys, PgLane};
use statements::{cleanup_attempts, introspect, purge, q, quote_table, stats, TableSql};

/// Tries the session-level advisory lock `(class, object)` on `conn`.
async fn try_lock(conn: &mut PgConnection, class: i32, object: i32) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(class)
        .bind(object)
        .fetch_one(&mut *conn)
        .await?)
}

/// Advisory lock classes (first key) of a table: its lanes, its members, and the claims of
/// lane followers.
fn lock_classes(table: &str) -> (i32, i32, i32) {
    (
        stable_hash(&format!("outboxd:lane:{table}")),
        stable_hash(&format!("outboxd:member:{table}")),
        stable_hash(&format!("outboxd:claim:{table}")),
    )
}

/// One outbox table in PostgreSQL.
pub struct PgStore {
    config: TableConfig,
    sql: Arc<TableSql>,
    opts: PgConnectOptions,
    pool: PgPool,
    lane_class: i32,
    member_class: i32,
    claim_class: i32,
}

impl PgStore {
    /// Checks table `t` and renders its statements.
    pub async fn open(
        opts: PgConnectOptions,
        pool: PgPool,
        t: &TableConfig,
    ) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        let shape = introspect(&mut conn, t).await?;
        let (lane_class, member_class, claim_class) = lock_classes(&t.table);
        Ok(PgStore {
            config: t.clone(),
            sql: Arc::new(TableSql::new(t, &shape)),
            opts,
            pool,
            lane_class,
            member_class,
            claim_class,
        })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn join(&self) -> Result<Box<dyn Membership>, StoreError> {
        let mut conn = self.opts.connect().await?;
        while !try_lock(&mut conn, self.member_class, random_slot()).await? {}
        Ok(Box::new(PgMembership {
            conn,
            classes: [self.lane_class, self.member_class],
        }))
    }

    async fn acquire_lane(&self, lane: u32) -> Result<Option<Box<dyn LaneSession>>, StoreError> {
        let mut conn = self.opts.connect().await?;
        if !try_lock(&mut conn, self.lane_class, lane as i32).await? {
            return Ok(None);
        }
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        let keys = LaneKeys {
            opts: self.opts.clone(),
            table: self.config.table.clone(),
            lane,
            lane_class: self.lane_class,
            claim_class: self.claim_class,
            prefetch: self.config.prefetch,
        };
        Ok(Some(Box::new(PgLane::leader(
            conn,
            pid,
            self.sql.clone(),
            keys,
        ))))
    }

    async fn stats(&self) -> Result<(i64, Option<f64>), StoreError> {
        stats(&self.pool, &self.sql).await
    }

    async fn purge(&self, retention_secs: f64) -> Result<u64, StoreError> {
        purge(&self.pool, &self.sql, retention_secs).await
    }

    async fn cleanup_attempts(&self) -> Result<u64, StoreError> {
        cleanup_attempts(&self.pool, &self.sql).await
    }

    async fn dead_rows(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outboxd_dead_rows WHERE source_table = $1")
                .bind(&self.config.table)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn lane_owners(&self) -> Result<Vec<LaneOwner>, StoreError> {
        let rows = sqlx::query(
            "SELECT l.objid::int8, a.pid::int8, a.client_addr::text, a.application_name \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::int8::oid \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1",
        )
        .bind(i64::from(self.lane_class))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| LaneOwner {
                lane: r.get(0),
                pid: r.get(1),
                client: r.get(2),
                application: r.get(3),
            })
            .collect())
    }

    async fn listen(&self, wake: watch::Sender<()>, stop: CancellationToken) {
        if self.config.notify_channel.is_empty() {
            return;
        }
        crate::relay::notify::listen(
            self.opts.clone(),
            self.config.table.clone(),
            self.config.notify_channel.clone(),
            wake,
            stop,
        )
        .await;
    }
}

/// The member lock, held on its own connection.
struct PgMembership {
    conn: PgConnection,
    classes: [i32; 2],
}

#[async_trait]
impl Membership for PgMembership {
    async fn census(&mut self, _lanes: u32) -> Result<(u32, HashSet<u32>), StoreError> {
        let [lane_class, member_class] = self.classes;
        let rows = sqlx::query(
            "SELECT classid::int8, objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid IN ($1::int8::oid, $2::int8::oid)",
        )
        .bind(i64::from(lane_class))
        .bind(i64::from(member_class))
        .fetch_all(&mut self.conn)
        .await?;
        let held: Vec<(i32, i32)> = rows
            .iter()
            .map(|r| (r.get::<i64, _>(0) as i32, r.get::<i64, _>(1) as i32))
            .collect();
        let members = held.iter().filter(|(c, _)| *c == member_class).count() as u32;
        let taken = held
            .iter()
            .filter(|(c, _)| *c == lane_class)
            .map(|(_, lane)| *lane as u32)
            .collect();
        Ok((members.max(1), taken))
    }
}

/// Inserts `event` into table `t` through its column mapping; returns the new row's id.
/// Values are cast from text to each column's own type.
pub async fn emit(
    opts: &PgConnectOptions,
    t: &TableConfig,
    event: &NewEvent<'_>,
) -> Result<String, StoreError> {
    let mut conn = opts.connect().await?;
    introspect(&mut conn, t).await?;
    let headers = serde_json::Value::Object(event.headers.clone()).to_string();
    let columns = event.columns(t, &headers);
    let table = quote_table(&t.table);
    let mut types = Vec::new();
    for (column, _) in &columns {
        let ty: String = sqlx::query_scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2",
        )
        .bind(&table)
        .bind(column)
        .fetch_one(&mut conn)
        .await?;
        types.push(ty);
    }
    let names: Vec<String> = columns.iter().map(|(c, _)| q(c)).collect();
    let values: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::text::{ty}", i + 1))
        .collect();
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({}) RETURNING {}::text",
        names.join(", "),
        values.join(", "),
        q(&t.id_column)
    );
    let mut query = sqlx::query_scalar(&sql);
    for (_, value) in &columns {
        query = query.bind(*value);
    }
    Ok(query.fetch_one(&mut conn).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_classes_are_stable_and_distinct() {
        let (a, b, c) = lock_classes("outbox");
        assert_eq!((a, b, c), lock_classes("outbox"));
        assert!(a != b && b != c && a != c);
        assert!(a >= 0 && b >= 0 && c >= 0);
        assert_ne!(lock_classes("other").0, a);
    }
}
