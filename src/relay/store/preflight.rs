//! The checks of `check-config --connect` that need the database, changing nothing:
//! whether the database user may run each kind of statement the relay runs on a table
//! and on outboxd's own tables (PostgreSQL and MySQL EXPLAIN one statement of each kind,
//! which checks its privileges without running it; SQLite, which has no privileges but
//! may be read-only, runs each in a transaction it rolls back), whether the claims of mark
//! mode and of cursor mode by transaction-id column have an index to read, and whether a
//! cursor-mode table without that column is large enough for its claims to hurt. Every
//! probe matches no row.

use sqlx::{MySqlPool, PgPool, Pool, SqlitePool};

use super::{Mark, StoreError};
use crate::config::{OnPublished, TableConfig};
use crate::db::Database;

/// What the preflight found about one outbox table beyond its columns.
#[derive(Debug, Default)]
pub struct TableCheck {
    /// The kinds of statement the relay runs on the table that the database refused.
    pub denied: Vec<Denied>,
    /// Mark mode without an index that serves the claim of pending rows, or cursor mode
    /// with a transaction-id column and no index that starts with it and the order
    /// column: the statement that creates one.
    pub missing_index: Option<String>,
    /// Cursor mode without a transaction-id column on a table of more than
    /// [`LARGE_CURSOR_TABLE`] rows (PostgreSQL): about how many rows every claim reads.
    pub whole_table_claims: Option<i64>,
}

/// The rows above which a cursor-mode claim that reads the whole table costs more than
/// a few hundred milliseconds (about 1 µs per row).
pub const LARGE_CURSOR_TABLE: i64 = 250_000;

/// A kind of statement the database user may not run, and the database's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// What was refused, e.g. `DELETE on outbox`.
    pub need: String,
    /// The database's error text.
    pub answer: String,
}

/// One statement of a kind the relay runs, and what it needs.
struct Probe {
    need: String,
    sql: String,
}

/// A table's names as its backend quotes them in statements.
pub(super) struct Quoted {
    /// The table.
    pub table: String,
    /// Every mapped column, comma-separated.
    pub columns: String,
    /// `published_column`.
    pub mark_column: String,
    /// The order column.
    pub order_column: String,
    /// The transaction-id column (cursor mode), if any.
    pub xid_column: Option<String>,
}

impl Quoted {
    /// The names of `t`, quoted with the backend's `q` (an identifier) and `quote_table`.
    pub(super) fn new(
        t: &TableConfig,
        q: fn(&str) -> String,
        quote_table: fn(&str) -> String,
    ) -> Self {
        let columns: Vec<String> = super::required_columns(t)
            .iter()
            .map(|(_, column)| q(column))
            .collect();
        Quoted {
            table: quote_table(&t.table),
            columns: columns.join(", "),
            mark_column: q(&t.published_column),
            order_column: q(t.order_column()),
            xid_column: t.xid_column.as_ref().map(|c| q(c)),
        }
    }
}

/// The kinds of statement the relay runs on table `t` in its mode; `locks` whether its
/// claims lock rows (`FOR UPDATE`).
fn table_probes(t: &TableConfig, q: &Quoted, mark: Option<Mark>, locks: bool) -> Vec<Probe> {
    let probe = |need: &str, sql: String| Probe {
        need: format!("{need} on {}", t.table),
        sql,
    };
    let Quoted {
        table,
        columns,
        mark_column,
        ..
    } = q;
    let select = format!("SELECT {columns} FROM {table} WHERE 1 = 0");
    let delete = format!("DELETE FROM {table} WHERE 1 = 0");
    let locking = || match locks {
        true => probe("SELECT ... FOR UPDATE", format!("{select} FOR UPDATE")),
        false => probe("SELECT", select.clone()),
    };
    match t.on_published {
        OnPublished::Cursor => vec![probe("SELECT", select.clone())],
        OnPublished::Delete => vec![locking(), probe("DELETE", delete)],
        OnPublished::Mark => {
            let update = probe(
                &format!("UPDATE of {}", t.published_column),
                format!("UPDATE {table} SET {mark_column} = {mark_column} WHERE 1 = 0"),
            );
            let mut probes = vec![locking(), update];
            if mark == Some(Mark::Time) {
                probes.push(probe("DELETE (the retention purge)", delete));
            }
            probes
        }
    }
}

