//! `sql`: runs a statement with parameters taken from the JSON payload by JSON pointers,
//! in one transaction with an insert into `outboxd_inbox`, so each event has its effect
//! once. Parameter types come from the statement as PostgreSQL prepares it.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgTypeInfo};
use sqlx::{Arguments, Either, Executor, PgPool, Statement, TypeInfo};
use tokio::sync::OnceCell;

use super::{ErrorClass, Event, Handle, Outcome};
use crate::config::SqlHandlerConfig;

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

/// One statement.
pub struct SqlHandler {
    name: String,
    statement: String,
    pointers: Vec<String>,
    pool: PgPool,
    params: OnceCell<Vec<Param>>,
}

impl SqlHandler {
    /// A handler running the configured statement on `pool`.
    pub fn new(name: &str, c: &SqlHandlerConfig, pool: PgPool) -> Self {
        SqlHandler {
            name: name.to_owned(),
            statement: c.statement.clone(),
            pointers: c.params.clone(),
            pool,
            params: OnceCell::new(),
        }
    }

    /// Parameter types, asked from PostgreSQL once.
    async fn params(&self) -> Result<&[Param], String> {
        let params = self
            .params
            .get_or_try_init(|| async {
                let prepared = (&self.pool)
                    .prepare(self.statement.as_str())
                    .await
                    .map_err(|e| format!("preparing the statement: {e}"))?;
                let types: Vec<PgTypeInfo> = match prepared.parameters() {
                    Some(Either::Left(types)) => types.to_vec(),
                    _ => Vec::new(),
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
        let args = match self.arguments(&payload, params) {
            Ok(args) => args,
            Err(e) => return Outcome::DeadLetter(ErrorClass::Decode, e),
        };
        match self.apply(event, args).await {
            Ok(()) => Outcome::Done,
            Err(e) => classify(&e),
        }
    }
}

impl SqlHandler {
    /// Inbox insert and statement in one transaction; an event already in the inbox is a
    /// success without running the statement again.
    async fn apply(&self, event: &Event, args: PgArguments) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
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
            tracing::debug!(handler = %self.name, event_id = %event.event_id(), "event already in the inbox; no second effect");
            tx.rollback().await?;
        }
        Ok(())
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
/// retried; integrity (23xxx) and data (22xxx) errors will fail again and dead-letter.
fn classify(e: &sqlx::Error) -> Outcome {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if code.starts_with("23") || code.starts_with("22") {
                Outcome::DeadLetter(ErrorClass::Permanent, format!("{e} (SQLSTATE {code})"))
            } else {
                Outcome::Retry(format!("{e} (SQLSTATE {code})"))
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
