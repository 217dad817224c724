//! The SQL of one PostgreSQL outbox table (claim, finish, attempts, dead rows, purge,
//! stats), rendered once from the column mapping, and the functions that run it.

use futures::TryStreamExt;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::Row;

use crate::config::{Column, OnPublished, TableConfig};
use crate::relay::store::{
    check_column_use, check_columns, epoch_seconds_sql, purge_in_batches, ClaimedRow, ColumnKind,
    ColumnUse, Columns, CreatedAt, DeadRow, Lenient, Mark, StoreError, PURGE_BATCH,
};

/// Everything the relay runs against one table, rendered once at start-up.
#[derive(Debug)]
pub struct TableSql {
    table: String,
    lanes: u32,
    /// The quoted key column, for the lane filter.
    key: String,
    /// The quoted order column.
    ord: String,
    /// Whether the order column is an integer (claims come back as int8 and in chunks).
    pub(super) ord_is_integer: bool,
    claim_head: String,
    claim_tail: String,
    /// The columns a claim returns, over the table as `o`.
    pub(super) returning: String,
    /// `$1 = text[] of ids`: delete (or mark) rows Kafka acknowledged.
    finish: String,
    /// `$1 = table, $2 = text[] ids, $3 = text[] errors` -> `(row_id, attempts)`.
    record_refusals: String,
    /// `$1 = table, $2 = text[] ids, $3 = text[] reasons, $4 = int[] attempts`.
    move_dead: String,
    /// `$1 = seconds of retention` (mark mode only).
    purge: Option<String>,
    /// `-> (pending rows, oldest pending seconds)`.
    stats: String,
    /// `$1 = table`: forget attempt counters of rows no longer pending.
    cleanup_attempts: String,
}

/// Cursor mode, `$1 = table`: attempt counters untouched for a day. A published row stays
/// in the table, so a counter cannot go with its row; a row still being retried touches
/// its counter far more often than that.
const CURSOR_CLEANUP_ATTEMPTS: &str = "DELETE FROM outboxd_relay_attempts \
     WHERE source_table = $1 AND updated_at < now() - interval '1 day'";

