//! Cursor mode on PostgreSQL: rows are never changed; each lane keeps its position in
//! `outboxd_relay_cursors` and publishes the rows after it in the order of the
//! transactions that wrote them.
//!
//! A row is taken only once every transaction that could still write a row before it has
//! ended: only rows written by transactions older than the claim snapshot's `xmin` (the
//! oldest transaction still running), ordered by that transaction's id, then by the order
//! column. Every transaction that ends later has an id at or above that `xmin`, so its
//! rows come after every row taken so far, whatever order values it drew and whenever it
//! commits: no row is passed over.
//!
//! A row's transaction id is its `xid_column` where the table has one (`xid8 DEFAULT
//! pg_current_xact_id()`): a claim is then one range of an index on `(xid_column, order
//! column)` and costs what its batch costs. Without the column it is the row's 32-bit
//! `xmin`, widened to 64 bits against the snapshot's, and every claim reads the whole lane;
//! rows written before the column was added (NULL) are read that way too, until none is
//! left after the lane's position (and again whenever a later probe finds one). Both are
//! full transaction ids, so a lane's position holds across adding the column.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::statements::{decode, move_dead, q, quote_table, record_refusals, TableSql};
use crate::config::TableConfig;
use crate::relay::store::{
    position_after, ClaimedRow, LaneSession, Position, Settled, Settlement, StoreError,
};

/// How often a lane whose claims read the index alone looks for rows with a NULL
/// transaction-id column after its position.
pub(super) const LEGACY_RECHECK: Duration = Duration::from_secs(60);

/// `$1 = table, $2 = lanes, $3 = lane, $4 = xid, $5 = order value, $6 = highest order
/// value published`.
const ADVANCE: &str =
    "INSERT INTO outboxd_relay_cursors (source_table, lanes, lane, xid, position, high) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (source_table, lanes, lane) DO UPDATE \
     SET xid = EXCLUDED.xid, position = EXCLUDED.position, \
     high = greatest(outboxd_relay_cursors.high, EXCLUDED.high), updated_at = now()";

/// The claims of one lane (`$1 = limit, $2 = table, $3 = lanes, $4 = lane`): the rows
/// after its position, or, when the lane has none yet but the table ran with another lane
/// count, after the lowest position of those (rows may then go out twice, none is
/// skipped); from the start otherwise.
pub(super) struct Claims {
    /// The claim of the lane's next rows.
    pub(super) claim: String,
    /// With a transaction-id column, while rows written before the column existed (NULL)
    /// may still lie after the lane's position.
    pub(super) legacy: Option<Legacy>,
}

/// The claims of a table whose transaction-id column came after some of its rows.
pub(super) struct Legacy {
    /// The claim over both kinds of row: NULL ones by their `xmin`, the others by the
    /// column.
    pub(super) claim: String,
    /// One NULL row after the lane's position or written by a transaction still running,
    /// if any (same parameters, `$1 = 1`).
    pub(super) probe: String,
}

impl Claims {
    /// Renders the claims of lane `lane` of table `t`.
    pub(super) fn new(t: &TableConfig, sql: &TableSql, lane: u32) -> Self {
        let parts = Parts {
            table: quote_table(&t.table),
            ord: q(t.order_column()),
            returning: &sql.returning,
            lane: sql.lane_filter(lane),
            lane_case: sql.lane_case(lane),
        };
        let Some(xid) = t.xid_column.as_ref().map(|c| q(c)) else {
            return Claims {
                claim: format!("{PLACE} {}", parts.by_row_xmin("")),
                legacy: None,
            };
        };
        let legacy = format!(" AND o.{xid} IS NULL");
        Claims {
            claim: format!("{PLACE} {}", parts.by_column(&xid)),
            legacy: Some(Legacy {
                claim: format!(
                    "{PLACE} SELECT * FROM (({}) UNION ALL ({})) u \
                     ORDER BY outboxd_xid, outboxd_ord LIMIT $1",
                    parts.by_row_xmin(&legacy),
                    parts.by_column(&xid),
                ),
                probe: format!("{PLACE} {}", parts.null_after(&xid)),
            }),
        }
    }
}

