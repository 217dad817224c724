//! The three database backends as tests see them: a migrated database per backend (a fresh
//! SQLite file per test), a copy of the reference outbox table, and the few statements
//! tests need, written once per dialect. `on_backends!` turns one async test function of a
//! `Kind` into one test per backend.

use std::time::Duration;

use outboxd::config::Config;
use sqlx::mysql::MySqlPool;
use sqlx::sqlite::SqlitePool;
use sqlx::PgPool;

use crate::helpers::{database_url, eventually, unique};

/// A database backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    MySql,
    Sqlite,
}

impl Kind {
    /// From the test-name spelling used by `on_backends!`.
    pub fn named(name: &str) -> Kind {
        match name {
            "postgres" => Kind::Postgres,
            "mysql" => Kind::MySql,
            "sqlite" => Kind::Sqlite,
            other => panic!("unknown backend {other}"),
        }
    }
}

/// One test function per listed backend, in a module named after the function:
/// `on_backends!(delivery: postgres, mysql, sqlite);`
macro_rules! on_backends {
    ($name:ident: $($backend:ident),+) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    super::$name(crate::backends::Kind::named(stringify!($backend))).await
                }
            )+
        }
    };
}
pub(crate) use on_backends;

pub fn mysql_url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

enum Pool {
    Postgres(PgPool),
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

/// A migrated database of one backend.
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    pool: Pool,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        let (url, dir) = match kind {
            Kind::Postgres => (database_url(), None),
            Kind::MySql => (mysql_url(), None),
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/outbox.db?mode=rwc", dir.path().display());
                (url, Some(dir))
            }
        };
        let mut c = outboxd::config::DatabaseConfig {
            max_connections: 4,
            ..Default::default()
        };
        c.url = Some(url.clone());
        let database = outboxd::db::Database::open(&c).unwrap();
        database.migrate().await.expect("migrations apply");
        let pool = match database {
            outboxd::db::Database::Postgres { pool, .. } => Pool::Postgres(pool),
            outboxd::db::Database::MySql { pool, .. } => Pool::MySql(pool),
            outboxd::db::Database::Sqlite { pool, .. } => Pool::Sqlite(pool),
        };
        TestDb {
            kind,
            url,
            pool,
            _dir: dir,
        }
    }

    /// Runs statements (several allowed).
    pub async fn exec(&self, sql: &str) {
        let done = match &self.pool {
            Pool::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Pool::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Pool::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        };
        done.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of the first row, as i64.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let value = match &self.pool {
            Pool::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Pool::MySql(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Pool::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        };
        value.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Rows of two text columns.
    pub async fn pairs(&self, sql: &str) -> Vec<(String, String)> {
        let rows = match &self.pool {
            Pool::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await,
            Pool::MySql(p) => sqlx::query_as(sql).fetch_all(p).await,
            Pool::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await,
        };
        rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The dialect's spelling of something: `pick(postgres, mysql, sqlite)`.
    pub fn pick<T>(&self, postgres: T, mysql: T, sqlite: T) -> T {
        match self.kind {
            Kind::Postgres => postgres,
            Kind::MySql => mysql,
            Kind::Sqlite => sqlite,
        }
    }

    /// A copy of the reference outbox table (PostgreSQL: with the NOTIFY trigger on a
    /// channel named after the table).
    pub async fn outbox_table(&self, prefix: &str) -> String {
        let table = unique(prefix);
        match self.kind {
            Kind::Postgres => {
                self.exec(&format!(
                    "CREATE TABLE {table} (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
                     CREATE TRIGGER {table}_notify AFTER INSERT ON {table}
                         FOR EACH STATEMENT EXECUTE FUNCTION outboxd_notify('{table}');"
                ))
                .await
            }
            Kind::MySql => self.exec(&format!("CREATE TABLE {table} LIKE outbox")).await,
            Kind::Sqlite => {
                let Pool::Sqlite(p) = &self.pool else {
                    unreachable!()
                };
                let ddl: String =
                    sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'outbox'")
                        .fetch_one(p)
                        .await
                        .unwrap();
                let ddl = ddl.replacen("CREATE TABLE outbox", &format!("CREATE TABLE {table}"), 1);
                self.exec(&ddl).await
            }
        }
        table
    }

    /// Inserts rows `first..first+count` with keys `k{n % keys}` and payload `{"n": n}`
    /// in order of `n`; the event type is the table name, so the topic is `t.<table>`.
    pub async fn insert_rows(&self, table: &str, first: i64, count: i64, keys: i64) {
        let last = first + count - 1;
        match self.kind {
            Kind::Postgres => {
                self.exec(&format!(
                    "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'account', 'k' || (g % {keys}), '{table}', jsonb_build_object('n', g)
                     FROM generate_series({first}::int8, {last}::int8) AS g ORDER BY g"
                ))
                .await
            }
            Kind::MySql => {
                let mut n = first;
                while n <= last {
                    let end = (n + 999).min(last);
                    let values: Vec<String> = (n..=end)
                        .map(|g| format!("('account', 'k{}', '{table}', '{{\"n\": {g}}}')", g % keys))
                        .collect();
                    self.exec(&format!(
                        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload) VALUES {}",
                        values.join(", ")
                    ))
                    .await;
                    n = end + 1;
                }
            }
            Kind::Sqlite => {
                self.exec(&format!(
                    "WITH RECURSIVE g(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM g WHERE n < {last})
                     INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'account', 'k' || (n % {keys}), '{table}', json_object('n', n) FROM g"
                ))
                .await
            }
        }
    }

    pub async fn count_rows(&self, table: &str) -> i64 {
        self.scalar(&format!("SELECT count(*) FROM {table}")).await
    }

    /// Waits until `table` is empty.
    pub async fn drained(&self, table: &str, timeout: Duration) {
        eventually(&format!("{table} drained"), timeout, || async {
            self.count_rows(table).await == 0
        })
        .await;
    }

    /// `config(table, bootstrap)` pointed at this database; other backends than PostgreSQL
    /// poll.
    pub fn config(&self, table: &str, bootstrap: &str) -> Config {
        let mut c = crate::helpers::config(table, bootstrap);
        c.database.url = Some(self.url.clone());
        if self.kind != Kind::Postgres {
            c.relay.tables[0].notify_channel = None;
            c.relay.tables[0].poll_interval = Duration::from_millis(100);
        }
        c
    }
}