/// Cursor mode: the rows after the lanes' positions, for the backlog gauge: those whose
/// order value is above the lowest highest one any lane published (every row while a
/// lane has none).
fn cursor_pending(t: &TableConfig) -> String {
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

/// Column facts read from the catalog at start-up.
#[derive(Debug, Clone)]
pub struct TableShape {
    /// `format_type()` of the id column, used to cast text ids back.
    pub id_type: String,
    /// Whether the payload is `bytea` (sent raw) rather than text-like (sent as UTF-8).
    pub payload_is_bytea: bool,
    /// Whether the order column is an integer: rows are then put in order here instead of
    /// by a sort in the claim statement.
    pub ord_is_integer: bool,
    /// The table's one name, whatever spelling the configuration used: `relname` in
    /// schema `public`, else `schema.relname`. Lock keys derive from it.
    pub identity: String,
    /// How the time and mark columns are used.
    pub uses: ColumnUse,
}

/// What a PostgreSQL type (as `format_type` names it) can be used as.
pub(super) fn kind_of(ty: &str) -> ColumnKind {
    match ty {
        _ if ty.starts_with("timestamp") || ty == "date" => ColumnKind::Time,
        "bigint" | "integer" | "smallint" | "real" | "double precision" => ColumnKind::Number,
        _ if ty.starts_with("numeric") => ColumnKind::Number,
        "boolean" => ColumnKind::Boolean,
        _ => ColumnKind::Other,
    }
}

/// The `header_columns` values as a JSON array in the order of their names (NULL without
/// header columns); the names are the configuration's and are never written into SQL.
pub(super) fn header_columns_sql(t: &TableConfig) -> String {
    if t.header_columns.is_empty() {
        return "NULL::text".to_owned();
    }
    let values: Vec<String> = t
        .header_columns
        .values()
        .map(|c| format!("o.{}", q(c)))
        .collect();
    format!("json_build_array({})::text", values.join(", "))
}

/// Quotes an identifier that validation already restricted to `[A-Za-z_][A-Za-z0-9_$]*`.
pub(super) fn q(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// `schema.table` -> `"schema"."table"`.
pub fn quote_table(table: &str) -> String {
    table.split('.').map(q).collect::<Vec<_>>().join(".")
}

/// Reads the table's columns and checks that every mapped column exists.
pub(super) async fn introspect(
    conn: &mut PgConnection,
    t: &TableConfig,
) -> Result<TableShape, StoreError> {
    let identity: Option<String> = sqlx::query_scalar(
        "SELECT CASE WHEN n.nspname = 'public' THEN c.relname::text \
         ELSE n.nspname::text || '.' || c.relname::text END \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
    )
    .bind(quote_table(&t.table))
    .fetch_optional(&mut *conn)
    .await?;
    let rows = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(quote_table(&t.table))
    .fetch_all(&mut *conn)
    .await?;
    let columns: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect();
    let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
    check_columns(t, &names)?;
    let type_of = |name: &str| {
        columns
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, ty)| ty.clone())
    };
    let uses = check_column_use(t, &columns, kind_of)?;
    let ord_is_integer = matches!(
        type_of(t.order_column()).as_deref(),
        Some("bigint" | "integer" | "smallint")
    );
    if t.on_published == OnPublished::Cursor && !ord_is_integer {
        return Err(StoreError::Schema(format!(
            "table `{}`: on_published = \"cursor\" needs an integer order column the database assigns (bigserial, identity); `{}` (relay.tables.order_column) is of type {}",
            t.table,
            t.order_column(),
            type_of(t.order_column()).unwrap_or_default()
        )));
    }
    if let Some(xid) = &t.xid_column {
        let ty = type_of(xid).unwrap_or_default();
        if ty != "xid8" {
            return Err(StoreError::Schema(format!(
                "table `{}`: `{xid}` (relay.tables.xid_column) is of type {ty}; it must be xid8, filled by DEFAULT pg_current_xact_id()",
                t.table
            )));
        }
        // A row written without the default would sort by no transaction of its own.
        let default: Option<String> = sqlx::query_scalar(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a \
             ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
             WHERE d.adrelid = to_regclass($1) AND a.attname = $2",
        )
        .bind(quote_table(&t.table))
        .bind(xid.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        if default.as_deref() != Some("pg_current_xact_id()") {
            return Err(StoreError::Schema(format!(
                "table `{table}`: `{xid}` (relay.tables.xid_column) must have DEFAULT pg_current_xact_id() (it has {}): ALTER TABLE {table} ALTER COLUMN {xid} SET DEFAULT pg_current_xact_id()",
                default.as_deref().unwrap_or("none"),
                table = t.table,
            )));
        }
    }
    Ok(TableShape {
        uses,
        identity: identity.unwrap_or_else(|| t.table.clone()),
        id_type: type_of(&t.id_column).unwrap_or_else(|| "text".into()),
        payload_is_bytea: type_of(&t.payload_column).as_deref() == Some("bytea"),
        ord_is_integer,
    })
}

impl TableSql {
    /// Renders every statement for table `t` of shape `shape`.
    pub fn new(t: &TableConfig, shape: &TableShape) -> Self {
        let table = quote_table(&t.table);
        let id = q(&t.id_column);
        let id_array = format!("$1::text[]::{}[]", shape.id_type);
        let text_or_null = |col: Option<&Column>| match col {
            None => "NULL::text".to_owned(),
            Some(col) => format!("o.{}::text", q(col)),
        };
        // Text is sent as it is (binary protocol: no conversion) and decoded as a String.
        let payload = if shape.payload_is_bytea {
            format!("o.{}", q(&t.payload_column))
        } else {
            format!("o.{}::text", q(&t.payload_column))
        };
        let created_at = match (&t.created_at_column, shape.uses.created_at) {
            (Some(c), Some(CreatedAt::Epoch)) => {
                format!("{}::float8", epoch_seconds_sql(&format!("o.{}", q(c))))
            }
            // date_part is float8 already; extract() computes a numeric (slower per row).
            (Some(c), _) => format!("date_part('epoch', o.{})", q(c)),
            (None, _) => "NULL::float8".to_owned(),
        };
        let topic = text_or_null(t.topic_column.as_ref());
        let returning = format!(
            "o.{id}::text AS id, {key} AS key, {payload} AS payload, {headers} AS headers, \
             {event_id} AS event_id, {event_type} AS event_type, {aggregate_type} AS aggregate_type, \
             {created_at} AS created_at, {topic} AS topic, {ord_out} AS outboxd_ord, \
             {header_columns} AS header_columns",
            header_columns = header_columns_sql(t),
            ord_out = if shape.ord_is_integer {
                format!("o.{}::int8", q(t.order_column()))
            } else {
                "NULL::int8".to_owned()
            },
            key = text_or_null(Some(&t.key_column)),
            headers = text_or_null(t.headers_column.as_ref()),
            event_id = text_or_null(t.event_id_column.as_ref()),
            event_type = text_or_null(t.event_type_column.as_ref()),
            aggregate_type = text_or_null(t.aggregate_type_column.as_ref()),
        );
        let (pending, modify, finish) = match t.on_published {
            // Cursor lanes claim with statements of their own (see `cursor`); every row
            // counts here, for the dead-row move.
            OnPublished::Delete | OnPublished::Cursor => (
                "TRUE".to_owned(),
                format!("DELETE FROM {table} o USING c WHERE o.{id} = c.{id}"),
                format!("DELETE FROM {table} WHERE {id} = ANY({id_array})"),
            ),
            OnPublished::Mark => {
                let published = q(&t.published_column);
                let (pending, value) = match shape.uses.mark {
                    Some(Mark::Flag) => (format!("o.{published} IS NOT TRUE"), "true"),
                    _ => (format!("o.{published} IS NULL"), "now()"),
                };
                (
                    pending,
                    format!(
                        "UPDATE {table} o SET {published} = {value} FROM c WHERE o.{id} = c.{id}"
                    ),
                    format!(
                        "UPDATE {table} SET {published} = {value} WHERE {id} = ANY({id_array})"
                    ),
                )
            }
        };
        // The lane filter goes between head and tail; `& 2147483647` instead of abs() because
        // abs(-2147483648) overflows. NULL keys hash like '' so every row belongs to a lane.
        let claim_head = format!("WITH c AS (SELECT o.{id} FROM {table} o WHERE {pending}");
        // DELETE ... RETURNING gives no order guarantee: an integer order column comes back
        // as int8 and `claim` sorts the (almost always already sorted) rows; other types are
        // sorted by the statement.
        let claim_tail = if shape.ord_is_integer {
            format!(
                " ORDER BY o.{ord} LIMIT $1 FOR UPDATE SKIP LOCKED) {modify} RETURNING {returning}",
                ord = q(t.order_column()),
            )
        } else {
            format!(
                " ORDER BY o.{ord} LIMIT $1 FOR UPDATE SKIP LOCKED), d AS ({modify} RETURNING {returning}, o.{ord} AS outboxd_sort) \
                 SELECT id, key, payload, headers, event_id, event_type, aggregate_type, created_at, topic, \
                 outboxd_ord, header_columns FROM d ORDER BY outboxd_sort",
                ord = q(t.order_column()),
            )
        };
        TableSql {
            returning: returning.clone(),
            table: t.table.clone(),
            lanes: t.lanes,
            key: q(&t.key_column),
            ord: q(t.order_column()),
            ord_is_integer: shape.ord_is_integer,
            claim_head,
            claim_tail,
            finish,
            record_refusals: "INSERT INTO outboxd_relay_attempts (source_table, row_id, attempts, last_error) \
                 SELECT $1, r.id, 1, r.err FROM unnest($2::text[], $3::text[]) AS r(id, err) \
                 ON CONFLICT (source_table, row_id) DO UPDATE \
                 SET attempts = outboxd_relay_attempts.attempts + 1, last_error = EXCLUDED.last_error, updated_at = now() \
                 RETURNING row_id, attempts"
                .to_owned(),
            move_dead: format!(
                "WITH r AS (SELECT * FROM unnest($2::text[], $3::text[], $4::int[]) AS r(id, reason, attempts)), \
                 d AS ({take}), \
                 a AS (DELETE FROM outboxd_relay_attempts x USING d WHERE x.source_table = $1 AND x.row_id = d.id) \
                 INSERT INTO outboxd_dead_rows (source_table, row_id, reason, attempts, row_data) \
                 SELECT $1, d.id, d.reason, d.attempts, d.row_data FROM d",
                // Cursor mode changes no row: a dead row is copied, and the lane's position
                // passes it.
                take = match t.on_published {
                    OnPublished::Cursor => format!(
                        "SELECT r.id, r.reason, r.attempts, to_jsonb(o) AS row_data FROM {table} o \
                         JOIN r ON o.{id} = r.id::{id_type}",
                        id_type = shape.id_type
                    ),
                    _ => format!(
                        "DELETE FROM {table} o USING r WHERE o.{id} = r.id::{id_type} \
                         RETURNING r.id, r.reason, r.attempts, to_jsonb(o) AS row_data",
                        id_type = shape.id_type
                    ),
                },
            ),
            purge: (shape.uses.mark == Some(Mark::Time)).then(|| {
                let published = q(&t.published_column);
                format!(
                    "DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM {table} \
                     WHERE {published} < now() - make_interval(secs => $1) LIMIT {PURGE_BATCH} FOR UPDATE SKIP LOCKED)"
                )
            }),
            stats: format!(
                "SELECT count(*)::int8, {oldest} FROM {table} o WHERE {pending}",
                pending = match t.on_published {
                    OnPublished::Cursor => cursor_pending(t),
                    _ => pending.clone(),
                },
                oldest = match (&t.created_at_column, shape.uses.created_at) {
                    (Some(c), Some(CreatedAt::Epoch)) => format!(
                        "(extract(epoch from now()) - min({}))::float8",
                        epoch_seconds_sql(&format!("o.{}", q(c)))
                    ),
                    (Some(c), _) => {
                        format!("extract(epoch from now() - min(o.{}))::float8", q(c))
                    }
                    (None, _) => "NULL::float8".to_owned(),
                },
            ),
            cleanup_attempts: match t.on_published {
                // A published row stays: its counter goes once it is older than any retry.
                OnPublished::Cursor => CURSOR_CLEANUP_ATTEMPTS.to_owned(),
                _ => format!(
                    "DELETE FROM outboxd_relay_attempts a WHERE a.source_table = $1 AND NOT EXISTS \
                     (SELECT 1 FROM {table} o WHERE o.{id} = a.row_id::{id_type} AND {pending})",
                    id_type = shape.id_type,
                ),
            },
        }
    }

    /// The claim statement of one lane (`$1 = batch size`).
    pub fn claim_for_lane(&self, lane: u32) -> String {
        self.claim_with(lane, "")
    }

    /// The claim of the rows after `$2` (an integer order value) in the same transaction.
    /// Without the bound each further claim would scan again past the index entries of
    /// every row this transaction already deleted: they are not dead to everyone yet, so
    /// nothing marks them skippable.
    pub fn claim_after_for_lane(&self, lane: u32) -> String {
        self.claim_with(lane, &format!(" AND o.{} > $2", self.ord))
    }

    /// The claim of the rows whose key (NULL counting as '') is none of `$2`: the keys of
    /// a batch still waiting for Kafka.
    pub fn claim_around_for_lane(&self, lane: u32) -> String {
        self.claim_with(
            lane,
            &format!(" AND coalesce(o.{}::text, '') <> ALL($2::text[])", self.key),
        )
    }

    fn claim_with(&self, lane: u32, bound: &str) -> String {
        format!(
            "{}{bound}{}{}",
            self.claim_head,
            self.lane_filter(lane),
            self.claim_tail
        )
    }

    /// ` AND <the row's key hashes to lane>`, nothing with one lane.
    pub(super) fn lane_filter(&self, lane: u32) -> String {
        if self.lanes <= 1 {
            return String::new();
        }
        format!(" AND {}", self.in_lane(lane))
    }

    /// The lane filter as a `CASE`, which the planner estimates to keep half the rows
    /// (a comparison of an expression it has no statistics on, one in 200): a claim that
    /// reads an index in order until it has its batch then stays cheaper than reading
    /// and sorting the whole range, as it is.
    pub(super) fn lane_case(&self, lane: u32) -> String {
        if self.lanes <= 1 {
            return String::new();
        }
        format!(" AND CASE WHEN {} THEN true END", self.in_lane(lane))
    }

    fn in_lane(&self, lane: u32) -> String {
        format!(
            "(hashtext(coalesce(o.{key}::text, '')) & 2147483647) % {lanes} = {lane}",
            key = self.key,
            lanes = self.lanes,
        )
    }
}

/// What a claim statement's second parameter bounds.
pub(super) enum Bound<'a> {
    /// Nothing: the statement has no second parameter.
    None,
    /// The rows after this integer order value.
    After(i64),
    /// The rows of keys other than these.
    Around(&'a [&'a str]),
}