/// What outboxd itself keeps in the database: which of its tables the configuration uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnTables {
    /// Relay tables are configured: dead rows and refusal counters.
    pub relay: bool,
    /// A table is relayed in cursor mode: lane positions.
    pub cursors: bool,
    /// A `sql` handler is configured: its inbox.
    pub inbox: bool,
    /// A table is relayed from the WAL: the slots outboxd created.
    pub slots: bool,
}

impl OwnTables {
    fn probes(self) -> Vec<Probe> {
        let mut probes = Vec::new();
        let mut add = |table: &str, column: &str, needs: &[&str]| {
            for need in needs {
                let sql = match *need {
                    "SELECT" => format!("SELECT {column} FROM {table} WHERE 1 = 0"),
                    "INSERT" => format!("INSERT INTO {table} SELECT * FROM {table} WHERE 1 = 0"),
                    "UPDATE" => format!("UPDATE {table} SET {column} = {column} WHERE 1 = 0"),
                    _ => format!("DELETE FROM {table} WHERE 1 = 0"),
                };
                probes.push(Probe {
                    need: format!("{need} on {table}"),
                    sql,
                });
            }
        };
        if self.relay {
            add("outboxd_dead_rows", "source_table", &["SELECT", "INSERT"]);
            let all = ["SELECT", "INSERT", "UPDATE", "DELETE"];
            add("outboxd_relay_attempts", "source_table", &all);
        }
        if self.cursors {
            let upsert = ["SELECT", "INSERT", "UPDATE"];
            add("outboxd_relay_cursors", "source_table", &upsert);
        }
        if self.slots {
            let all = ["SELECT", "INSERT", "UPDATE", "DELETE"];
            add("outboxd_relay_slots", "slot_name", &all);
        }
        if self.inbox {
            // SELECT: PostgreSQL's batch insert returns the ids it inserted.
            add("outboxd_inbox", "handler", &["SELECT", "INSERT"]);
        }
        probes
    }
}

/// Which of outboxd's own tables the database user may not use as `own` needs.
pub async fn own_tables(db: &Database, own: OwnTables) -> Result<Vec<Denied>, StoreError> {
    let probes = own.probes();
    if probes.is_empty() {
        return Ok(Vec::new());
    }
    match db {
        Database::Postgres { pool, .. } => explained(pool, &probes).await,
        Database::MySql { pool, .. } => explained(pool, &probes).await,
        Database::Sqlite { pool, .. } => sqlite_probes(pool, &probes).await,
    }
}

/// A database error is the answer to a probe; a failed connection ends the check.
fn answer(need: &str, e: sqlx::Error) -> Result<Denied, StoreError> {
    match e {
        sqlx::Error::Database(db) => Ok(Denied {
            need: need.to_owned(),
            answer: db.message().to_owned(),
        }),
        other => Err(other.into()),
    }
}

/// PostgreSQL and MySQL: EXPLAINs each probe, which checks its privileges without
/// running it.
async fn explained<DB: sqlx::Database>(
    pool: &Pool<DB>,
    probes: &[Probe],
) -> Result<Vec<Denied>, StoreError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let mut denied = Vec::new();
    for p in probes {
        let explain = format!("EXPLAIN {}", p.sql);
        if let Err(e) = sqlx::raw_sql(&explain).execute(pool).await {
            denied.push(answer(&p.need, e)?);
        }
    }
    Ok(denied)
}

/// SQLite: runs each probe (which matches no row) in one transaction, then rolls it back.
/// SQLite has no privileges; what refuses a write is a read-only file or directory, or a
/// URL that asks for read-only.
async fn sqlite_probes(pool: &SqlitePool, probes: &[Probe]) -> Result<Vec<Denied>, StoreError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    let mut denied = Vec::new();
    for p in probes {
        if let Err(e) = sqlx::query(&p.sql).execute(&mut *conn).await {
            denied.push(answer(&p.need, e)?);
        }
    }
    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
    Ok(denied)
}