/// The common table expressions of every claim: `s`, the claim snapshot's horizon (`x8`
/// as xid8, `x` and `xmax` as int8); `b`, the lane's position (`xid`, `position`).
const PLACE: &str = "WITH s AS (SELECT pg_snapshot_xmin(c.snap) AS x8, \
                pg_snapshot_xmin(c.snap)::text::int8 AS x, \
                pg_snapshot_xmax(c.snap)::text::int8 AS xmax \
              FROM (SELECT pg_current_snapshot() AS snap) c), \
     p AS (SELECT xid, position FROM ( \
             SELECT xid, position, 0 AS pref FROM outboxd_relay_cursors \
             WHERE source_table = $2 AND lanes = $3 AND lane = $4 \
             UNION ALL SELECT xid, position, 1 FROM outboxd_relay_cursors \
             WHERE source_table = $2 AND lanes <> $3) c \
           ORDER BY pref, xid, position LIMIT 1), \
     b AS (SELECT coalesce((SELECT xid FROM p), -1) AS xid, \
                  coalesce((SELECT position FROM p), -9223372036854775808) AS position)";

/// The pieces a claim statement is made of.
struct Parts<'a> {
    table: String,
    ord: String,
    returning: &'a str,
    lane: String,
    /// The lane filter as the index range needs it.
    lane_case: String,
}

impl Parts<'_> {
    /// The rows after the position by their `xmin`, widened to 64 bits against the
    /// snapshot's (a row too old to be told apart, frozen or more than 2^31 transactions
    /// back, sorts first), that also match `filter`. Reads every row of the lane.
    fn by_row_xmin(&self, filter: &str) -> String {
        format!(
            "SELECT {returning}, v.xid AS outboxd_xid \
             FROM {table} o CROSS JOIN s CROSS JOIN b CROSS JOIN LATERAL ( \
               SELECT CASE WHEN w.back BETWEEN 1 AND 2147483648 THEN s.x - w.back \
                           WHEN w.back = 0 OR 4294967296 - w.back < s.xmax - s.x THEN NULL \
                           ELSE 0 END AS xid \
               FROM (SELECT ((s.x % 4294967296) - o.xmin::text::int8 + 4294967296) % 4294967296 AS back) w) v \
             WHERE v.xid IS NOT NULL AND (v.xid, o.{ord}::int8) > (b.xid, b.position){filter}{lane} \
             ORDER BY v.xid, o.{ord} LIMIT $1",
            returning = self.returning,
            table = self.table,
            ord = self.ord,
            lane = self.lane,
        )
    }

    /// A row whose transaction-id column `xid` is NULL and that lies after the position,
    /// or whose transaction is still running.
    fn null_after(&self, xid: &str) -> String {
        format!(
            "SELECT 1 FROM {table} o CROSS JOIN s CROSS JOIN b CROSS JOIN LATERAL ( \
               SELECT CASE WHEN w.back BETWEEN 1 AND 2147483648 THEN s.x - w.back \
                           WHEN w.back = 0 OR 4294967296 - w.back < s.xmax - s.x THEN NULL \
                           ELSE 0 END AS xid \
               FROM (SELECT ((s.x % 4294967296) - o.xmin::text::int8 + 4294967296) % 4294967296 AS back) w) v \
             WHERE o.{xid} IS NULL AND (v.xid IS NULL OR (v.xid, o.{ord}::int8) > (b.xid, b.position)){lane} \
             LIMIT $1",
            table = self.table,
            ord = self.ord,
            lane = self.lane,
        )
    }

    /// The rows after the position by the transaction-id column `xid`: one range of an
    /// index on `(xid, order column)`, bounded by the snapshot's horizon. A row whose
    /// column is NULL is not among them.
    fn by_column(&self, xid: &str) -> String {
        format!(
            "SELECT {returning}, o.{xid}::text::int8 AS outboxd_xid FROM {table} o \
             WHERE (o.{xid}, o.{ord}) > ((SELECT greatest(xid, 0) FROM b)::text::xid8, (SELECT position FROM b)) \
             AND o.{xid} < (SELECT x8 FROM s){lane} \
             ORDER BY o.{xid}, o.{ord} LIMIT $1",
            returning = self.returning,
            table = self.table,
            ord = self.ord,
            lane = self.lane_case,
        )
    }
}

