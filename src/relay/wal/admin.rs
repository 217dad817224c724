//! The operator's view of WAL capture: what `check-config --connect` checks, what
//! `outboxd status` shows, and `outboxd relay drop-slot`.

use sqlx::postgres::PgConnection;

use super::source::{check_server, describe_table, drop_slot, split};
use super::WalError;
use crate::config::TableConfig;

/// What `check-config --connect` finds for a WAL table.
#[derive(Debug, Default)]
pub struct Preflight {
    /// What stops the table from being relayed.
    pub problems: Vec<String>,
    /// What works now but needs attention.
    pub warnings: Vec<String>,
    /// What was found fit.
    pub fit: Vec<String>,
}

/// Checks what WAL capture of `t` needs: `wal_level`, the `REPLICATION` attribute, the
/// table and its mapped columns, the publication (or the right to create it) and the
/// slot (or room for it), and reports the slot's lag.
pub async fn preflight(conn: &mut PgConnection, t: &TableConfig) -> Result<Preflight, WalError> {
    let mut p = Preflight::default();
    match check_server(conn).await {
        Ok(()) => p.fit.push("wal_level = logical, role may replicate".into()),
        Err(
            e @ (WalError::ServerVersion(_) | WalError::WalLevel(_) | WalError::NoReplication(_)),
        ) => p.problems.push(e.to_string()),
        Err(e) => return Err(e),
    }
    if t.wal.inserts {
        match describe_table(conn, &t.table).await? {
            None => p
                .problems
                .push(format!("table `{}` does not exist", t.table)),
            Some(relation) => match super::rows::RowReader::new(&relation, t) {
                Ok(_) => p.fit.push("mapped columns".into()),
                Err(e) => p.problems.push(e.to_string()),
            },
        }
        if t.wal.snapshot == crate::config::Snapshot::All {
            let select: Option<bool> = sqlx::query_scalar(
                "SELECT has_table_privilege(to_regclass($1), 'SELECT') WHERE to_regclass($1) IS NOT NULL",
            )
            .bind(&t.table)
            .fetch_optional(&mut *conn)
            .await?;
            if select == Some(false) {
                p.problems.push(format!(
                    "may not SELECT from `{}`, which the initial snapshot reads (snapshot = \"all\")",
                    t.table
                ));
            }
        }
    }
    let publication = t.wal_publication();
    let (exists, includes, may_create): (bool, bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1), \
                EXISTS (SELECT 1 FROM pg_publication_tables \
                        WHERE pubname = $1 AND schemaname = $2 AND tablename = $3), \
                has_database_privilege(current_database(), 'CREATE') \
                AND CASE WHEN $5 THEN COALESCE((SELECT pg_has_role(relowner, 'MEMBER') \
                                                FROM pg_class WHERE oid = to_regclass($4)), false) \
                    ELSE true END",
    )
    .bind(&publication)
    .bind(split(&t.table).0)
    .bind(split(&t.table).1)
    .bind(&t.table)
    .bind(t.wal.inserts)
    .fetch_one(&mut *conn)
    .await?;
    match (exists, includes || !t.wal.inserts, may_create) {
        (true, true, _) => p.fit.push(format!("publication `{publication}`")),
        (true, false, _) => p.problems.push(
            WalError::Publication {
                publication,
                table: t.table.clone(),
            }
            .to_string(),
        ),
        (false, _, true) => p.fit.push(format!("publication `{publication}` is created at start")),
        (false, _, false) => p.problems.push(format!(
            "publication `{publication}` does not exist and the role may not create it (CREATE on the database, and ownership of the table): create it as its owner, `CREATE PUBLICATION \"{publication}\" FOR TABLE {} WITH (publish = 'insert')`",
            t.table
        )),
    }
    let slot = t.wal_slot();
    let found: Option<(Option<String>, bool, Option<i64>)> = sqlx::query_as(
        "SELECT plugin::text, database IS NOT DISTINCT FROM current_database(), \
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(&mut *conn)
    .await?;
    match found {
        Some((plugin, true, lag)) if plugin.as_deref() == Some("pgoutput") => {
            let lag = lag.unwrap_or_default();
            p.fit.push(format!("slot `{slot}` ({lag} bytes of WAL behind)"));
            if lag > 1 << 30 {
                p.warnings.push(format!(
                    "slot `{slot}` holds {} MiB of WAL the server cannot recycle until outboxd reads it; `outboxd relay drop-slot` retires it",
                    lag >> 20
                ));
            }
        }
        Some((plugin, _, _)) => p.problems.push(format!(
            "replication slot `{slot}` exists for plugin {} or another database: name another in relay.tables.wal.slot",
            plugin.unwrap_or_else(|| "none (physical)".into())
        )),
        None => {
            let free: bool = sqlx::query_scalar(
                "SELECT count(*) < current_setting('max_replication_slots')::bigint FROM pg_replication_slots",
            )
            .fetch_one(&mut *conn)
            .await?;
            if free {
                p.fit.push(format!("slot `{slot}` is created at start"));
            } else {
                p.problems.push(format!(
                    "slot `{slot}` does not exist and every replication slot is in use (max_replication_slots)"
                ));
            }
        }
    }
    Ok(p)
}