/// Claims (deletes or marks) up to `limit` rows of the lane, in publication order, within
/// `bound`; returns them and the last one's integer order value.
pub(super) async fn claim(
    conn: &mut PgConnection,
    claim: &str,
    limit: u32,
    bound: Bound<'_>,
) -> Result<(Vec<ClaimedRow>, Option<i64>), StoreError> {
    let query = sqlx::query(claim).bind(i64::from(limit));
    let query = match bound {
        Bound::None => query,
        Bound::After(after) => query.bind(after),
        Bound::Around(keys) => query.bind(keys),
    };
    // Each row is decoded as it arrives and its buffer freed, rather than collected first.
    let mut stream = query.fetch(&mut *conn);
    let mut rows = Vec::with_capacity(limit as usize);
    let mut ords = Vec::with_capacity(limit as usize);
    while let Some(r) = stream.try_next().await? {
        ords.push(r.try_get_unchecked::<Option<i64>, _>(9)?);
        rows.push(decode(&r)?);
    }
    drop(stream);
    if !ords.is_sorted() {
        let mut pairs: Vec<_> = ords.into_iter().zip(rows).collect();
        pairs.sort_by_key(|(ord, _)| *ord);
        (ords, rows) = pairs.into_iter().unzip();
    }
    Ok((rows, ords.last().copied().flatten()))
}