/// Normalises an index predicate for comparison: no quotes, brackets or case.
fn normalised(predicate: &str) -> String {
    predicate
        .chars()
        .filter(|c| !matches!(c, '"' | '`' | '(' | ')'))
        .collect::<String>()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The predicate of the claim of pending rows in mark mode, as an index needs it.
fn pending_predicate(mark_column: &str, mark: Mark) -> String {
    match mark {
        Mark::Time => format!("{mark_column} IS NULL"),
        Mark::Flag => format!("{mark_column} IS NOT TRUE"),
    }
}

/// Whether one of `predicates` (of partial indexes on the table) is the claim's.
fn serves_claim(predicates: &[String], mark_column: &str, mark: Mark) -> bool {
    let wanted = normalised(&pending_predicate(mark_column, mark));
    predicates.iter().any(|p| normalised(p) == wanted)
}

/// The index `index` to create for mark mode, when none of the table's partial index
/// `predicates` serves the claim.
fn advice(q: &Quoted, mark: Mark, predicates: &[String], index: &str) -> Option<String> {
    (!serves_claim(predicates, &q.mark_column, mark)).then(|| {
        format!(
            "CREATE INDEX {index} ON {} ({}) WHERE {}",
            q.table,
            q.order_column,
            pending_predicate(&q.mark_column, mark)
        )
    })
}

/// PostgreSQL: the checks of table `t`.
pub(super) async fn postgres(
    pool: &PgPool,
    t: &TableConfig,
    q: &Quoted,
    mark: Option<Mark>,
) -> Result<TableCheck, StoreError> {
    let denied = explained(pool, &table_probes(t, q, mark, true)).await?;
    let missing_index = match (t.on_published, mark, &t.xid_column) {
        (OnPublished::Mark, Some(mark), _) => {
            let predicates: Vec<String> = sqlx::query_scalar(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index \
                 WHERE indrelid = to_regclass($1) AND indpred IS NOT NULL",
            )
            .bind(&q.table)
            .fetch_all(pool)
            .await?;
            advice(
                q,
                mark,
                &predicates,
                &format!("{}_pending", split_schema(&t.table).1),
            )
        }
        (OnPublished::Cursor, _, Some(xid)) => {
            let serving: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_index i WHERE i.indrelid = to_regclass($1) \
                 AND i.indpred IS NULL AND i.indisvalid AND i.indnatts >= 2 \
                 AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = i.indrelid AND attname = $2) \
                 AND i.indkey[1] = (SELECT attnum FROM pg_attribute WHERE attrelid = i.indrelid AND attname = $3)",
            )
            .bind(&q.table)
            .bind(xid.as_str())
            .bind(t.order_column().as_str())
            .fetch_one(pool)
            .await?;
            (serving == 0).then(|| {
                format!(
                    "CREATE INDEX CONCURRENTLY {}_xid ON {} ({}, {})",
                    split_schema(&t.table).1,
                    q.table,
                    q.xid_column.as_deref().unwrap_or_default(),
                    q.order_column
                )
            })
        }
        _ => None,
    };
    let whole_table_claims = if t.on_published == OnPublished::Cursor && t.xid_column.is_none() {
        // The planner's estimate; a table never analysed is counted, up to the limit.
        let estimate: f32 =
            sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
                .bind(&q.table)
                .fetch_one(pool)
                .await?;
        let rows = if estimate < 0.0 {
            sqlx::query_scalar(&format!(
                "SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {}) r",
                q.table,
                LARGE_CURSOR_TABLE + 1
            ))
            .fetch_one(pool)
            .await?
        } else {
            estimate as i64
        };
        (rows > LARGE_CURSOR_TABLE).then_some(rows)
    } else {
        None
    };
    Ok(TableCheck {
        denied,
        missing_index,
        whole_table_claims,
    })
}

