//! Where the stream comes from: the server's fitness for logical replication, the
//! publication, the slot (created with an exported snapshot when asked), and the
//! replication session that reads it.

use pgwire_replication::{ReplicationClient, ReplicationConfig, SslMode, TlsConfig};
use sqlx::postgres::PgConnection;

use super::WalError;
use crate::config::TableConfig;
use crate::db::ReplicationTarget;

/// Session settings of the replication connection, so that values arrive in the text
/// forms the row reader parses (ISO times in UTC, bytea as hex, floats exact).
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c bytea_output=hex -c extra_float_digits=3";

/// Events buffered between the replication session and the relay.
const BUFFER_EVENTS: usize = 2048;

/// Checks that the server can stream: `wal_level = logical` and a role with `REPLICATION`.
pub async fn check_server(conn: &mut PgConnection) -> Result<(), WalError> {
    let (level, role, replication): (String, String, bool) = sqlx::query_as(
        "SELECT current_setting('wal_level'), current_user::text, \
         (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(&mut *conn)
    .await?;
    if level != "logical" {
        return Err(WalError::WalLevel(level));
    }
    if !replication {
        return Err(WalError::NoReplication(role));
    }
    Ok(())
}

/// `schema.table` -> (`schema`, `table`), `public` when unqualified.
fn split(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// Makes sure the publication exists and includes the table (creating it, for inserts
/// only, when missing).
pub async fn ensure_publication(conn: &mut PgConnection, t: &TableConfig) -> Result<(), WalError> {
    let publication = t.wal_publication();
    let (schema, table) = split(&t.table);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&publication)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        let quoted = format!("\"{schema}\".\"{table}\"");
        // A table-less outbox reads logical decoding messages only, which every
        // publication carries.
        let create = if t.wal.inserts {
            format!(
                "CREATE PUBLICATION \"{publication}\" FOR TABLE {quoted} WITH (publish = 'insert')"
            )
        } else {
            format!("CREATE PUBLICATION \"{publication}\" WITH (publish = 'insert')")
        };
        match sqlx::query(&create).execute(&mut *conn).await {
            Ok(_) => tracing::info!(%publication, "publication created"),
            // Another replica created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !t.wal.inserts {
        return Ok(());
    }
    let (includes, inserts): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables \
                        WHERE pubname = $1 AND schemaname = $2 AND tablename = $3), \
                (SELECT pubinsert FROM pg_publication WHERE pubname = $1)",
    )
    .bind(&publication)
    .bind(schema)
    .bind(table)
    .fetch_one(&mut *conn)
    .await?;
    if !includes || !inserts {
        return Err(WalError::Publication {
            publication,
            table: t.table.clone(),
        });
    }
    Ok(())
}

/// How the slot stood when the relay came to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No such slot.
    Missing,
    /// Created by outboxd, snapshot published (or none asked for).
    Ready,
    /// Created by someone else: streamed as it is.
    Foreign,
    /// Created by outboxd, its snapshot not published in full.
    Unfinished,
}