/// One claimed row. The claim statement fixes every column's type (text, float8, int8;
/// the payload is text or bytea, both read as their bytes), so the per-row type checks of
/// `try_get` are skipped; decoding still checks NULLs and UTF-8. Headers `{}` read as none.
/// A claimed row; only an id that cannot be read fails the claim (the row could not even
/// be named), any other unreadable column makes the row a dead row.
pub(super) fn decode(r: &PgRow) -> Result<ClaimedRow, StoreError> {
    let mut c = Lenient::new(r);
    let row = ClaimedRow::new(&Columns {
        id: r.try_get_unchecked(0)?,
        key: c.get_unchecked(1, "key_column"),
        payload: c.get_unchecked(2, "payload_column"),
        // `{}` (the reference table's default) adds no headers, as NULL does.
        headers: c
            .get_unchecked::<Option<&str>>(3, "headers_column")
            .filter(|h| *h != "{}"),
        event_id: c.get_unchecked(4, "event_id_column"),
        event_type: c.get_unchecked(5, "event_type_column"),
        aggregate_type: c.get_unchecked(6, "aggregate_type_column"),
        created_at: c.get_unchecked(7, "created_at_column"),
        topic: c.get_unchecked(8, "topic_column"),
        header_columns: c.get_unchecked(10, "header_columns"),
    });
    Ok(c.finish(row))
}

