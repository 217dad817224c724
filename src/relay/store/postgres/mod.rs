//! PostgreSQL: lanes and members through session-level advisory locks, claims on the
//! lane's connections (statements in `statements`), wake-up through LISTEN.

mod statements;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{ConnectOptions, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::TableConfig;

use super::{
    random_slot, stable_hash, ClaimedRow, Handoff, LaneOwner, LaneSession, Membership, NewEvent,
    Settled, Settlement, Store, StoreError,
};
use statements::{
    claim, cleanup_attempts, finish, introspect, move_dead, purge, q, quote_table, record_refusals,
    stats, TableSql,
};

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

/// A follower's claim transaction begins here: it holds the lane's claim lock (class `$1`,
/// lane `$2`) in shared mode until it ends, then checks that its leader (backend pid `$5`)
/// still holds the lane lock (class `$3`, lane `$4`).
const FOLLOWER_GUARD: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
     AND objsubid = 2 AND classid = $3::int8::oid AND objid = $4::int8::oid AND pid = $5 \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) \
     FROM pg_advisory_xact_lock_shared($1, $2)";

/// A new lane owner's fence: true once no follower claim of an earlier owner is open
/// (the claim lock `$1`, `$2` can be taken exclusively; it is released at once).
const LEADER_FENCE: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1, $2) THEN pg_advisory_unlock($1, $2) ELSE false END";

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
        Ok(Some(Box::new(PgLane {
            conn,
            claim: self.sql.claim_for_lane(lane),
            claim_after: self.sql.claim_after_for_lane(lane),
            last_ord: None,
            sql: self.sql.clone(),
            keys: Arc::new(LaneKeys {
                opts: self.opts.clone(),
                table: self.config.table.clone(),
                lane,
                lane_class: self.lane_class,
                claim_class: self.claim_class,
                prefetch: self.config.prefetch,
            }),
            role: Role::Leader {
                pid,
                fence: Fence::Closed { told: false },
            },
        })))
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

/// What the sessions of one lane share.
struct LaneKeys {
    /// For the follower's connection.
    opts: PgConnectOptions,
    table: String,
    lane: u32,
    lane_class: i32,
    claim_class: i32,
    /// Whether the leader offers a follower.
    prefetch: bool,
}

/// A lane session's part in keeping claims of different owners apart.
///
/// The leader holds the lane lock on its connection, so its own claims need nothing more.
/// A follower's claims are safe only while that connection lives: each of its transactions
/// holds the claim lock in shared mode and checks the leader first. A new owner, before its
/// first claim, waits until it could take the claim lock exclusively: by then every follower
/// claim of an earlier owner has ended, and later ones find their leader gone. Without this,
/// a follower's claim could make a new owner skip its rows and publish later ones first.
enum Role {
    /// Holds the lane lock; `pid` is its backend.
    Leader { pid: i32, fence: Fence },
    /// Claims for the leader with backend pid `leader`.
    Follower { leader: i32 },
}

/// Whether a new leader has seen the claims of earlier owners end.
enum Fence {
    /// Not yet; `told` once the wait was logged.
    Closed { told: bool },
    /// Yes: the leader claims freely from now on.
    Open,
}

/// A lane: its advisory lock and its claim transactions, on one connection (the leader),
/// or claims for the leader on a second one (the follower).
struct PgLane {
    conn: PgConnection,
    claim: String,
    claim_after: String,
    /// The order value of the last row claimed in the open transaction (integer order).
    last_ord: Option<i64>,
    sql: Arc<TableSql>,
    keys: Arc<LaneKeys>,
    role: Role,
}

impl PgLane {
    async fn run(&mut self, statement: &str) -> Result<(), StoreError> {
        sqlx::Executor::execute(&mut self.conn, statement).await?;
        Ok(())
    }