/// A WAL table as `outboxd status` shows it.
#[derive(Debug)]
pub struct SlotStatus {
    /// Bytes of WAL between the server's position and the slot's confirmed one.
    pub lag_bytes: Option<i64>,
    /// The session reading the slot, as lane 0.
    pub reader: Option<crate::relay::store::LaneOwner>,
    /// Rows of the table in `outboxd_dead_rows`.
    pub dead_rows: i64,
}

/// A slot's lag, reader pid, client address and application name.
type SlotRow = (Option<i64>, Option<i32>, Option<String>, Option<String>);

/// The slot of `t`: its lag and reader, and the table's dead rows.
pub async fn status(pool: &sqlx::PgPool, t: &TableConfig) -> Result<SlotStatus, WalError> {
    let found: Option<SlotRow> = sqlx::query_as(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, \
                    s.active_pid, host(a.client_addr), a.application_name::text \
             FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1",
    )
    .bind(t.wal_slot())
    .fetch_optional(pool)
    .await?;
    let dead_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outboxd_dead_rows WHERE source_table = $1")
            .bind(&t.table)
            .fetch_one(pool)
            .await
            .map_err(WalError::from_state)?;
    let (lag_bytes, reader) = match found {
        None => (None, None),
        Some((lag, pid, client, application)) => (
            lag,
            pid.map(|pid| crate::relay::store::LaneOwner {
                lane: 0,
                pid: Some(i64::from(pid)),
                client,
                application,
            }),
        ),
    };
    Ok(SlotStatus {
        lag_bytes,
        reader,
        dead_rows,
    })
}

/// What `outboxd relay drop-slot` did.
#[derive(Debug)]
pub struct Retired {
    slot: String,
    dropped: bool,
    publication: Option<(String, bool)>,
}

impl std::fmt::Display for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dropped {
            true => writeln!(f, "dropped replication slot {}", self.slot)?,
            false => writeln!(f, "no replication slot {}", self.slot)?,
        }
        if let Some((name, dropped)) = &self.publication {
            match dropped {
                true => writeln!(f, "dropped publication {name}")?,
                false => writeln!(f, "no publication {name}")?,
            }
        }
        Ok(())
    }
}

/// Drops the slot of `t` (refused while a session reads it) and, with `publication`, its
/// publication.
pub async fn retire(
    pool: &sqlx::PgPool,
    t: &TableConfig,
    publication: bool,
) -> Result<Retired, WalError> {
    let slot = t.wal_slot();
    let mut conn = pool.acquire().await?;
    // Closed, not returned to the pool, in case the lock outlives an error.
    conn.close_on_drop();
    // A replica that relays the table holds the slot's lock while it reads the slot and
    // while it takes the initial snapshot (when no session reads the slot yet).
    let (class, object) = super::lock_keys(&slot);
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(class)
        .bind(object)
        .fetch_one(&mut *conn)
        .await?;
    let retired = if free {
        retire_unlocked(&mut conn, t, &slot, publication).await
    } else {
        Err(WalError::Relayed(slot))
    };
    if free {
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(class)
            .bind(object)
            .execute(&mut *conn)
            .await?;
    }
    retired
}

/// [`retire`] with the slot's lock held.
async fn retire_unlocked(
    conn: &mut PgConnection,
    t: &TableConfig,
    slot: &str,
    publication: bool,
) -> Result<Retired, WalError> {
    let slot = slot.to_owned();
    let reader: Option<Option<i32>> =
        sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(Some(pid)) = reader {
        return Err(WalError::SlotInUse { slot, pid });
    }
    let dropped = drop_slot(conn, &slot).await?;
    let publication = match publication {
        false => None,
        true => {
            let name = t.wal_publication();
            let existed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            )
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
            sqlx::query(&format!("DROP PUBLICATION IF EXISTS \"{name}\""))
                .execute(&mut *conn)
                .await?;
            Some((name, existed))
        }
    };
    Ok(Retired {
        slot,
        dropped,
        publication,
    })
}