/// Deletes (or marks) the rows Kafka acknowledged.
pub(super) async fn finish(
    conn: &mut PgConnection,
    sql: &TableSql,
    ids: &[&str],
) -> Result<(), StoreError> {
    if !ids.is_empty() {
        sqlx::query(&sql.finish)
            .bind(ids)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Counts one more refusal for each `(id, error)`; returns each id's count so far.
pub(super) async fn record_refusals(
    conn: &mut PgConnection,
    sql: &TableSql,
    refused: &[(&str, String)],
) -> Result<Vec<(String, i32)>, StoreError> {
    if refused.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = refused.iter().map(|(id, _)| *id).collect();
    let errors: Vec<&str> = refused.iter().map(|(_, e)| e.as_str()).collect();
    let rows = sqlx::query(&sql.record_refusals)
        .bind(&sql.table)
        .bind(ids)
        .bind(errors)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1)))
        .collect())
}

/// Moves rows to `outboxd_dead_rows` with their reason; returns how many moved.
pub(super) async fn move_dead(
    conn: &mut PgConnection,
    sql: &TableSql,
    dead: &[DeadRow],
) -> Result<u64, StoreError> {
    if dead.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let attempts: Vec<i32> = dead.iter().map(|d| d.attempts).collect();
    let done = sqlx::query(&sql.move_dead)
        .bind(&sql.table)
        .bind(ids)
        .bind(reasons)
        .bind(attempts)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// Mark mode: deletes published rows older than `retention_secs`, 1000 at a time, each
/// batch its own transaction. Returns the rows removed.
pub(super) async fn purge(
    pool: &PgPool,
    sql: &TableSql,
    retention_secs: f64,
) -> Result<u64, StoreError> {
    let Some(purge) = &sql.purge else {
        return Ok(0);
    };
    purge_in_batches(|| async {
        Ok(sqlx::query(purge)
            .bind(retention_secs)
            .execute(pool)
            .await?
            .rows_affected())
    })
    .await
}

/// `(pending rows, age of the oldest pending row in seconds)`.
pub(super) async fn stats<'e>(
    db: impl sqlx::PgExecutor<'e>,
    sql: &TableSql,
) -> Result<(i64, Option<f64>), StoreError> {
    let row = sqlx::query(&sql.stats).fetch_one(db).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Forgets attempt counters of rows that are no longer pending (published or gone).
pub(super) async fn cleanup_attempts(pool: &PgPool, sql: &TableSql) -> Result<u64, StoreError> {
    Ok(sqlx::query(&sql.cleanup_attempts)
        .bind(&sql.table)
        .execute(pool)
        .await?
        .rows_affected())
}
