//! SQLite's statements for one table: the table's columns as the catalog has them, the
//! checks of the mapping against them, and every statement rendered once.

use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::Row;

use crate::config::{Column, OnPublished, TableConfig};

use super::super::{
    check_column_use, check_columns, epoch_seconds_sql, ClaimedRow, ColumnKind, ColumnUse, Columns,
    Lenient, Mark, StoreError, PURGE_BATCH,
};

/// The current time as SQLite writes it into the reference table (UTC, ISO 8601).
pub(super) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Quotes an identifier that validation already restricted to `[A-Za-z_][A-Za-z0-9_$]*`.
pub(super) fn q(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// `schema.table` -> `"schema"."table"`.
pub(super) fn quote_table(table: &str) -> String {
    table.split('.').map(q).collect::<Vec<_>>().join(".")
}

/// Unix seconds of a time column: numbers are taken as Unix seconds or milliseconds (see
/// [`epoch_seconds_sql`]), text as a date SQLite understands (ISO 8601).
pub(super) fn epoch(expr: &str) -> String {
    format!(
        "(CASE WHEN typeof({expr}) IN ('integer', 'real') THEN {} \
         ELSE (julianday({expr}) - 2440587.5) * 86400.0 END)",
        epoch_seconds_sql(expr)
    )
}

/// One column as `pragma_table_info` describes it.
pub(super) struct TableColumn {
    pub(super) name: String,
    /// The declared type, as written in `CREATE TABLE`.
    pub(super) declared: String,
    /// Its place in the primary key (0: not in it).
    pub(super) pk: i64,
}

/// The table's columns in order; empty when it does not exist.
pub(super) async fn columns(
    conn: &mut SqliteConnection,
    table: &str,
) -> Result<Vec<TableColumn>, StoreError> {
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (schema, name),
        None => ("main", table),
    };
    let rows = sqlx::query("SELECT name, type, pk FROM pragma_table_info(?, ?) ORDER BY cid")
        .bind(name)
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableColumn {
            name: r.get(0),
            declared: r.get(1),
            pk: r.get(2),
        })
        .collect())
}

/// Checks table `t`'s columns against the mapping: every mapped column exists, a mark
/// column declared boolean is a flag (any other is a time), and cursor mode orders by the
/// table's `INTEGER PRIMARY KEY`.
pub(super) fn check_table(
    t: &TableConfig,
    columns: &[TableColumn],
) -> Result<ColumnUse, StoreError> {
    let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    check_columns(t, &names)?;
    let typed: Vec<(String, String)> = columns
        .iter()
        .map(|c| (c.name.clone(), c.declared.to_ascii_uppercase()))
        .collect();
    // SQLite decides a value's type row by row: `epoch` reads numbers and text alike.
    let uses = check_column_use(t, &typed, |ty| match ty.contains("BOOL") {
        true => ColumnKind::Boolean,
        false => ColumnKind::Time,
    })?;
    if t.on_published == OnPublished::Cursor {
        // Only the rowid is assigned under the write lock that also orders commits; SQLite
        // has one writer, so rows become visible in rowid order and a position passes
        // over none. Rows must not be deleted: a deleted highest rowid is handed out again.
        let ord = t.order_column().as_str();
        let keys: Vec<&TableColumn> = columns.iter().filter(|c| c.pk > 0).collect();
        let is_rowid = matches!(keys.as_slice(), [k] if k.name == ord && k.declared.eq_ignore_ascii_case("INTEGER"));
        if !is_rowid {
            return Err(StoreError::Schema(format!(
                "table `{}`: on_published = \"cursor\" on SQLite needs the order column `{ord}` (relay.tables.order_column) to be the table's INTEGER PRIMARY KEY, which SQLite assigns in commit order",
                t.table
            )));
        }
    }
    Ok(uses)
}

/// Every statement of one table, rendered once.
#[derive(Debug)]
pub(super) struct TableSql {
    pub(super) table: String,
    /// Cursor mode: the claim reads after the lane's position, and rows are never changed.
    pub(super) cursor: bool,
    pub(super) claim: String,
    /// `$1 = JSON array of ids`: delete or mark.
    pub(super) finish: String,
    /// `$1 = table, $2 = id, $3 = reason, $4 = attempts, $5 = id`: copy to the dead rows.
    pub(super) copy_dead: String,
    /// `$1 = id`.
    pub(super) delete_one: String,
    pub(super) stats: String,
    pub(super) purge: Option<String>,
    pub(super) cleanup_attempts: String,
}

