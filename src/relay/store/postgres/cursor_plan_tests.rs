//! The plans of cursor-mode claims on a real PostgreSQL (`DATABASE_URL`): with a
//! transaction-id column a claim is one index range whatever the table holds; without it,
//! and for rows written before the column, a claim reads the whole table.

use sqlx::{Connection, Executor, PgConnection};

use super::cursor::Claims;
use super::statements::{introspect, TableSql};
use crate::config::{Column, OnPublished, TableConfig};

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn column(name: &str) -> Column {
    Column::new(name).unwrap()
}

/// The seed's event store with a transaction-id column, holding `rows` rows written
/// before the column existed (NULL) and `rows` after, in several transactions.
async fn event_store(conn: &mut PgConnection, rows: i64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let table = format!("cursor_plan_{}_{nanos}", std::process::id());
    let insert = format!(
        "INSERT INTO {table} (aggregate_id, event_type, version, timestamp, data) \
         SELECT 'a' || (g % 100), 'Deposited', g, 0, jsonb_build_object('n', g) \
         FROM generate_series(1, {}) g",
        rows / 4
    );
    conn.execute(
        format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, aggregate_id text NOT NULL, \
             event_type text NOT NULL, version integer NOT NULL, timestamp double precision NOT NULL, \
             data jsonb NOT NULL, metadata jsonb)"
        )
        .as_str(),
    )
    .await
    .unwrap();
    for _ in 0..4 {
        conn.execute(insert.as_str()).await.unwrap();
    }
    conn.execute(
        format!(
            "ALTER TABLE {table} ADD COLUMN txid xid8; \
             ALTER TABLE {table} ALTER COLUMN txid SET DEFAULT pg_current_xact_id(); \
             CREATE INDEX {table}_xid ON {table} (txid, id)"
        )
        .as_str(),
    )
    .await
    .unwrap();
    for _ in 0..4 {
        conn.execute(insert.as_str()).await.unwrap();
    }
    conn.execute(format!("VACUUM ANALYZE {table}").as_str())
        .await
        .unwrap();
    table
}

fn cursor_table(table: &str, lanes: u32, xid: Option<&str>) -> TableConfig {
    TableConfig {
        table: table.to_owned(),
        topic: Some("events".to_owned()),
        on_published: OnPublished::Cursor,
        key_column: column("aggregate_id"),
        payload_column: column("data"),
        headers_column: Some(column("metadata")),
        created_at_column: Some(column("timestamp")),
        event_id_column: None,
        event_type_column: Some(column("event_type")),
        aggregate_type_column: None,
        xid_column: xid.map(column),
        lanes,
        ..TableConfig::default()
    }
}

/// `EXPLAIN ANALYZE` of a claim of 500 rows of lane 0, from the start.
async fn plan(conn: &mut PgConnection, t: &TableConfig, statement: &str) -> String {
    let rows: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, COSTS OFF) {statement}"))
            .bind(500_i64)
            .bind(&t.table)
            .bind(t.lanes as i32)
            .bind(0_i32)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn a_claim_by_transaction_id_column_reads_one_index_range() {
    let mut conn = PgConnection::connect(&url()).await.unwrap();
    // outboxd's own tables (the lanes' positions).
    crate::db::migrator(crate::config::Backend::Postgres)
        .run(&mut conn)
        .await
        .unwrap();
    let table = event_store(&mut conn, 100_000).await;
    for lanes in [1, 4] {
        let t = cursor_table(&table, lanes, Some("txid"));
        let shape = introspect(&mut conn, &t).await.unwrap();
        let claims = Claims::new(&t, &TableSql::new(&t, &shape), 0);
        let indexed = plan(&mut conn, &t, &claims.claim).await;
        assert!(
            indexed.contains(&format!("Index Scan using {table}_xid on {table} o"))
                && indexed.contains("Index Cond: ((ROW(txid, id) > ROW(")
                && !indexed.contains("Seq Scan"),
            "lanes = {lanes}: one range of the index:\n{indexed}"
        );
        // Rows from before the column: the claim over both kinds reads the whole table,
        // which is why it goes once none of them is left after the position.
        let legacy = claims.legacy.expect("the column can hold NULL");
        let both = plan(&mut conn, &t, &legacy.claim).await;
        assert!(
            both.contains(&format!("Seq Scan on {table} o")),
            "lanes = {lanes}:\n{both}"
        );
        let probe = sqlx::query(&legacy.probe)
            .bind(1_i64)
            .bind(&t.table)
            .bind(t.lanes as i32)
            .bind(0_i32);
        assert!(
            probe.fetch_optional(&mut conn).await.unwrap().is_some(),
            "lanes = {lanes}: NULL rows lie after no position yet"
        );
    }
    // Without the column every claim reads the whole table.
    let t = cursor_table(&table, 1, None);
    let shape = introspect(&mut conn, &t).await.unwrap();
    let claims = Claims::new(&t, &TableSql::new(&t, &shape), 0);
    assert!(claims.legacy.is_none());
    let whole = plan(&mut conn, &t, &claims.claim).await;
    assert!(whole.contains(&format!("Seq Scan on {table} o")), "{whole}");
    conn.execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();
}
