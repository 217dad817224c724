//! A `sql` handler's batch: the events of one batch in one transaction (the inbox insert,
//! then the statement for each event not already in the inbox, then one commit), and what
//! happens when it fails. A statement that fails for good (a constraint, a value the
//! column refuses) names its event: that event takes the failure and the others run again
//! without it. A failure no event can be named for (at the commit, say) runs the events
//! one by one. A retryable failure (connection, serialization, deadlock, timeout) fails
//! every event of the batch, recorded once by outage detection; each is retried alone.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use super::batch::Apply;
use super::sql::{classify, Core, Item};
use super::Outcome;
use crate::db::Database;

/// Why a batch's transaction failed.
enum Failure {
    /// The statement of the event at this position of the batch.
    At(usize, sqlx::Error),
    /// Anything else: beginning, the inbox insert, the commit.
    Whole(sqlx::Error),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Whole(e)
    }
}

/// MySQL and SQLite: per event, the inbox insert and, when it inserted, the statement
/// (its values bound as what they are), all in one transaction on `$pool`.
macro_rules! each_in_one_transaction {
    ($core:expr, $pool:expr, $inbox:expr, $items:expr, $which:expr, $ids:expr) => {{
        let mut tx = $pool.begin().await?;
        for (k, &i) in $which.iter().enumerate() {
            let inserted = sqlx::query($inbox)
                .bind(&$core.name)
                .bind($ids[k])
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 1 {
                bind_dynamic(sqlx::query(&$core.statement), &$items[i].values)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| Failure::At(k, e))?;
            } else {
                $core.already_handled($ids[k]);
            }
        }
        tx.commit().await?;
    }};
}

impl Apply<Item> for Arc<Core> {
    async fn apply(&self, items: Vec<Item>) -> Vec<Outcome> {
        self.apply_all(items).await
    }
}

impl Core {
    /// Applies `items`; one outcome per item, in order.
    pub(super) async fn apply_all(&self, items: Vec<Item>) -> Vec<Outcome> {
        self.batch_size.observe(items.len() as f64);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
        let mut rest: Vec<usize> = (0..items.len()).collect();
        while !rest.is_empty() {
            // `named`: the failure is the statement of the event at position `lead`.
            let (lead, named, failure) = match self.transaction(&items, &rest).await {
                Ok(()) => {
                    for &i in &rest {
                        outcomes[i] = Some(Outcome::Done);
                    }
                    break;
                }
                Err(Failure::At(k, e)) => (k, true, e),
                Err(Failure::Whole(e)) => (0, false, e),
            };
            match classify(&failure) {
                Outcome::DeadLetter(class, error) if rest.len() == 1 => {
                    outcomes[rest[0]] = Some(Outcome::DeadLetter(class, error));
                    break;
                }
                Outcome::DeadLetter(class, error) if named => {
                    // Its event is known: it alone takes the failure.
                    outcomes[rest.remove(lead)] = Some(Outcome::DeadLetter(class, error));
                    self.splits.inc();
                }
                Outcome::DeadLetter(..) => {
                    // No event is named: each runs alone.
                    self.splits.inc();
                    for i in std::mem::take(&mut rest) {
                        outcomes[i] = Some(self.alone(&items, i).await);
                    }
                }
                retry => {
                    let error = match retry {
                        Outcome::Retry(e) | Outcome::RetryShared(e, _) => e,
                        Outcome::RetryAfter(e, _) | Outcome::DeadLetter(_, e) => e,
                        Outcome::Done => String::new(),
                    };
                    for (k, &i) in rest.iter().enumerate() {
                        outcomes[i] = Some(if k == lead {
                            Outcome::Retry(error.clone())
                        } else {
                            Outcome::RetryShared(error.clone(), None)
                        });
                    }
                    break;
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Retry("no outcome".to_owned())))
            .collect()
    }

    /// Event `i` in a transaction of its own.
    async fn alone(&self, items: &[Item], i: usize) -> Outcome {
        match self.transaction(items, &[i]).await {
            Ok(()) => Outcome::Done,
            Err(Failure::At(_, e) | Failure::Whole(e)) => classify(&e),
        }
    }

    /// The events `items[i]` for each `i` of `which`, in one transaction.
    async fn transaction(&self, items: &[Item], which: &[usize]) -> Result<(), Failure> {
        let ids: Vec<&str> = which.iter().map(|&i| items[i].id.as_str()).collect();
        match &self.database {
            Database::Postgres { pool, .. } => {
                let params = self.params().await.map_err(|e| {
                    Failure::Whole(sqlx::Error::Protocol(format!("the statement: {e}")))
                })?;
                let mut tx = pool.begin().await?;
                // For this transaction only: a statement or lock wait past `timeout` fails
                // it (SQLSTATE 57014 or 55P03, retried) instead of holding a connection
                // indefinitely.
                sqlx::query(
                    "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $1, true)",
                )
                .bind(self.timeout_ms.to_string())
                .execute(&mut *tx)
                .await?;
                let fresh: Vec<String> = sqlx::query_scalar(
                    "INSERT INTO outboxd_inbox (handler, event_id) SELECT $1, unnest($2::text[]) \
                     ON CONFLICT DO NOTHING RETURNING event_id",
                )
                .bind(&self.name)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
                let mut fresh: HashSet<String> = fresh.into_iter().collect();
                for (k, &i) in which.iter().enumerate() {
                    // Taken out as it is applied: an id twice in a batch applies once.
                    if !fresh.remove(&items[i].id) {
                        self.already_handled(&items[i].id);
                        continue;
                    }
                    let args = self
                        .arguments(&items[i].values, params)
                        .map_err(|e| Failure::At(k, sqlx::Error::Protocol(e)))?;
                    sqlx::query_with(&self.statement, args)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| Failure::At(k, e))?;
                }
                tx.commit().await?;
            }
            Database::MySql { pool, .. } => {
                // Keyed by the SHA-256 of the whole id, compared byte for byte: ids that
                // differ only in case or past their first 255 characters are distinct.
                let inbox = "INSERT IGNORE INTO outboxd_inbox (handler, event_id, event_hash) \
                             SELECT ?, e.id, UNHEX(SHA2(e.id, 256)) FROM (SELECT ? AS id) e";
                each_in_one_transaction!(self, pool, inbox, items, which, ids);
            }
            Database::Sqlite { pool, .. } => {
                let inbox = "INSERT INTO outboxd_inbox (handler, event_id) VALUES (?, ?) ON CONFLICT DO NOTHING";
                each_in_one_transaction!(self, pool, inbox, items, which, ids);
            }
        }
        Ok(())
    }
}

/// MySQL and SQLite: the values bound as what they are (null, bool, integer, float,
/// text; u64 beyond i64, arrays and objects as their JSON text).
fn bind_dynamic<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    values: &'q [Option<Value>],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<f64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for value in values {
        query = match value {
            None => query.bind(None::<String>),
            Some(Value::Bool(b)) => query.bind(*b),
            Some(Value::Number(n)) if n.is_i64() => query.bind(n.as_i64()),
            Some(Value::Number(n)) if n.is_f64() => query.bind(n.as_f64()),
            Some(Value::String(s)) => query.bind(s.clone()),
            Some(other) => query.bind(other.to_string()),
        };
    }
    query
}
