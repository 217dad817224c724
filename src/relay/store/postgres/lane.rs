//! A PostgreSQL lane's sessions: the leader, which holds the lane's advisory lock and
//! claims on that connection, and its follower, which claims the next batch on a second
//! connection while the leader's batch is sent and acknowledged.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::statements::{claim, finish, move_dead, record_refusals, Bound, TableSql};
use crate::relay::store::{
    ClaimedRow, Handoff, LaneSession, PairedSession, Settled, Settlement, StoreError,
};

/// A new lane owner's fence: true once no follower claim of an earlier owner is open
/// (the claim lock `$1`, `$2` can be taken exclusively; it is released at once).
const LEADER_FENCE: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1, $2) THEN pg_advisory_unlock($1, $2) ELSE false END";

/// Whether `snapshot` is a snapshot name as PostgreSQL makes them (hex digits and
/// dashes), safe to write into a statement.
fn plain_snapshot(snapshot: &str) -> bool {
    !snapshot.is_empty() && snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// What the sessions of one lane share.
pub(super) struct LaneKeys {
    pub(super) table: String,
    pub(super) lane: u32,
    pub(super) lane_class: i32,
    pub(super) claim_class: i32,
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
    /// Holds the lane lock.
    Leader { fence: Fence },
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
pub(super) struct PgLane {
    conn: PgConnection,
    claim: String,
    claim_after: String,
    claim_around: String,
    /// The order value of the last row claimed in the open transaction (integer order).
    last_ord: Option<i64>,
    /// The snapshot the open transaction exported when it began in a handed-over one, for
    /// the next hand-over.
    exported: Option<String>,
    /// The handed-over snapshot of a transaction begun by `prepare_follow` and not yet
    /// used by `follow`.
    prepared: Option<String>,
    sql: Arc<TableSql>,
    keys: Arc<LaneKeys>,
    role: Role,
}

impl PgLane {
    /// The session holding the lane lock on `conn`; it claims nothing
    /// until every follower claim of an earlier owner has ended.
    pub(super) fn leader(conn: PgConnection, sql: Arc<TableSql>, keys: LaneKeys) -> Self {
        PgLane {
            conn,
            claim: sql.claim_for_lane(keys.lane),
            claim_after: sql.claim_after_for_lane(keys.lane),
            claim_around: sql.claim_around_for_lane(keys.lane),
            last_ord: None,
            exported: None,
            prepared: None,
            sql,
            keys: Arc::new(keys),
            role: Role::Leader {
                fence: Fence::Closed { told: false },
            },
        }
    }

    /// A follower for the leader with backend pid `leader` (`self`), on `conn`: it claims
    /// for the leader while the leader's batch waits for Kafka, and they swap roles after
    /// each prefetched batch.
    pub(super) fn follower(&self, conn: PgConnection, leader: i32) -> PgLane {
        PgLane {
            conn,
            claim: self.claim.clone(),
            claim_after: self.claim_after.clone(),
            claim_around: self.claim_around.clone(),
            last_ord: None,
            exported: None,
            prepared: None,
            sql: self.sql.clone(),
            keys: self.keys.clone(),
            role: Role::Follower { leader },
        }
    }

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
    /// A follower's claim transaction holds the lane's claim lock in shared mode until it
    /// ends, then checks that its leader still holds the lane lock.
    ///
    /// A session given a `snapshot` (its leader's, see [`LaneSession::handoff`]) sees the
    /// outbox as its leader does: rows committed after the leader's snapshot are left for a
    /// later batch together with every later row of their key, as the leader leaves them.
    /// It exports that snapshot again at once, for the hand-over after its own claim (the
    /// leader's export ends with the leader's transaction).
    ///
    /// Beginning, importing, checking and exporting go as one simple query: one round trip
    /// (which `prepare_follow` takes off the lane's critical path). Every value written into
    /// it is an integer or a snapshot name checked by [`plain_snapshot`].
    async fn begin(&mut self, claim: bool, snapshot: Option<&str>) -> Result<(), StoreError> {
        self.release().await?;
        self.exported = None;
        if !claim {
            return self.run("BEGIN").await;
        }
        let leader = match self.role {
            Role::Follower { leader } => Some(leader),
            Role::Leader { .. } => None,
        };
        if leader.is_none() && snapshot.is_none() {
            return self.run("BEGIN ISOLATION LEVEL REPEATABLE READ").await;
        }
        let mut statement = String::from("BEGIN ISOLATION LEVEL REPEATABLE READ; ");
        if let Some(snapshot) = snapshot {
            statement.push_str(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'; "));
        }
        let k = self.keys.clone();
        let (held, from) = match leader {
            Some(pid) => (
                format!(
                    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND objsubid = 2 AND classid = {}::int8::oid AND objid = {}::int8::oid \
                     AND pid = {pid} \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                    k.lane_class, k.lane
                ),
                format!(
                    " FROM pg_advisory_xact_lock_shared({}, {})",
                    k.claim_class, k.lane as i32
                ),
            ),
            None => ("true".to_owned(), String::new()),
        };
        let export = if snapshot.is_some() {
            "pg_export_snapshot()"
        } else {
            "NULL::text"
        };
        statement.push_str(&format!("SELECT {held}, {export}{from}"));
        // Without arguments, sqlx sends a statement as a simple query.
        let row = sqlx::Executor::fetch_one(&mut self.conn, statement.as_str()).await?;
        if !row.try_get::<bool, _>(0)? {
            self.run("ROLLBACK").await?;
            return Err(StoreError::LaneLost {
                table: k.table.clone(),
                lane: k.lane,
            });
        }
        self.exported = row
            .try_get::<Option<String>, _>(1)?
            .filter(|s| plain_snapshot(s));
        Ok(())
    }

    /// A new claim: begins a claim transaction and claims, unless the fence is closed.
    async fn claim_within(
        &mut self,
        limit: u32,
        bound: Bound<'_>,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        self.begin(true, None).await?;
        if !self.fence_open().await? {
            self.last_ord = None;
            return Ok(Vec::new());
        }
        let statement = match bound {
            Bound::None => &self.claim,
            Bound::After(_) => &self.claim_after,
            Bound::Around(_) => &self.claim_around,
        };
        let (rows, last) = claim(&mut self.conn, statement, limit, bound).await?;
        self.last_ord = last;
        Ok(rows)
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
                "waiting for the claims of the lane's previous owner to end before claiming"
            );
        }
        Ok(open)
    }
}

#[async_trait]
impl LaneSession for PgLane {
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        self.claim_within(limit, Bound::None).await
    }

    fn claims_in_chunks(&self) -> bool {
        self.sql.ord_is_integer
    }

    /// The rows after the last one claimed, in the same transaction.
    async fn claim_more(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        let Some(after) = self.last_ord else {
            return Ok(Vec::new());
        };
        let (rows, last) = claim(
            &mut self.conn,
            &self.claim_after,
            limit,
            Bound::After(after),
        )
        .await?;
        self.last_ord = last.or(self.last_ord);
        Ok(rows)
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        self.exported = None;
        self.prepared = None;
        self.run("COMMIT").await
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        self.exported = None;
        self.prepared = None;
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
}

#[async_trait]
impl PairedSession for PgLane {
    /// The lane's first rows of other keys than `keys`. The rows of `keys` a batch in
    /// flight holds are filtered out before they are locked, so this claim never meets
    /// them, however that batch ends meanwhile.
    async fn claim_around(
        &mut self,
        limit: u32,
        keys: &[&str],
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        self.claim_within(limit, Bound::Around(keys)).await
    }

    /// The open claim's snapshot (exported until the claim ends) and its last order value,
    /// so the follower starts right after this claim instead of passing over the index
    /// entries of every row it holds. Only with an integer order column, and only a
    /// snapshot name made of the characters PostgreSQL uses (it goes into a statement). A
    /// claim that began in a handed-over snapshot exported it already.
    async fn handoff(&mut self) -> Result<Option<Handoff>, StoreError> {
        let Some(after) = self.last_ord else {
            return Ok(None);
        };
        let snapshot = match self.exported.take() {
            Some(snapshot) => snapshot,
            None => {
                sqlx::query_scalar("SELECT pg_export_snapshot()")
                    .fetch_one(&mut self.conn)
                    .await?
            }
        };
        Ok(plain_snapshot(&snapshot).then_some(Handoff { snapshot, after }))
    }

    /// Opens a claim in the leader's snapshot that goes on after the leader's claim: the
    /// rows the leader holds lie before `after`, and every row claimed after it was pending
    /// in the leader's view. A transaction prepared in that snapshot is used as it is.
    ///
    /// The lane's leader session follows its own follower after they swapped roles; like
    /// any claim of a leader, it claims nothing before its fence opened (by then it has).
    async fn follow(&mut self, handoff: &Handoff) -> Result<Option<String>, StoreError> {
        if self.prepared.as_deref() == Some(handoff.snapshot.as_str()) {
            self.prepared = None;
        } else {
            self.begin(true, Some(&handoff.snapshot)).await?;
        }
        self.last_ord = if self.fence_open().await? {
            Some(handoff.after)
        } else {
            None
        };
        Ok(self.exported.clone())
    }

    /// Begins the next follow's transaction in `snapshot` (the current follower's, exported
    /// while it claims), off the lane's critical path. On failure the transaction is rolled
    /// back, and `follow` begins its own.
    async fn prepare_follow(&mut self, snapshot: &str) {
        if !plain_snapshot(snapshot) {
            return;
        }
        match self.begin(true, Some(snapshot)).await {
            Ok(()) => self.prepared = Some(snapshot.to_owned()),
            Err(e) => {
                tracing::debug!(
                    error = %e,
                    "could not prepare the next follow; it will begin its own transaction"
                );
                self.exported = None;
                let _ = self.run("ROLLBACK").await;
            }
        }
    }

    async fn release(&mut self) -> Result<(), StoreError> {
        if self.prepared.take().is_some() {
            self.exported = None;
            self.run("ROLLBACK").await?;
        }
        Ok(())
    }
}