/// A cursor-mode lane: its claims are plain reads, and its position advances in one short
/// transaction once the batch is published.
pub(super) struct CursorLane {
    pub(super) conn: PgConnection,
    pub(super) sql: Arc<TableSql>,
    /// Its claims.
    pub(super) claims: Claims,
    /// Whether claims read the NULL rows too (`claims.legacy`): until a probe finds none
    /// after the position; while they do not, a probe looks again every
    /// [`LEGACY_RECHECK`], for a row written with an explicit NULL.
    pub(super) legacy_on: bool,
    /// When the last probe ran.
    pub(super) legacy_checked: Instant,
    pub(super) table: String,
    pub(super) lanes: u32,
    pub(super) lane: u32,
    /// The rows of the last claim, with their positions, in publication order.
    pub(super) claimed: Vec<(String, Position)>,
}

impl CursorLane {
    async fn advance(&mut self, to: Position, high: i64) -> Result<(), StoreError> {
        sqlx::query(ADVANCE)
            .bind(&self.table)
            .bind(self.lanes as i32)
            .bind(self.lane as i32)
            .bind(to.xid)
            .bind(to.ord)
            .bind(high)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn run(&mut self, statement: &str) -> Result<(), StoreError> {
        sqlx::Executor::execute(&mut self.conn, statement).await?;
        Ok(())
    }
}

#[async_trait]
impl LaneSession for CursorLane {
    async fn claim(&mut self, limit: u32) -> Result<Vec<ClaimedRow>, StoreError> {
        self.claimed.clear();
        if let Some(legacy) = &self.claims.legacy {
            if self.legacy_on || self.legacy_checked.elapsed() >= LEGACY_RECHECK {
                let found = sqlx::query(&legacy.probe)
                    .bind(1_i64)
                    .bind(&self.table)
                    .bind(self.lanes as i32)
                    .bind(self.lane as i32)
                    .fetch_optional(&mut self.conn)
                    .await?
                    .is_some();
                self.legacy_checked = Instant::now();
                match (self.legacy_on, found) {
                    (true, false) => tracing::info!(
                        table = %self.table, lane = self.lane,
                        "no row without a transaction id is left after the lane's position; claims read the index alone"
                    ),
                    (false, true) => tracing::warn!(
                        table = %self.table, lane = self.lane,
                        "a row with a NULL transaction-id column (relay.tables.xid_column) lies after the lane's position: claims read the whole table again until it is published; leave the column to its default"
                    ),
                    _ => {}
                }
                self.legacy_on = found;
            }
        }
        let statement = match &self.claims.legacy {
            Some(legacy) if self.legacy_on => &legacy.claim,
            _ => &self.claims.claim,
        };
        let mut stream = sqlx::query(statement)
            .bind(i64::from(limit))
            .bind(&self.table)
            .bind(self.lanes as i32)
            .bind(self.lane as i32)
            .fetch(&mut self.conn);
        let mut rows = Vec::with_capacity(limit as usize);
        let mut claimed = Vec::with_capacity(limit as usize);
        while let Some(r) = stream.try_next().await? {
            let row = decode(&r)?;
            let position = Position {
                xid: r.try_get_unchecked(11)?,
                ord: r.try_get_unchecked(9)?,
            };
            claimed.push((row.id().to_owned(), position));
            rows.push(row);
        }
        drop(stream);
        self.claimed = claimed;
        Ok(rows)
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        let claimed = std::mem::take(&mut self.claimed);
        if let Some((to, high)) = position_after(&claimed, |_| true) {
            self.advance(to, high).await?;
        }
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), StoreError> {
        // Nothing was written; the claimed rows are kept for a settlement.
        Ok(())
    }

    async fn settle(&mut self, s: &Settlement<'_>) -> Result<Settled, StoreError> {
        self.run("BEGIN").await?;
        let settled = async {
            let counts: HashMap<String, i32> =
                record_refusals(&mut self.conn, &self.sql, s.refused)
                    .await?
                    .into_iter()
                    .collect();
            let (dead, still_refused) = s.dead_rows(&counts);
            let moved = move_dead(&mut self.conn, &self.sql, &dead).await?;
            let passed: HashSet<&str> = s
                .finished
                .iter()
                .copied()
                .chain(dead.iter().map(|d| d.id.as_str()))
                .collect();
            let claimed = std::mem::take(&mut self.claimed);
            if let Some((to, high)) = position_after(&claimed, |id| passed.contains(id)) {
                self.advance(to, high).await?;
            }
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
                let _ = self.run("ROLLBACK").await;
                Err(e)
            }
        }
    }
}
