//! The SQL of one MySQL/MariaDB outbox table, rendered once from the column mapping and
//! the catalog (column types, the id column's index).

use sqlx::mysql::{MySqlConnection, MySqlRow};
use sqlx::Row;

use crate::config::{Column, OnPublished, TableConfig};
use crate::relay::store::{
    epoch_seconds_sql, ClaimedRow, ColumnKind, ColumnUse, Columns, CreatedAt, Lenient, Mark,
    StoreError, PURGE_BATCH,
};

/// What a MySQL `DATA_TYPE` can be used as; `BOOLEAN` is `tinyint(1)`.
pub(super) fn kind_of(ty: &str) -> ColumnKind {
    match ty {
        "datetime" | "timestamp" | "date" => ColumnKind::Time,
        "tinyint" | "bit" => ColumnKind::Boolean,
        "smallint" | "mediumint" | "int" | "bigint" | "decimal" | "float" | "double" => {
            ColumnKind::Number
        }
        _ => ColumnKind::Other,
    }
}

/// Quotes an identifier that validation already restricted to `[A-Za-z_][A-Za-z0-9_$]*`.
pub(super) fn q(ident: &str) -> String {
    format!("`{ident}`")
}

/// `schema.table` -> `` `schema`.`table` ``.
pub(super) fn quote_table(table: &str) -> String {
    table.split('.').map(q).collect::<Vec<_>>().join(".")
}

/// `(column, DATA_TYPE)` of table `t` in order; empty when it does not exist.
pub(super) async fn columns(
    conn: &mut MySqlConnection,
    table: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    };
    let rows = sqlx::query(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1).to_lowercase()))
        .collect())
}

