//! The initial snapshot: the rows a table held when its slot was created, read in the
//! snapshot the slot exported (so the stream starts exactly after them) and published in
//! order before the stream begins.

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::deliver::{Batch, Deliverer, Origin};
use super::pgoutput::Value;
use super::rows::RowReader;
use super::source::describe_table;
use super::WalError;

/// Publishes every row of the table visible in `snapshot` (exported by the slot's
/// session, which must wait meanwhile), in order of the order column, `batch_size` rows
/// at a time. Returns how many.
pub async fn publish_existing(
    conn: &mut PgConnection,
    snapshot: &str,
    deliverer: &mut Deliverer,
    stop: &CancellationToken,
) -> Result<u64, WalError> {
    let t = deliverer.config.clone();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *conn)
        .await?;
    // The snapshot's name comes from the server; it is quoted as a literal regardless.
    sqlx::query(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .execute(&mut *conn)
    .await?;
    for set in [
        "SET LOCAL DateStyle = ISO",
        "SET LOCAL TimeZone = 'UTC'",
        "SET LOCAL bytea_output = hex",
        "SET LOCAL extra_float_digits = 3",
    ] {
        sqlx::query(set).execute(&mut *conn).await?;
    }
    let relation = describe_table(conn, &t.table)
        .await?
        .ok_or_else(|| WalError::NoTable(t.table.clone()))?;
    let reader = RowReader::new(&relation, &t)?;
    let select = format!(
        "SELECT {} FROM {} AS s ORDER BY s.\"{}\"",
        relation
            .columns
            .iter()
            .map(|c| format!("s.\"{}\"::text", c.name))
            .collect::<Vec<_>>()
            .join(", "),
        t.table
            .split('.')
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join("."),
        t.order_column().as_str(),
    );
    let batch_size = deliverer.batch_size();
    let mut batch = Batch::default();
    let mut published = 0u64;
    {
        let mut rows = sqlx::query(&select).fetch(&mut *conn);
        let mut chunk: Vec<Vec<Option<String>>> = Vec::with_capacity(batch_size);
        loop {
            let next = rows.try_next().await?;
            if let Some(row) = &next {
                chunk.push(
                    (0..relation.columns.len())
                        .map(|i| row.try_get::<Option<String>, _>(i))
                        .collect::<Result<_, _>>()?,
                );
            }
            if chunk.len() >= batch_size || (next.is_none() && !chunk.is_empty()) {
                for texts in chunk.drain(..) {
                    let values: Vec<Value<'_>> = texts
                        .iter()
                        .map(|v| {
                            v.as_deref()
                                .map_or(Value::Null, |s| Value::Text(s.as_bytes()))
                        })
                        .collect();
                    batch.push(reader.read(&values), Origin::Row(reader.row_data(&values)));
                }
                published += batch.len() as u64;
                deliverer.deliver(&mut batch, stop).await?;
            }
            if next.is_none() {
                break;
            }
        }
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(published)
}
