//! Cursor mode on PostgreSQL: rows are never changed; each lane keeps its position in
//! `outboxd_relay_cursors` and publishes the rows after it in the order of the
//! transactions that wrote them.
//!
//! A row is taken only once every transaction that could still write a row before it has
//! ended: only rows written by transactions older than the claim snapshot's `xmin` (the
//! oldest transaction still running), ordered by that transaction's id, then by the order
//! column. Every transaction that ends later has an id at or above that `xmin`, so its
//! rows come after every row taken so far, whatever order values it drew and whenever it
//! commits: no row is passed over. Row transaction ids are the 32-bit `xmin`, widened to
//! 64 bits against the snapshot's; a row too old to be told apart (frozen, more than 2^31
//! transactions back) sorts first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::statements::{decode, move_dead, q, quote_table, record_refusals, TableSql};
use crate::config::TableConfig;
use crate::relay::store::{
    position_after, ClaimedRow, LaneSession, Position, Settled, Settlement, StoreError,
};

/// `$1 = table`: attempt counters untouched for a day. In cursor mode a published row
/// stays in the table, so a counter cannot go with its row; a row still being retried
/// touches its counter far more often than that.
pub(super) const CLEANUP_ATTEMPTS: &str = "DELETE FROM outboxd_relay_attempts \
     WHERE source_table = $1 AND updated_at < now() - interval '1 day'";

/// `$1 = table, $2 = lanes, $3 = lane, $4 = xid, $5 = order value, $6 = highest order
/// value published`.
const ADVANCE: &str =
    "INSERT INTO outboxd_relay_cursors (source_table, lanes, lane, xid, position, high) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (source_table, lanes, lane) DO UPDATE \
     SET xid = EXCLUDED.xid, position = EXCLUDED.position, \
     high = greatest(outboxd_relay_cursors.high, EXCLUDED.high), updated_at = now()";

/// The rows after the lanes' positions, for the backlog gauge: those whose order value is
/// above the lowest highest one any lane published (every row while a lane has none).
pub(super) fn pending_sql(t: &TableConfig) -> String {
    format!(
        "o.{ord} > coalesce((SELECT CASE WHEN count(*) = {lanes} THEN min(high) END \
         FROM outboxd_relay_cursors WHERE source_table = '{table}' AND lanes = {lanes}), \
         -9223372036854775808)",
        ord = q(t.order_column()),
        lanes = t.lanes,
        // Validation restricted the name to letters, digits, `_`, `$` and one `.`.
        table = t.table,
    )
}

/// The claim of lane `lane` (`$1 = limit, $2 = table, $3 = lanes, $4 = lane`): the rows
/// after its position, or, when the lane has none yet but the table ran with another lane
/// count, after the lowest position of those (rows may then go out twice, none is
/// skipped); from the start otherwise.
pub(super) fn claim_sql(t: &TableConfig, sql: &TableSql, lane: u32) -> String {
    format!(
        "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS x, \
                    pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS xmax), \
         p AS (SELECT xid, position FROM ( \
                 SELECT xid, position, 0 AS pref FROM outboxd_relay_cursors \
                 WHERE source_table = $2 AND lanes = $3 AND lane = $4 \
                 UNION ALL SELECT xid, position, 1 FROM outboxd_relay_cursors \
                 WHERE source_table = $2 AND lanes <> $3) c \
               ORDER BY pref, xid, position LIMIT 1), \
         b AS (SELECT coalesce((SELECT xid FROM p), -1) AS xid, \
                      coalesce((SELECT position FROM p), -9223372036854775808) AS position) \
         SELECT {returning}, v.xid AS outboxd_xid \
         FROM {table} o CROSS JOIN s CROSS JOIN b CROSS JOIN LATERAL ( \
           SELECT CASE WHEN w.back BETWEEN 1 AND 2147483648 THEN s.x - w.back \
                       WHEN w.back = 0 OR 4294967296 - w.back < s.xmax - s.x THEN NULL \
                       ELSE 0 END AS xid \
           FROM (SELECT ((s.x % 4294967296) - o.xmin::text::int8 + 4294967296) % 4294967296 AS back) w) v \
         WHERE v.xid IS NOT NULL AND (v.xid, o.{ord}::int8) > (b.xid, b.position){lane} \
         ORDER BY v.xid, o.{ord} LIMIT $1",
        returning = sql.returning,
        table = quote_table(&t.table),
        ord = q(t.order_column()),
        lane = sql.lane_filter(lane),
    )
}

/// A cursor-mode lane: its claims are plain reads, and its position advances in one short
/// transaction once the batch is published.
pub(super) struct CursorLane {
    pub(super) conn: PgConnection,
    pub(super) sql: Arc<TableSql>,
    pub(super) claim: String,
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
        let mut stream = sqlx::query(&self.claim)
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
