//! `sql`: runs a statement with parameters taken from the JSON payload by JSON pointers,
//! in one transaction with an insert into `outboxd_inbox`, so each event has its effect
//! once. On PostgreSQL parameter types come from the statement as the server prepares it;
//! MySQL and SQLite convert values themselves, so JSON values bind as what they are.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::error::ErrorKind;
use sqlx::postgres::{PgArguments, PgTypeInfo};
use sqlx::{Arguments, Either, Executor, Statement, TypeInfo};
use tokio::sync::OnceCell;

use super::{ErrorClass, Event, Handle, Outcome};
use crate::config::SqlHandlerConfig;
use crate::db::Database;

/// The Rust type a statement parameter is bound as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Text,
    Json,
    Uuid,
    /// MySQL and SQLite: bound as the JSON value's own type (null, bool, integer, float,
    /// text; arrays and objects as JSON text).
    Dynamic,
}

impl Param {
    fn of(ty: &PgTypeInfo) -> Option<Param> {
        Some(match ty.name() {
            "BOOL" => Param::Bool,
            "INT2" => Param::Int2,
            "INT4" => Param::Int4,
            "INT8" => Param::Int8,
            "FLOAT4" => Param::Float4,
            "FLOAT8" => Param::Float8,
            "NUMERIC" => Param::Numeric,
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "UNKNOWN" => Param::Text,
            "JSON" | "JSONB" => Param::Json,
            "UUID" => Param::Uuid,
            _ => return None,
        })
    }
}

/// MySQL and SQLite: the inbox insert and the statement in one transaction, the
/// statement's parameters bound as the JSON values' own types.
macro_rules! apply_dynamic {
    ($handler:expr, $pool:expr, $inbox:expr, $event:expr, $values:expr) => {
        async {
            let mut tx = $pool.begin().await?;
            let fresh = sqlx::query($inbox)
                .bind(&$handler.name)
                .bind($event.event_id().as_ref())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            if fresh {
                let mut query = sqlx::query(&$handler.statement);
                for value in $values {
                    query = match value {
                        None => query.bind(None::<String>),
                        Some(Value::Bool(b)) => query.bind(*b),
                        Some(Value::Number(n)) if n.is_i64() => query.bind(n.as_i64()),
                        Some(Value::Number(n)) if n.is_f64() => query.bind(n.as_f64()),
                        Some(Value::String(s)) => query.bind(s.clone()),
                        // u64 beyond i64, arrays and objects: their JSON text.
                        Some(other) => query.bind(other.to_string()),
                    };
                }
                query.execute(&mut *tx).await?;
                tx.commit().await?;
            } else {
                $handler.already_handled($event);
                tx.rollback().await?;
            }
            Ok::<(), sqlx::Error>(())
        }
        .await
    };
}

/// One statement.
pub struct SqlHandler {
    name: String,
    statement: String,
    pointers: Vec<String>,
    database: Database,
    params: OnceCell<Vec<Param>>,
    /// `timeout` in milliseconds, as PostgreSQL's settings take it.
    timeout_ms: u128,
}

impl SqlHandler {
    /// A handler running the configured statement on `database`.
    pub fn new(name: &str, c: &SqlHandlerConfig, database: Database) -> Self {
        SqlHandler {
            name: name.to_owned(),
            statement: c.statement.clone(),
            pointers: c.params.clone(),
            database,
            params: OnceCell::new(),
            timeout_ms: c.timeout.as_millis().max(1),
        }
    }

