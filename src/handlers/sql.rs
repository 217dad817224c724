//! `sql`: runs a statement with parameters taken from the JSON payload by JSON pointers,
//! in one transaction with an insert into `outboxd_inbox`, so each event has its effect
//! once. On PostgreSQL parameter types come from the statement as the server prepares it;
//! MySQL and SQLite convert values themselves, so JSON values bind as what they are.
//! Events that arrive together run in one transaction (`sql_batch`).

use std::str::FromStr;
use std::sync::Arc;

use prometheus::{Histogram, IntCounter};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::error::ErrorKind;
use sqlx::postgres::{PgArguments, PgTypeInfo};
use sqlx::{Arguments, Either, Executor, Statement, TypeInfo};
use tokio::sync::OnceCell;

use super::batch::{Batcher, CONCURRENT};
use super::{ErrorClass, Event, Handle, Outcome};
use crate::config::SqlHandlerConfig;
use crate::db::Database;
use crate::metrics::Metrics;

/// The Rust type a statement parameter is bound as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Param {
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

/// One statement, applied to batches of events (see [`super::batch`]).
pub struct SqlHandler {
    core: Arc<Core>,
    /// With `batch_size` above 1: first calls of messages go through it.
    batcher: Option<Batcher<Item, Arc<Core>>>,
}

/// What applying events needs: the statement, its parameters, the database.
pub(super) struct Core {
    pub(super) name: String,
    pub(super) statement: String,
    pointers: Vec<String>,
    pub(super) database: Database,
    params: OnceCell<Vec<Param>>,
    /// `timeout` in milliseconds, as PostgreSQL's settings take it.
    pub(super) timeout_ms: u128,
    pub(super) batch_size: Histogram,
    pub(super) splits: IntCounter,
}

/// One event to apply: its id (the inbox key) and the values its parameters bind.
pub(super) struct Item {
    pub(super) id: String,
    pub(super) values: Vec<Option<Value>>,
}

impl SqlHandler {
    /// A handler running the configured statement on `database`.
    pub fn new(name: &str, c: &SqlHandlerConfig, database: Database, metrics: &Metrics) -> Self {
        let core = Arc::new(Core {
            name: name.to_owned(),
            statement: c.statement.clone(),
            pointers: c.params.clone(),
            database,
            params: OnceCell::new(),
            timeout_ms: c.timeout.as_millis().max(1),
            batch_size: metrics.consumer_batch_size.with_label_values(&[name]),
            splits: metrics
                .consumer_batch_splits_total
                .with_label_values(&[name]),
        });
        // SQLite has one writer: a second batch at once would only wait for the first.
        let concurrent = match core.database {
            Database::Sqlite { .. } => 1,
            _ => CONCURRENT,
        };
        let batcher = (c.batch_size > 1)
            .then(|| Batcher::new(core.clone(), c.batch_size, c.batch_linger, concurrent));
        SqlHandler { core, batcher }
    }
}

impl Core {
    /// Parameter types, from the statement as the database prepares it (once).
    pub(super) async fn params(&self) -> Result<&[Param], String> {
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
    fn values(&self, payload: &Value) -> Vec<Option<Value>> {
        self.pointers
            .iter()
            .map(|pointer| payload.pointer(pointer).filter(|v| !v.is_null()).cloned())
            .collect()
    }

    /// PostgreSQL: the values bound as the statement's parameter types.
    pub(super) fn arguments(
        &self,
        values: &[Option<Value>],
        params: &[Param],
    ) -> Result<PgArguments, String> {
        let mut args = PgArguments::default();
        for (i, ((pointer, param), value)) in
            self.pointers.iter().zip(params).zip(values).enumerate()
        {
            bind(&mut args, *param, value.as_ref())
                .map_err(|e| format!("parameter ${} ({pointer}): {e}", i + 1))?;
        }
        Ok(args)
    }

    pub(super) fn already_handled(&self, id: &str) {
        tracing::debug!(handler = %self.name, event_id = %id, "event already in the inbox; no second effect");
    }
}

impl Handle for SqlHandler {
    async fn handle(&self, event: &Event, attempt: u32) -> Outcome {
        let core = &self.core;
        let payload: Value = match serde_json::from_slice(event.value()) {
            Ok(v) => v,
            Err(e) => {
                return Outcome::DeadLetter(ErrorClass::Decode, format!("payload is not JSON: {e}"))
            }
        };
        let params = match core.params().await {
            Ok(p) => p,
            Err(e) => return Outcome::Retry(e),
        };
        let values = core.values(&payload);
        if matches!(core.database, Database::Postgres { .. }) {
            // A value that does not convert fails this message alone, before any batch.
            if let Err(e) = core.arguments(&values, params) {
                return Outcome::DeadLetter(ErrorClass::Decode, e);
            }
        }
        let item = Item {
            id: event.event_id().into_owned(),
            values,
        };
        match &self.batcher {
            // A retry runs alone: a message that keeps failing takes no other with it.
            Some(batcher) if attempt <= 1 => batcher.submit(item).await,
            _ => core.apply_all(vec![item]).await.pop().unwrap_or_else(|| {
                Outcome::Retry("the event was applied without an outcome".to_owned())
            }),
        }
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
pub(super) fn classify(e: &sqlx::Error) -> Outcome {
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