    /// Begins a transaction; in a follower, first checks that its leader still holds the
    /// lane.
    ///
    /// A claim transaction is REPEATABLE READ: every chunk of a batch then sees the rows
    /// the first one saw. Under READ COMMITTED a later chunk (which starts after the last
    /// row claimed) would see rows committed meanwhile: a row whose id was taken before that
    /// point and committed late would be left for a later batch, while a later row of its
    /// key, committed just after it, went out in this one. The lane's rows are changed only
    /// by the lane's own sessions, so the serialization failures this level can raise do not
    /// occur unless something else updates or deletes pending rows; the lane then fails and
    /// is taken again.
    ///
    /// A follower given a `snapshot` (its leader's, see [`LaneSession::handoff`]) sees the
    /// outbox as its leader does: rows committed after the leader's snapshot are left for a
    /// later batch together with every later row of their key, as the leader leaves them.
    async fn begin(&mut self, claim: bool, snapshot: Option<&str>) -> Result<(), StoreError> {
        match (claim, snapshot) {
            (false, _) => self.run("BEGIN").await?,
            (true, None) => self.run("BEGIN ISOLATION LEVEL REPEATABLE READ").await?,
            // A statement without arguments goes as one simple query: one round trip.
            (true, Some(snapshot)) => {
                self.run(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
                ))
                .await?
            }
        }
        let Role::Follower { leader } = self.role else {
            return Ok(());
        };
        let k = self.keys.clone();
        let held: bool = sqlx::query_scalar(FOLLOWER_GUARD)
            .bind(k.claim_class)
            .bind(k.lane as i32)
            .bind(i64::from(k.lane_class))
            .bind(i64::from(k.lane))
            .bind(leader)
            .fetch_one(&mut self.conn)
            .await?;
        if !held {
            self.run("ROLLBACK").await?;
            return Err(StoreError::LaneLost {
                table: k.table.clone(),
                lane: k.lane,
            });
        }
        Ok(())
    }

    /// Whether this session may claim: always, except for a new leader while a follower
    /// claim of an earlier owner is still open.
    async fn fence_open(&mut self) -> Result<bool, StoreError> {
        let Role::Leader { fence, .. } = &mut self.role else {
            return Ok(true);
        };
        let Fence::Closed { told } = fence else {
            return Ok(true);
        };
        let k = &self.keys;
        let open: bool = sqlx::query_scalar(LEADER_FENCE)
            .bind(k.claim_class)
            .bind(k.lane as i32)
            .fetch_one(&mut self.conn)
            .await?;
        if open {
            *fence = Fence::Open;
        } else if !*told {
            *told = true;
            tracing::info!(
                table = %k.table,
                lane = k.lane,
                "waiting for the claims of the lane's previous owner to end before claiming"
            );
        }
        Ok(open)
    }
}

#[async_trait]
impl LaneSession for PgLane {
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        self.begin(true, None).await?;
        if !self.fence_open().await? {
            self.last_ord = None;
            return Ok(Vec::new());
        }
        let (rows, last) = claim(&mut self.conn, &self.claim, limit, None).await?;
        self.last_ord = last;
        Ok(rows)
    }

    fn claims_in_chunks(&self) -> bool {
        self.sql.ord_is_integer
    }

    /// The rows after the last one claimed, in the same transaction.
    async fn claim_more(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        let Some(after) = self.last_ord else {
            return Ok(Vec::new());
        };
        let (rows, last) = claim(&mut self.conn, &self.claim_after, limit, Some(after)).await?;
        self.last_ord = last.or(self.last_ord);
        Ok(rows)
    }

    /// The open claim's snapshot (exported until the claim ends) and its last order value,
    /// so the follower starts right after this claim instead of passing over the index
    /// entries of every row it holds. Only with an integer order column, and only a
    /// snapshot name made of the characters PostgreSQL uses (it goes into a statement).
    async fn handoff(&mut self) -> Result<Option<Handoff>, StoreError> {
        let Some(after) = self.last_ord else {
            return Ok(None);
        };
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut self.conn)
            .await?;
        let plain = snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        Ok(plain.then_some(Handoff { snapshot, after }))
    }

    /// Opens a claim in the leader's snapshot that goes on after the leader's claim: the
    /// rows the leader holds lie before `after`, and every row claimed after it was pending
    /// in the leader's view.
    async fn follow(&mut self, handoff: &Handoff) -> Result<(), StoreError> {
        self.begin(true, Some(&handoff.snapshot)).await?;
        self.last_ord = Some(handoff.after);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        self.run("COMMIT").await
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        self.run("ROLLBACK").await
    }

    async fn settle(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.begin(false, None).await?;
        let settled = async {
            finish(&mut self.conn, &self.sql, s.finished).await?;
            let counts: HashMap<String, i32> =
                record_refusals(&mut self.conn, &self.sql, s.refused)
                    .await?
                    .into_iter()
                    .collect();
            let (dead, still_refused) = s.dead_rows(&counts);
            let moved = move_dead(&mut self.conn, &self.sql, &dead).await?;
            Ok::<_, StoreError>(Settled {
                dead,
                moved,
                still_refused,
            })
        }
        .await;
        match settled {
            Ok(settled) => {
                self.run("COMMIT").await?;
                Ok(settled)
            }
            Err(e) => {
                // The connection may be gone; the lane then ends and its lock with it.
                let _ = self.run("ROLLBACK").await;
                Err(e)
            }
        }
    }

    async fn follower(&mut self) -> Result<Option<Box<dyn LaneSession>>, StoreError> {
        let Role::Leader { pid, .. } = self.role else {
            return Ok(None);
        };
        if !self.keys.prefetch {
            return Ok(None);
        }
        Ok(Some(Box::new(PgLane {
            conn: self.keys.opts.connect().await?,
            claim: self.claim.clone(),
            claim_after: self.claim_after.clone(),
            last_ord: None,
            sql: self.sql.clone(),
            keys: self.keys.clone(),
            role: Role::Follower { leader: pid },
        })))
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
