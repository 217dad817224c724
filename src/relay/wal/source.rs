//! Where the stream comes from: the server's fitness for logical replication, the
//! publication, the slot (created with an exported snapshot when asked), and the
//! replication session that reads it.

use pgwire_replication::{ReplicationClient, ReplicationConfig, SslMode, TlsConfig};
use sqlx::postgres::PgConnection;

use super::pgoutput::{Relation, RelationColumn};
use super::WalError;
use crate::config::TableConfig;
use crate::db::{ReplicationTarget, ReplicationTls};

/// Session settings of the replication connection, so that values arrive in the text
/// forms the row reader parses (ISO times in UTC, bytea as hex, floats exact).
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c bytea_output=hex -c extra_float_digits=3";

/// Events buffered between the replication session and the relay.
const BUFFER_EVENTS: usize = 2048;

/// The oldest server WAL capture runs on: `pgoutput` sends logical decoding messages from
/// PostgreSQL 14 on.
const MIN_SERVER_VERSION: i32 = 140_000;

/// Checks that the server can stream: PostgreSQL 14 or later, `wal_level = logical` and a
/// role with `REPLICATION`.
pub async fn check_server(conn: &mut PgConnection) -> Result<(), WalError> {
    let (version, level, role, replication): (i32, String, String, bool) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, current_setting('wal_level'), \
         current_user::text, \
         (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(&mut *conn)
    .await?;
    if version < MIN_SERVER_VERSION {
        return Err(WalError::ServerVersion(version));
    }
    if level != "logical" {
        return Err(WalError::WalLevel(level));
    }
    if !replication {
        return Err(WalError::NoReplication(role));
    }
    Ok(())
}

/// `schema.table` -> (`schema`, `table`), `public` when unqualified.
pub(super) fn split(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// The table as the catalog describes it, its columns in order (as the stream's relation
/// message would); `None` when it does not exist.
pub(super) async fn describe_table(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Option<Relation>, WalError> {
    let columns: Vec<(String, i64)> = sqlx::query_as(
        "SELECT attname::text, atttypid::bigint FROM pg_attribute \
         WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    if columns.is_empty() {
        return Ok(None);
    }
    let (schema, name) = split(table);
    Ok(Some(Relation {
        id: 0,
        schema: schema.to_owned(),
        name: name.to_owned(),
        columns: columns
            .into_iter()
            .map(|(name, oid)| RelationColumn {
                name,
                type_oid: u32::try_from(oid).unwrap_or_default(),
            })
            .collect(),
    }))
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
    let root = target.sslrootcert.clone().map(Into::into);
    let tls = match target.tls {
        ReplicationTls::Off => TlsConfig::disabled(),
        ReplicationTls::Prefer => TlsConfig {
            mode: SslMode::Prefer,
            ..TlsConfig::require()
        },
        ReplicationTls::Require => TlsConfig::require(),
        ReplicationTls::VerifyCa => TlsConfig::verify_ca(root),
        ReplicationTls::VerifyFull => TlsConfig::verify_full(root),
    };
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
    // The form PostgreSQL 14 knows too (15 added `(SNAPSHOT '...')`).
    let how = if export {
        "EXPORT_SNAPSHOT"
    } else {
        "NOEXPORT_SNAPSHOT"
    };
    let rows = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput {how}"
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