/// The slot's state; an existing slot of another plugin or database is an error.
pub async fn slot_state(conn: &mut PgConnection, t: &TableConfig) -> Result<SlotState, WalError> {
    let slot = t.wal_slot();
    let found: Option<(Option<String>, Option<String>, String)> = sqlx::query_as(
        "SELECT plugin::text, database::text, current_database()::text \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(&mut *conn)
    .await?;
    let marker: Option<bool> =
        sqlx::query_scalar("SELECT snapshot_done FROM outboxd_relay_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_optional(&mut *conn)
            .await
            .map_err(WalError::from_state)?;
    let Some((plugin, database, current)) = found else {
        return Ok(SlotState::Missing);
    };
    if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
        return Err(WalError::ForeignSlot {
            slot,
            plugin: plugin.unwrap_or_else(|| "none (a physical slot)".into()),
            database: database.unwrap_or_default(),
        });
    }
    Ok(match marker {
        Some(true) => SlotState::Ready,
        Some(false) => SlotState::Unfinished,
        None => SlotState::Foreign,
    })
}

/// Drops the slot (it must not be in use) and forgets it.
pub async fn drop_slot(conn: &mut PgConnection, slot: &str) -> Result<bool, WalError> {
    let dropped: bool = sqlx::query_scalar(
        "SELECT count(pg_drop_replication_slot(slot_name)) > 0 \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM outboxd_relay_slots WHERE slot_name = $1")
        .bind(slot)
        .execute(&mut *conn)
        .await
        .map_err(WalError::from_state)?;
    Ok(dropped)
}

/// Records that outboxd is about to create the slot, its snapshot not yet published.
pub async fn mark_created(conn: &mut PgConnection, t: &TableConfig) -> Result<(), WalError> {
    sqlx::query(
        "INSERT INTO outboxd_relay_slots (slot_name, source_table, snapshot_done) \
         VALUES ($1, $2, false) \
         ON CONFLICT (slot_name) DO UPDATE SET snapshot_done = false, created_at = now()",
    )
    .bind(t.wal_slot())
    .bind(&t.table)
    .execute(&mut *conn)
    .await
    .map_err(WalError::from_state)?;
    Ok(())
}

/// Records that the slot's snapshot is published.
pub async fn mark_ready(conn: &mut PgConnection, t: &TableConfig) -> Result<(), WalError> {
    sqlx::query("UPDATE outboxd_relay_slots SET snapshot_done = true WHERE slot_name = $1")
        .bind(t.wal_slot())
        .execute(&mut *conn)
        .await
        .map_err(WalError::from_state)?;
    Ok(())
}

/// The replication session's settings for table `t`.
pub fn replication_config(target: &ReplicationTarget, t: &TableConfig) -> ReplicationConfig {
    let tls = match target.sslmode.as_str() {
        "require" => TlsConfig::require(),
        "verify-ca" => TlsConfig::verify_ca(target.sslrootcert.clone().map(Into::into)),
        "verify-full" => TlsConfig::verify_full(target.sslrootcert.clone().map(Into::into)),
        _ => TlsConfig::disabled(),
    };
    debug_assert!(tls.mode == SslMode::Disable || tls.mode.requires_tls());
    ReplicationConfig::new(
        target.host.clone(),
        target.user.clone(),
        target.password.clone(),
        target.database.clone(),
        t.wal_slot(),
        t.wal_publication(),
    )
    .with_port(target.port)
    .with_tls(tls)
    .with_status_interval(t.wal.status_interval)
    .with_wakeup_interval(t.wal.status_interval)
    .with_buffer_size(BUFFER_EVENTS)
    .with_application_name(target.application_name.clone())
    .with_options(SESSION_OPTIONS)
}

/// A new slot: its session (not streaming yet) and the snapshot it exported, if asked.
pub struct Created {
    /// The session that created the slot; the snapshot lives while it waits.
    pub client: ReplicationClient,
    /// The exported snapshot's name.
    pub snapshot: Option<String>,
}

/// Creates the slot on a new session; with `export`, the session exports the snapshot the
/// slot starts from and keeps it until it starts streaming.
pub async fn create_slot(config: ReplicationConfig, export: bool) -> Result<Created, WalError> {
    let slot = config.slot.clone();
    let mut client = ReplicationClient::connect_gated(config).await?;
    let how = if export { "export" } else { "nothing" };
    let rows = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT '{how}')"
        ))
        .await?;
    let snapshot = rows
        .first()
        .and_then(|r| r.get(2).cloned().flatten())
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if export && snapshot.is_none() {
        return Err(WalError::Protocol(
            "CREATE_REPLICATION_SLOT exported no snapshot".into(),
        ));
    }
    tracing::info!(%slot, snapshot = snapshot.as_deref().unwrap_or("none"), "replication slot created");
    Ok(Created { client, snapshot })
}

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
        Err(e @ (WalError::WalLevel(_) | WalError::NoReplication(_))) => {
            p.problems.push(e.to_string())
        }
        Err(e) => return Err(e),
    }
    if t.wal.inserts {
        let columns: Vec<(String, i64)> = sqlx::query_as(
            "SELECT attname::text, atttypid::bigint FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
        .bind(&t.table)
        .fetch_all(&mut *conn)
        .await?;
        if columns.is_empty() {
            p.problems
                .push(format!("table `{}` does not exist", t.table));
        } else {
            let (schema, name) = split(&t.table);
            let relation = super::pgoutput::Relation {
                id: 0,
                schema: schema.to_owned(),
                name: name.to_owned(),
                columns: columns
                    .into_iter()
                    .map(|(name, oid)| super::pgoutput::RelationColumn {
                        name,
                        type_oid: u32::try_from(oid).unwrap_or_default(),
                    })
                    .collect(),
            };
            match super::rows::RowReader::new(&relation, t) {
                Ok(_) => p.fit.push("mapped columns".into()),
                Err(e) => p.problems.push(e.to_string()),
            }
            if t.wal.snapshot == crate::config::Snapshot::All {
                let select: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'SELECT')")
                    .bind(&t.table)
                    .fetch_one(&mut *conn)
                    .await?;
                if !select {
                    p.problems.push(format!(
                        "may not SELECT from `{}`, which the initial snapshot reads (snapshot = \"all\")",
                        t.table
                    ));
                }
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
    let reader: Option<Option<i32>> =
        sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(Some(pid)) = reader {
        return Err(WalError::SlotInUse { slot, pid });
    }
    let dropped = drop_slot(&mut conn, &slot).await?;
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
