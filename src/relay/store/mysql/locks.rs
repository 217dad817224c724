//! MySQL's lane and member locks: `GET_LOCK` names derived from `database.table` (they are
//! server-wide), member slots, the lane-count lock each member holds beside its slot, and
//! the census that reads them all in one statement.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::mysql::MySqlConnection;
use sqlx::Row;

use crate::relay::store::{random_slot, stable_hash, Census, Membership, StoreError};

/// How many relays may serve one table at once (member lock slots).
pub(super) const MEMBER_SLOTS: u32 = 64;

/// Lock names (at most 64 characters in MySQL) of one table.
#[derive(Debug, Clone)]
pub(super) struct LockNames(String);

impl LockNames {
    /// The names of table `identity` (`database.table`): `GET_LOCK` names are server-wide,
    /// so the database is part of them.
    pub(super) fn new(identity: &str) -> Self {
        LockNames(format!("outboxd:{:08x}", stable_hash(identity)))
    }
    pub(super) fn lane(&self, lane: u32) -> String {
        format!("{}:lane:{lane}", self.0)
    }
    pub(super) fn member(&self, slot: u32) -> String {
        format!("{}:member:{slot}", self.0)
    }
    /// Held by the member in `slot` that runs with `lanes`; a member slot in use without
    /// it belongs to a relay with another lane count.
    pub(super) fn lanes(&self, lanes: u32, slot: u32) -> String {
        format!("{}:lanes:{lanes}:{slot}", self.0)
    }
}

/// The table's one name on the server: `database.table`, the database being the one
/// the table names or the connection's.
pub(super) async fn identity(
    conn: &mut MySqlConnection,
    table: &str,
) -> Result<String, StoreError> {
    if table.contains('.') {
        return Ok(table.to_owned());
    }
    let database: Option<String> = sqlx::query_scalar("SELECT CAST(DATABASE() AS CHAR)")
        .fetch_one(&mut *conn)
        .await?;
    Ok(format!("{}.{table}", database.unwrap_or_default()))
}

/// Releases `name` on `conn`.
async fn release_lock(conn: &mut MySqlConnection, name: &str) -> Result<(), StoreError> {
    sqlx::query("DO RELEASE_LOCK(?)")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes `name` on `conn` without waiting; held until released or the connection ends.
pub(super) async fn get_lock(conn: &mut MySqlConnection, name: &str) -> Result<bool, StoreError> {
    let got: Option<i64> = sqlx::query_scalar("SELECT CAST(GET_LOCK(?, 0) AS SIGNED)")
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    Ok(got == Some(1))
}

/// Registers a relay running with `lanes` in a free member slot on `conn`: its lane-count
/// lock first, so that a member slot seen in use always has its own. `None` when every
/// slot is taken.
pub(super) async fn join(
    mut conn: MySqlConnection,
    locks: &LockNames,
    lanes: u32,
) -> Result<Option<MySqlMembership>, StoreError> {
    let first = random_slot() as u32;
    for i in 0..MEMBER_SLOTS {
        let slot = (first + i) % MEMBER_SLOTS;
        let count = locks.lanes(lanes, slot);
        if !get_lock(&mut conn, &count).await? {
            continue;
        }
        if get_lock(&mut conn, &locks.member(slot)).await? {
            return Ok(Some(MySqlMembership {
                conn,
                locks: locks.clone(),
            }));
        }
        release_lock(&mut conn, &count).await?;
    }
    Ok(None)
}

/// A relay's registration: its member slot and lane-count locks, on one connection.
pub(super) struct MySqlMembership {
    conn: MySqlConnection,
    locks: LockNames,
}

#[async_trait]
impl Membership for MySqlMembership {
    async fn census(&mut self, lanes: u32) -> Result<Census, StoreError> {
        let names: Vec<String> = (0..MEMBER_SLOTS)
            .map(|s| self.locks.member(s))
            .chain((0..lanes).map(|l| self.locks.lane(l)))
            .chain((0..MEMBER_SLOTS).map(|s| self.locks.lanes(lanes, s)))
            .collect();
        let sql = format!(
            "SELECT {}",
            vec!["CAST(IS_USED_LOCK(?) IS NOT NULL AS SIGNED)"; names.len()].join(", ")
        );
        let mut query = sqlx::query(&sql);
        for name in &names {
            query = query.bind(name);
        }
        let row = query.fetch_one(&mut self.conn).await?;
        let used = |i: usize| row.try_get::<i64, _>(i).map(|v| v == 1);
        let slots = MEMBER_SLOTS as usize;
        let (mut members, mut strangers) = (0, 0);
        for i in 0..slots {
            let member = used(i)?;
            members += u32::from(member);
            let same_count = used(slots + lanes as usize + i)?;
            strangers += u32::from(member && !same_count);
        }
        let mut taken = HashSet::new();
        for lane in 0..lanes {
            if used(slots + lane as usize)? {
                taken.insert(lane);
            }
        }
        Ok(Census {
            members: members.max(1),
            taken,
            other_lanes: (strangers > 0).then(|| {
                format!("{strangers} relay(s) with another lanes setting (or from an outboxd without lane-count locks)")
            }),
        })
    }
}