    /// Parameter types, from the statement as the database prepares it (once).
    async fn params(&self) -> Result<&[Param], String> {
        let params = self
            .params
            .get_or_try_init(|| async {
                let preparing = |e: sqlx::Error| format!("preparing the statement: {e}");
                let statement = self.statement.as_str();
                let types: Vec<PgTypeInfo> = match &self.database {
                    Database::Postgres { pool, .. } => {
                        let prepared = pool.prepare(statement).await.map_err(preparing)?;
                        match prepared.parameters() {
                            Some(Either::Left(types)) => types.to_vec(),
                            _ => Vec::new(),
                        }
                    }
                    Database::MySql { pool, .. } => {
                        let prepared = pool.prepare(statement).await.map_err(preparing)?;
                        let n = parameter_count(prepared.parameters());
                        return self.dynamic(n);
                    }
                    Database::Sqlite { pool, .. } => {
                        let prepared = pool.prepare(statement).await.map_err(preparing)?;
                        let n = parameter_count(prepared.parameters());
                        return self.dynamic(n);
                    }
                };
                if types.len() != self.pointers.len() {
                    return Err(format!(
                        "the statement has {} parameters but {} params are configured",
                        types.len(),
                        self.pointers.len()
                    ));
                }
                types
                    .iter()
                    .enumerate()
                    .map(|(i, ty)| {
                        Param::of(ty).ok_or_else(|| {
                            format!(
                                "parameter ${} has type {}, which outboxd cannot bind; write ${}::text::{} in the statement",
                                i + 1,
                                ty.name(),
                                i + 1,
                                ty.name().to_lowercase()
                            )
                        })
                    })
                    .collect()
            })
            .await?;
        Ok(params)
    }

    fn dynamic(&self, count: usize) -> Result<Vec<Param>, String> {
        if count != self.pointers.len() {
            return Err(format!(
                "the statement has {count} parameters but {} params are configured",
                self.pointers.len()
            ));
        }
        Ok(vec![Param::Dynamic; count])
    }

    /// The payload values the pointers find (`None` binds NULL).
    fn values<'v>(&self, payload: &'v Value) -> Vec<Option<&'v Value>> {
        self.pointers
            .iter()
            .map(|pointer| payload.pointer(pointer).filter(|v| !v.is_null()))
            .collect()
    }

    fn arguments(&self, payload: &Value, params: &[Param]) -> Result<PgArguments, String> {
        let mut args = PgArguments::default();
        for (i, (pointer, param)) in self.pointers.iter().zip(params).enumerate() {
            let value = payload.pointer(pointer).filter(|v| !v.is_null());
            bind(&mut args, *param, value)
                .map_err(|e| format!("parameter ${} ({pointer}): {e}", i + 1))?;
        }
        Ok(args)
    }
}

impl Handle for SqlHandler {
    async fn handle(&self, event: &Event, _attempt: u32) -> Outcome {
        let payload: Value = match serde_json::from_slice(event.value()) {
            Ok(v) => v,
            Err(e) => {
                return Outcome::DeadLetter(ErrorClass::Decode, format!("payload is not JSON: {e}"))
            }
        };
        let params = match self.params().await {
            Ok(p) => p,
            Err(e) => return Outcome::Retry(e),
        };
        let applied = match &self.database {
            Database::Postgres { pool, .. } => {
                let args = match self.arguments(&payload, params) {
                    Ok(args) => args,
                    Err(e) => return Outcome::DeadLetter(ErrorClass::Decode, e),
                };
                self.apply_pg(pool, event, args).await
            }
            Database::MySql { pool, .. } => {
                // Keyed by the SHA-256 of the whole id, compared byte for byte: ids that
                // differ only in case or past their first 255 characters are distinct.
                let inbox = "INSERT IGNORE INTO outboxd_inbox (handler, event_id, event_hash) \
                             SELECT ?, e.id, UNHEX(SHA2(e.id, 256)) FROM (SELECT ? AS id) e";
                apply_dynamic!(self, pool, inbox, event, self.values(&payload))
            }
            Database::Sqlite { pool, .. } => {
                let inbox = "INSERT INTO outboxd_inbox (handler, event_id) VALUES (?, ?) ON CONFLICT DO NOTHING";
                apply_dynamic!(self, pool, inbox, event, self.values(&payload))
            }
        };
        match applied {
            Ok(()) => Outcome::Done,
            Err(e) => classify(&e),
        }
    }
}

impl SqlHandler {
    /// Inbox insert and statement in one transaction; an event already in the inbox is a
    /// success without running the statement again.
    async fn apply_pg(
        &self,
        pool: &sqlx::PgPool,
        event: &Event,
        args: PgArguments,
    ) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        // For this transaction only: a statement or lock wait past `timeout` fails it
        // (SQLSTATE 57014 or 55P03, retried) instead of holding a call slot and a
        // connection indefinitely.
        sqlx::query(
            "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $1, true)",
        )
        .bind(self.timeout_ms.to_string())
        .execute(&mut *tx)
        .await?;
        let fresh = sqlx::query(
            "INSERT INTO outboxd_inbox (handler, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&self.name)
        .bind(event.event_id().as_ref())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if fresh {
            sqlx::query_with(&self.statement, args)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        } else {
            self.already_handled(event);
            tx.rollback().await?;
        }
        Ok(())
    }

