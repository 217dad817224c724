//! PostgreSQL: lanes and members through session-level advisory locks, claims on the
//! lane's connections (sessions in `lane`, statements in `statements`), wake-up through
//! LISTEN.

mod cursor;
#[cfg(test)]
mod cursor_plan_tests;
mod lane;
mod statements;

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{ConnectOptions, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{OnPublished, TableConfig};

use super::{
    preflight, random_slot, stable_hash, Census, Lane, LaneOwner, Mark, Membership, NewEvent,
    Store, StoreError,
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

/// Advisory lock classes (first key) of a table, by its identity (see `TableShape`): its
/// lanes, its members, the claims of lane followers, and the lane counts its members run
/// with.
fn lock_classes(table: &str) -> LockClasses {
    LockClasses {
        lane: stable_hash(&format!("outboxd:lane:{table}")),
        member: stable_hash(&format!("outboxd:member:{table}")),
        claim: stable_hash(&format!("outboxd:claim:{table}")),
        lanes: stable_hash(&format!("outboxd:lanes:{table}")),
    }
}

/// The first keys of a table's advisory locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LockClasses {
    /// `(lane, lane number)`: the lane's owner.
    lane: i32,
    /// `(member, random slot)`: one per running relay.
    member: i32,
    /// `(claim, lane number)`: a lane follower's claim.
    claim: i32,
    /// `(lanes, lane count)`, shared: each relay's `lanes` setting.
    lanes: i32,
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
    lanes_class: i32,
    mark: Option<Mark>,
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
        let classes = lock_classes(&shape.identity);
        Ok(PgStore {
            config: t.clone(),
            sql: Arc::new(TableSql::new(t, &shape)),
            opts,
            pool,
            lane_class: classes.lane,
            member_class: classes.member,
            claim_class: classes.claim,
            lanes_class: classes.lanes,
            mark: shape.uses.mark,
        })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn join(&self) -> Result<Box<dyn Membership>, StoreError> {
        let mut conn = self.opts.connect().await?;
        // Shared: every relay with this lane count holds it; census looks for other counts.
        sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
            .bind(self.lanes_class)
            .bind(self.config.lanes as i32)
            .execute(&mut conn)
            .await?;
        while !try_lock(&mut conn, self.member_class, random_slot()).await? {}
        Ok(Box::new(PgMembership {
            conn,
            classes: [self.lane_class, self.member_class, self.lanes_class],
        }))
    }

    async fn acquire_lane(&self, lane: u32) -> Result<Option<Lane>, StoreError> {
        let mut conn = self.opts.connect().await?;
        if !try_lock(&mut conn, self.lane_class, lane as i32).await? {
            return Ok(None);
        }
        if self.config.on_published == OnPublished::Cursor {
            return Ok(Some(Lane::Single(Box::new(cursor::CursorLane {
                conn,
                claims: cursor::Claims::new(&self.config, &self.sql, lane),
                legacy_on: true,
                legacy_checked: std::time::Instant::now(),
                sql: self.sql.clone(),
                table: self.config.table.clone(),
                lanes: self.config.lanes,
                lane,
                claimed: Vec::new(),
            }))));
        }
        let keys = LaneKeys {
            table: self.config.table.clone(),
            lane,
            lane_class: self.lane_class,
            claim_class: self.claim_class,
        };
        if !self.config.prefetch {
            let leader = PgLane::leader(conn, self.sql.clone(), keys);
            return Ok(Some(Lane::Single(Box::new(leader))));
        }
        // The follower's claims name the leader's backend, so that a later owner of the
        // lane waits for them to end.
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        let leader = PgLane::leader(conn, self.sql.clone(), keys);
        let follower = leader.follower(self.opts.connect().await?, pid);
        Ok(Some(Lane::Paired(Box::new(leader), Box::new(follower))))
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

    async fn preflight(&self) -> Result<preflight::TableCheck, StoreError> {
        let names = preflight::Quoted::new(&self.config, statements::q, quote_table);
        preflight::postgres(&self.pool, &self.config, &names, self.mark).await
    }

    async fn listen(&self, wake: watch::Sender<()>, stop: CancellationToken) {
        let Some(channel) = self.config.notify_channel.clone() else {
            return;
        };
        crate::relay::notify::listen(self.opts.clone(), channel, wake, stop).await;
    }
}

/// The member lock, held on its own connection.
struct PgMembership {
    conn: PgConnection,
    /// Lane, member and lane-count classes.
    classes: [i32; 3],
}

#[async_trait]
impl Membership for PgMembership {
    async fn census(&mut self, lanes: u32) -> Result<Census, StoreError> {
        let [lane_class, member_class, lanes_class] = self.classes;
        let rows = sqlx::query(
            "SELECT classid::int8, objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid IN ($1::int8::oid, $2::int8::oid, $3::int8::oid)",
        )
        .bind(i64::from(lane_class))
        .bind(i64::from(member_class))
        .bind(i64::from(lanes_class))
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
        let mut others: Vec<i32> = held
            .iter()
            .filter(|(c, n)| *c == lanes_class && *n != lanes as i32)
            .map(|(_, n)| *n)
            .collect();
        others.sort_unstable();
        others.dedup();
        let other_lanes = (!others.is_empty()).then(|| {
            let counts: Vec<String> = others.iter().map(i32::to_string).collect();
            format!("lanes = {}", counts.join(" and "))
        });
        Ok(Census {
            members: members.max(1),
            taken,
            other_lanes,
        })
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
        let c = lock_classes("outbox");
        assert_eq!(c, lock_classes("outbox"));
        let all = [c.lane, c.member, c.claim, c.lanes];
        for (i, a) in all.iter().enumerate() {
            assert!(*a >= 0);
            assert!(all[i + 1..].iter().all(|b| b != a), "{all:?}");
        }
        assert_ne!(lock_classes("other").lane, c.lane);
        // The keys of a table in `public` are those of earlier versions, which named the
        // table as configured: `outbox` replicas of both exclude each other.
        assert_eq!(c.lane, stable_hash("outboxd:lane:outbox"));
    }
}