/// MySQL: the checks of table `t`. MySQL has no partial indexes: the claim needs an
/// index that starts with the mark column.
pub(super) async fn mysql(
    pool: &MySqlPool,
    t: &TableConfig,
    q: &Quoted,
    mark: Option<Mark>,
) -> Result<TableCheck, StoreError> {
    let denied = explained(pool, &table_probes(t, q, mark, true)).await?;
    let (schema, name) = split_schema(&t.table);
    let missing_index = if t.on_published == OnPublished::Mark {
        let leading: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
             AND COLUMN_NAME = ? AND SEQ_IN_INDEX = 1",
        )
        .bind(schema)
        .bind(name)
        .bind(t.published_column.as_str())
        .fetch_one(pool)
        .await?;
        (leading == 0).then(|| {
            format!(
                "CREATE INDEX {name}_pending ON {} ({}, {})",
                q.table, q.mark_column, q.order_column
            )
        })
    } else {
        None
    };
    Ok(TableCheck {
        denied,
        missing_index,
        whole_table_claims: None,
    })
}

/// `schema.table` -> `(Some(schema), table)`.
fn split_schema(table: &str) -> (Option<&str>, &str) {
    match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    }
}

/// SQLite: the checks of table `t`.
pub(super) async fn sqlite(
    pool: &SqlitePool,
    t: &TableConfig,
    q: &Quoted,
    mark: Option<Mark>,
) -> Result<TableCheck, StoreError> {
    let denied = sqlite_probes(pool, &table_probes(t, q, mark, false)).await?;
    let missing_index = match (t.on_published, mark) {
        (OnPublished::Mark, Some(mark)) => {
            let (schema, name) = split_schema(&t.table);
            let master = match schema {
                Some(schema) => format!("\"{schema}\".sqlite_master"),
                None => "sqlite_master".to_owned(),
            };
            let definitions: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT sql FROM {master} WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL"
            ))
            .bind(name)
            .fetch_all(pool)
            .await?;
            let predicates: Vec<String> = definitions
                .iter()
                .filter_map(|sql| {
                    let at = sql.to_uppercase().rfind(" WHERE ")?;
                    sql.get(at + " WHERE ".len()..).map(str::to_owned)
                })
                .collect();
            advice(q, mark, &predicates, &format!("{name}_pending"))
        }
        _ => None,
    };
    Ok(TableCheck {
        denied,
        missing_index,
        whole_table_claims: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_serves_the_claim_only_with_the_claims_own_predicate() {
        let pg = vec!["(published IS NOT TRUE)".to_owned()];
        assert!(serves_claim(&pg, "published", Mark::Flag));
        assert!(!serves_claim(&pg, "published", Mark::Time));
        let quoted = vec!["\"Published_At\" is   null".to_owned()];
        assert!(serves_claim(&quoted, "Published_At", Mark::Time));
        let other = vec!["(NOT published)".to_owned(), "(kind = 'x')".to_owned()];
        assert!(!serves_claim(&other, "published", Mark::Flag));
        assert!(!serves_claim(&[], "published", Mark::Flag));
    }

    #[test]
    fn each_mode_probes_what_it_runs() {
        let mut t = TableConfig {
            table: "outbox".into(),
            ..TableConfig::default()
        };
        let q = Quoted {
            table: "\"outbox\"".into(),
            columns: "\"id\"".into(),
            mark_column: "\"published_at\"".into(),
            order_column: "\"id\"".into(),
            xid_column: None,
        };
        let needs = |t: &TableConfig, mark| -> Vec<String> {
            table_probes(t, &q, mark, true)
                .into_iter()
                .map(|p| p.need)
                .collect()
        };
        assert_eq!(
            needs(&t, None),
            ["SELECT ... FOR UPDATE on outbox", "DELETE on outbox"]
        );
        t.on_published = OnPublished::Mark;
        assert_eq!(
            needs(&t, Some(Mark::Time)),
            [
                "SELECT ... FOR UPDATE on outbox",
                "UPDATE of published_at on outbox",
                "DELETE (the retention purge) on outbox"
            ]
        );
        assert_eq!(
            needs(&t, Some(Mark::Flag)),
            [
                "SELECT ... FOR UPDATE on outbox",
                "UPDATE of published_at on outbox"
            ]
        );
        t.on_published = OnPublished::Cursor;
        assert_eq!(needs(&t, None), ["SELECT on outbox"]);
    }
}