    fn already_handled(&self, event: &Event) {
        tracing::debug!(handler = %self.name, event_id = %event.event_id(), "event already in the inbox; no second effect");
    }
}

fn parameter_count<T>(parameters: Option<Either<&[T], usize>>) -> usize {
    match parameters {
        Some(Either::Right(n)) => n,
        Some(Either::Left(types)) => types.len(),
        None => 0,
    }
}

fn bind(args: &mut PgArguments, param: Param, value: Option<&Value>) -> Result<(), String> {
    let added = match param {
        Param::Bool => args.add(value.map(as_bool).transpose()?),
        Param::Int2 => args.add(
            value
                .map(|v| as_int(v).and_then(narrow::<i16>))
                .transpose()?,
        ),
        Param::Int4 => args.add(
            value
                .map(|v| as_int(v).and_then(narrow::<i32>))
                .transpose()?,
        ),
        Param::Int8 => args.add(value.map(as_int).transpose()?),
        Param::Float4 => args.add(value.map(|v| as_float(v).map(|f| f as f32)).transpose()?),
        Param::Float8 => args.add(value.map(as_float).transpose()?),
        Param::Numeric => args.add(value.map(as_decimal).transpose()?),
        Param::Text => args.add(value.map(as_text)),
        Param::Json => args.add(value.map(sqlx::types::Json)),
        Param::Uuid => args.add(value.map(as_uuid).transpose()?),
        Param::Dynamic => return Err("dynamic parameters are bound without PgArguments".into()),
    };
    added.map_err(|e| e.to_string())
}

fn as_bool(v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => s.parse().map_err(|_| format!("`{s}` is not a boolean")),
        other => Err(format!("{other} is not a boolean")),
    }
}

fn as_int(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("{n} is not an integer")),
        Value::String(s) => s.parse().map_err(|_| format!("`{s}` is not an integer")),
        other => Err(format!("{other} is not an integer")),
    }
}

fn narrow<T: TryFrom<i64>>(i: i64) -> Result<T, String> {
    T::try_from(i).map_err(|_| format!("{i} is out of range"))
}

fn as_float(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        Value::String(s) => s.parse().map_err(|_| format!("`{s}` is not a number")),
        other => Err(format!("{other} is not a number")),
    }
}

fn as_decimal(v: &Value) -> Result<Decimal, String> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => return Err(format!("{other} is not a number")),
    };
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| format!("`{text}` is not a decimal number"))
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn as_uuid(v: &Value) -> Result<uuid::Uuid, String> {
    match v {
        Value::String(s) => s.parse().map_err(|_| format!("`{s}` is not a uuid")),
        other => Err(format!("{other} is not a uuid")),
    }
}

/// Serialization failures, deadlocks, lock timeouts, shutdowns and connection trouble are
/// retried; integrity violations (SQLSTATE 23xxx, or any constraint on SQLite) and data
/// errors (22xxx) will fail again and dead-letter.
fn classify(e: &sqlx::Error) -> Outcome {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let integrity = !matches!(db.kind(), ErrorKind::Other);
            if integrity || code.starts_with("23") || code.starts_with("22") {
                Outcome::DeadLetter(ErrorClass::Permanent, format!("{e} (code {code})"))
            } else {
                Outcome::Retry(format!("{e} (code {code})"))
            }
        }
        other => Outcome::Retry(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_convert_to_parameter_types() {
        assert_eq!(as_int(&serde_json::json!(5)), Ok(5));
        assert_eq!(as_int(&serde_json::json!("7")), Ok(7));
        assert!(as_int(&serde_json::json!(1.5)).is_err());
        assert!(narrow::<i16>(70_000).is_err());
        assert_eq!(
            as_decimal(&serde_json::json!(10.25)).unwrap().to_string(),
            "10.25"
        );
        assert_eq!(as_text(&serde_json::json!({"a": 1})), r#"{"a":1}"#);
        assert!(as_uuid(&serde_json::json!("not-a-uuid")).is_err());
        assert_eq!(as_bool(&serde_json::json!("true")), Ok(true));
    }
}