/// An index of `table` led by `column` (the primary key preferred), if there is one.
pub(super) async fn index_on(
    conn: &mut MySqlConnection,
    table: &str,
    column: &str,
) -> Result<Option<String>, StoreError> {
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    };
    Ok(sqlx::query_scalar(
        "SELECT CAST(INDEX_NAME AS CHAR) FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND COLUMN_NAME = ? \
         AND SEQ_IN_INDEX = 1 ORDER BY INDEX_NAME = 'PRIMARY' DESC LIMIT 1",
    )
    .bind(schema)
    .bind(name)
    .bind(column)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Every statement of one table, rendered once.
#[derive(Debug)]
pub(super) struct TableSql {
    pub(super) table: String,
    pub(super) lanes: u32,
    pub(super) key: String,
    /// `SELECT id FROM t o WHERE <pending>`; the lane filter and `order_limit` follow.
    pub(super) select_ids: String,
    /// ` ORDER BY <order> LIMIT ?`.
    pub(super) order_limit: String,
    /// `SELECT <row> FROM t o WHERE <pending> AND id IN `; the ids and `lock_tail` follow.
    pub(super) lock_rows: String,
    /// ` ORDER BY <order> FOR UPDATE SKIP LOCKED`.
    pub(super) lock_tail: String,
    /// Followed by `(?, ?, ...)` of ids: delete or mark.
    pub(super) finish_head: String,
    /// The whole row as a JSON object, for dead rows.
    pub(super) row_json: String,
    pub(super) id: String,
    pub(super) stats: String,
    /// Mark mode: `SELECT id` of marked rows past retention (`?` = microseconds), a
    /// plain read that locks nothing; `purge_head` deletes them by id.
    pub(super) purge: Option<String>,
    /// Followed by `(?, ?, ...)` of ids: deletes marked rows by primary key.
    pub(super) purge_head: String,
    /// `SELECT row_id` of attempt counters whose row is no longer pending (`?` = table),
    /// a plain read of the outbox that locks nothing.
    pub(super) stale_attempts: String,
    /// Followed by `(?, ?, ...)` of row ids (after `?` = table): deletes their counters.
    pub(super) cleanup_head: String,
    pub(super) payload_is_binary: bool,
    /// Which of key, headers, event id, event type and aggregate type are binary columns
    /// (read as bytes, checked for UTF-8).
    pub(super) binary_text: [bool; 5],
    /// Whether `topic_column` is a binary column.
    pub(super) binary_topic: bool,
    /// Ids are bound as integers when the id column is one: compared with strings, MySQL
    /// cannot use the primary key and scans (and locks) other lanes' rows.
    pub(super) id_is_integer: bool,
}

impl TableSql {
    /// `id_index`: an index led by the id column. Statements that find rows by id force
    /// it: otherwise MySQL may scan a table whose statistics are stale, and a scanning
    /// delete waits on other lanes' locked rows and deadlocks with them.
    pub(super) fn new(
        t: &TableConfig,
        columns: &[(String, String)],
        id_index: Option<&str>,
        uses: ColumnUse,
    ) -> Self {
        let table = quote_table(&t.table);
        let id = q(&t.id_column);
        let by_id = match id_index {
            Some(index) => format!("{table} o FORCE INDEX ({})", q(index)),
            None => format!("{table} o"),
        };
        let is_binary = |col: &str| {
            columns
                .iter()
                .find(|(c, _)| c == col)
                .is_some_and(|(_, ty)| ty.contains("blob") || ty.contains("binary"))
        };
        // A binary column is read as its bytes and checked for UTF-8 by outboxd: MySQL's
        // cast would turn bytes that are not UTF-8 into `?` with only a warning.
        let text = |col: Option<&Column>| match col {
            None => "CAST(NULL AS CHAR)".to_owned(),
            Some(col) if is_binary(col) => format!("o.{}", q(col)),
            Some(col) => format!("CAST(o.{} AS CHAR)", q(col)),
        };
        let binary_text = [
            Some(&t.key_column),
            t.headers_column.as_ref(),
            t.event_id_column.as_ref(),
            t.event_type_column.as_ref(),
            t.aggregate_type_column.as_ref(),
        ]
        .map(|c| c.is_some_and(|c| is_binary(c)));
        let binary_topic = t.topic_column.as_deref().is_some_and(is_binary);
        let payload_type = columns
            .iter()
            .find(|(c, _)| c == t.payload_column.as_str())
            .map(|(_, ty)| ty.as_str())
            .unwrap_or_default();
        let payload_is_binary = payload_type.contains("blob") || payload_type.contains("binary");
        let id_type = columns
            .iter()
            .find(|(c, _)| c == t.id_column.as_str())
            .map(|(_, ty)| ty.as_str())
            .unwrap_or_default();
        let id_is_integer = id_type.ends_with("int");
        let payload = if payload_is_binary {
            format!("o.{}", q(&t.payload_column))
        } else {
            text(Some(&t.payload_column))
        };
        let epoch = |c: &Column| match uses.created_at {
            Some(CreatedAt::Epoch) => epoch_seconds_sql(&format!("o.{}", q(c))),
            _ => format!("UNIX_TIMESTAMP(o.{})", q(c)),
        };
        let created_at = match &t.created_at_column {
            None => "CAST(NULL AS DOUBLE)".to_owned(),
            Some(c) => format!("CAST({} AS DOUBLE)", epoch(c)),
        };
        let topic = text(t.topic_column.as_ref());
        let published = q(&t.published_column);
        let (pending, mark_value) = match uses.mark {
            Some(Mark::Flag) => (format!("o.{published} IS NOT TRUE"), "TRUE"),
            _ => (format!("o.{published} IS NULL"), "CURRENT_TIMESTAMP(6)"),
        };
        // Validation refuses cursor mode on MySQL.
        let (pending, finish_head) = match t.on_published {
            OnPublished::Delete | OnPublished::Cursor => (
                "TRUE".to_owned(),
                format!("DELETE o FROM {by_id} WHERE o.{id} IN "),
            ),
            OnPublished::Mark => (
                pending,
                format!("UPDATE {by_id} SET o.{published} = {mark_value} WHERE o.{id} IN "),
            ),
        };
        let header_columns = match t.header_columns.is_empty() {
            true => "CAST(NULL AS CHAR)".to_owned(),
            false => format!(
                "CAST(JSON_ARRAY({}) AS CHAR)",
                t.header_columns
                    .values()
                    .map(|c| text(Some(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        // JSON holds no binary strings: a binary column's value is kept as `\x` and its
        // bytes in hex, as PostgreSQL prints bytea.
        let row_json = format!(
            "JSON_OBJECT({})",
            columns
                .iter()
                .map(|(c, _)| match is_binary(c) {
                    true => format!("'{c}', CONCAT('\\\\x', HEX(o.{}))", q(c)),
                    false => format!("'{c}', o.{}", q(c)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        TableSql {
            table: t.table.clone(),
            lanes: t.lanes,
            key: q(&t.key_column),
            select_ids: format!("SELECT CAST(o.{id} AS CHAR) FROM {table} o WHERE {pending}"),
            order_limit: format!(" ORDER BY o.{} LIMIT ?", q(t.order_column())),
            lock_rows: format!(
                "SELECT CAST(o.{id} AS CHAR), {key}, {payload}, {headers}, {event_id}, {event_type}, \
                 {aggregate_type}, {created_at}, {topic}, {header_columns} FROM {by_id} WHERE {pending} AND o.{id} IN ",
                key = text(Some(&t.key_column)),
                headers = text(t.headers_column.as_ref()),
                event_id = text(t.event_id_column.as_ref()),
                event_type = text(t.event_type_column.as_ref()),
                aggregate_type = text(t.aggregate_type_column.as_ref()),
            ),
            lock_tail: format!(" ORDER BY o.{} FOR UPDATE SKIP LOCKED", q(t.order_column())),
            finish_head,
            row_json,
            id: id.clone(),
            stats: format!(
                "SELECT COUNT(*), {oldest} FROM {table} o WHERE {pending}",
                oldest = match &t.created_at_column {
                    None => "CAST(NULL AS DOUBLE)".to_owned(),
                    Some(c) => format!(
                        "CAST(UNIX_TIMESTAMP(NOW(6)) - MIN({}) AS DOUBLE)",
                        epoch(c)
                    ),
                }
            ),
            purge: (uses.mark == Some(Mark::Time)).then(|| {
                format!(
                    "SELECT CAST(o.{id} AS CHAR) FROM {table} o WHERE o.{published} IS NOT NULL \
                     AND o.{published} < NOW(6) - INTERVAL ? MICROSECOND LIMIT {PURGE_BATCH}"
                )
            }),
            purge_head: format!("DELETE o FROM {by_id} WHERE o.{published} IS NOT NULL AND o.{id} IN "),
            stale_attempts: format!(
                "SELECT a.row_id FROM outboxd_relay_attempts a WHERE a.source_table = ? AND NOT EXISTS \
                 (SELECT 1 FROM {table} o WHERE o.{id} = a.row_id AND {pending})"
            ),
            cleanup_head: "DELETE FROM outboxd_relay_attempts WHERE source_table = ? AND row_id IN "
                .to_owned(),
            payload_is_binary,
            binary_text,
            binary_topic,
            id_is_integer,
        }
    }

    /// Binds `ids` to `query`, as integers when the id column is one.
    pub(super) fn bind_ids<'q>(
        &self,
        mut query: sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
        ids: &[&'q str],
    ) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
        for id in ids {
            query = match id.parse::<i64>() {
                Ok(n) if self.id_is_integer => query.bind(n),
                _ => query.bind(*id),
            };
        }
        query
    }

    /// The lane's next ids: a plain (consistent, lock-free) read. Locking while scanning
    /// would lock other lanes' rows for a moment and deadlock with their deletes.
    pub(super) fn ids_of_lane(&self, lane: u32) -> String {
        if self.lanes <= 1 {
            format!("{}{}", self.select_ids, self.order_limit)
        } else {
            format!(
                "{} AND CRC32(COALESCE(CAST(o.{} AS CHAR), '')) % {} = {lane}{}",
                self.select_ids, self.key, self.lanes, self.order_limit
            )
        }
    }

    pub(super) fn decode(&self, r: &MySqlRow) -> Result<ClaimedRow, StoreError> {
        let mut c = Lenient::new(r);
        let payload = if self.payload_is_binary {
            c.get::<Option<&[u8]>>(2, "payload_column")
        } else {
            c.get::<Option<&str>>(2, "payload_column")
                .map(str::as_bytes)
        };
        let [key, headers, event_id, event_type, aggregate_type] = self.binary_text;
        let row = ClaimedRow::new(&Columns {
            id: r.try_get(0)?,
            key: c.get_text(1, key, "key_column"),
            payload,
            headers: c.get_text(3, headers, "headers_column"),
            event_id: c.get_text(4, event_id, "event_id_column"),
            event_type: c.get_text(5, event_type, "event_type_column"),
            aggregate_type: c.get_text(6, aggregate_type, "aggregate_type_column"),
            created_at: c.get(7, "created_at_column"),
            topic: c.get_text(8, self.binary_topic, "topic_column"),
            header_columns: c.get(9, "header_columns"),
        });
        Ok(c.finish(row))
    }
}

/// `(?, ?, ...)` for `n` values.
pub(super) fn placeholders(n: usize) -> String {
    format!("({})", vec!["?"; n].join(", "))
}