impl TableSql {
    pub(super) fn new(t: &TableConfig, columns: &[String], uses: ColumnUse) -> Self {
        let table = quote_table(&t.table);
        let id = q(&t.id_column);
        let ord = q(t.order_column());
        let text = |col: Option<&Column>| match col {
            None => "NULL".to_owned(),
            Some(col) => format!("CAST(o.{} AS TEXT)", q(col)),
        };
        let published = q(&t.published_column);
        let (pending, mark_value) = match uses.mark {
            Some(Mark::Flag) => (format!("o.{published} IS NOT TRUE"), "1"),
            _ => (format!("o.{published} IS NULL"), NOW),
        };
        let pending = match t.on_published {
            OnPublished::Delete => "1".to_owned(),
            OnPublished::Mark => pending,
            // Validation restricted the name to letters, digits, `_`, `$` and one `.`.
            OnPublished::Cursor => format!(
                "o.{ord} > coalesce((SELECT position FROM outboxd_relay_cursors \
                 WHERE source_table = '{}' AND lanes = 1 AND lane = 0), -9223372036854775808)",
                t.table
            ),
        };
        let ids = "(SELECT value FROM json_each(?1))";
        let finish = match t.on_published {
            OnPublished::Delete | OnPublished::Cursor => {
                format!("DELETE FROM {table} WHERE {id} IN {ids}")
            }
            OnPublished::Mark => {
                format!("UPDATE {table} SET {published} = {mark_value} WHERE {id} IN {ids}")
            }
        };
        let header_columns = match t.header_columns.is_empty() {
            true => "NULL".to_owned(),
            false => format!(
                "json_array({})",
                t.header_columns
                    .values()
                    .map(|c| format!("o.{}", q(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let created_at = t
            .created_at_column
            .as_ref()
            .map(|c| epoch(&format!("o.{}", q(c))));
        // JSON holds no blobs: a blob value is kept as `\x` and its bytes in hex, as
        // PostgreSQL prints bytea.
        let row_json = format!(
            "json_object({})",
            columns
                .iter()
                .map(|c| {
                    let v = format!("o.{}", q(c));
                    format!(
                        "'{c}', CASE WHEN typeof({v}) = 'blob' THEN '\\x' || hex({v}) ELSE {v} END"
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cursor = t.on_published == OnPublished::Cursor;
        TableSql {
            table: t.table.clone(),
            cursor,
            claim: format!(
                "SELECT CAST(o.{id} AS TEXT), {key}, CAST(o.{payload} AS BLOB), {headers}, {event_id}, \
                 {event_type}, {aggregate_type}, {created_at}, {topic}, {header_columns}, {ord_out} \
                 FROM {table} o WHERE {pending} ORDER BY o.{ord} LIMIT ?1",
                ord_out = if cursor { format!("o.{ord}") } else { "0".to_owned() },
                key = text(Some(&t.key_column)),
                payload = q(&t.payload_column),
                headers = text(t.headers_column.as_ref()),
                event_id = text(t.event_id_column.as_ref()),
                event_type = text(t.event_type_column.as_ref()),
                aggregate_type = text(t.aggregate_type_column.as_ref()),
                topic = text(t.topic_column.as_ref()),
                created_at = created_at.as_deref().unwrap_or("NULL"),
            ),
            finish,
            copy_dead: format!(
                "INSERT INTO outboxd_dead_rows (source_table, row_id, reason, attempts, row_data) \
                 SELECT ?1, ?2, ?3, ?4, {row_json} FROM {table} o WHERE o.{id} = ?2"
            ),
            delete_one: format!("DELETE FROM {table} WHERE {id} = ?1"),
            stats: format!(
                "SELECT count(*), {oldest} FROM {table} o WHERE {pending}",
                pending = match cursor {
                    true => pending.replace("SELECT position", "SELECT high"),
                    false => pending.clone(),
                },
                oldest = match &created_at {
                    None => "NULL".to_owned(),
                    Some(created_at) => format!(
                        "(julianday('now') - 2440587.5) * 86400.0 - min({created_at})"
                    ),
                }
            ),
            purge: (uses.mark == Some(Mark::Time)).then(|| {
                let published = epoch(&format!("o.{published}"));
                format!(
                    "DELETE FROM {table} WHERE {id} IN (SELECT o.{id} FROM {table} o \
                     WHERE {published} < (julianday('now') - 2440587.5) * 86400.0 - ?1 LIMIT {PURGE_BATCH})"
                )
            }),
            cleanup_attempts: match cursor {
                // A published row stays: its counter goes once it is older than any retry.
                true => "DELETE FROM outboxd_relay_attempts WHERE source_table = ?1 \
                         AND updated_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')"
                    .to_owned(),
                false => format!(
                    "DELETE FROM outboxd_relay_attempts WHERE source_table = ?1 AND NOT EXISTS \
                     (SELECT 1 FROM {table} o WHERE o.{id} = outboxd_relay_attempts.row_id AND {pending})"
                ),
            },
        }
    }
}

/// A claimed row; only an id that cannot be read fails the claim (the row could not even
/// be named), any other unreadable column makes the row a dead row.
pub(super) fn decode(r: &SqliteRow) -> Result<ClaimedRow, StoreError> {
    let mut c = Lenient::new(r);
    let row = ClaimedRow::new(&Columns {
        id: r.try_get(0)?,
        key: c.get(1, "key_column"),
        payload: c.get(2, "payload_column"),
        headers: c.get(3, "headers_column"),
        event_id: c.get(4, "event_id_column"),
        event_type: c.get(5, "event_type_column"),
        aggregate_type: c.get(6, "aggregate_type_column"),
        created_at: c.get(7, "created_at_column"),
        topic: c.get(8, "topic_column"),
        header_columns: c.get(9, "header_columns"),
    });
    Ok(c.finish(row))
}
