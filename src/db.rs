//! Database connections and the embedded migrations, for each supported backend:
//! PostgreSQL, MySQL/MariaDB and SQLite, chosen by the scheme of `database.url`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use crate::config::Backend;
use crate::config::DatabaseConfig;

/// A pool and the options for dedicated connections, of one backend.
#[derive(Debug, Clone)]
pub enum Database {
    /// PostgreSQL.
    Postgres {
        /// For dedicated connections (lanes, coordinator, LISTEN).
        opts: PgConnectOptions,
        /// The shared pool.
        pool: PgPool,
        /// What a replication session (`capture = "wal"`) connects to.
        replication: Arc<ReplicationTarget>,
    },
    /// MySQL or MariaDB.
    MySql {
        /// For dedicated connections (lanes, coordinator).
        opts: MySqlConnectOptions,
        /// The shared pool.
        pool: MySqlPool,
    },
    /// SQLite.
    Sqlite {
        /// For dedicated connections (the lane).
        opts: SqliteConnectOptions,
        /// The shared pool.
        pool: SqlitePool,
    },
}

/// Why `database.url` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No URL (validation requires one whenever a database is needed).
    #[error("database.url: missing")]
    Missing,
    /// The scheme names no supported backend.
    #[error("database.url: must start with postgres://, postgresql://, mysql://, mariadb:// or sqlite://")]
    Scheme,
    /// The backend's driver cannot use the URL.
    #[error("database.url: not a usable {} URL", .backend.name())]
    Url {
        /// The backend the scheme names.
        backend: Backend,
        /// What the driver found.
        #[source]
        source: sqlx::Error,
    },
}

/// What a replication session connects with: the pool's connection options, so that it
/// reaches the same server as the same role (the replication protocol has a client of its
/// own, beside sqlx's pool).
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicationTarget {
    /// Host name or address, or a Unix socket directory (starting with `/`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password (empty: none); never shown.
    pub password: String,
    /// Database.
    pub database: String,
    /// Whether and how TLS is used.
    pub tls: ReplicationTls,
    /// `sslrootcert` of the URL, else `PGSSLROOTCERT`.
    pub sslrootcert: Option<String>,
    /// The session's `application_name`.
    pub application_name: String,
}

/// TLS of a replication session, from the connection's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationTls {
    /// `disable`, `allow`: plain (as sqlx connects for `allow`).
    Off,
    /// `prefer` (the default): TLS when the server offers it.
    Prefer,
    /// `require`: TLS, the certificate not checked.
    Require,
    /// `verify-ca`: TLS, the certificate checked against `sslrootcert`.
    VerifyCa,
    /// `verify-full`: as `verify-ca`, and the host name too.
    VerifyFull,
}

impl std::fmt::Debug for ReplicationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ReplicationTarget {
    /// The target of `opts`, which sqlx parsed from `url` with libpq's environment
    /// (`PGHOST`, `PGUSER`, `PGSSLMODE`, ...) for what the URL leaves out. The password is
    /// the URL's, else `PGPASSWORD`; `~/.pgpass` is not read for this session.
    pub fn new(opts: &PgConnectOptions, url: &str) -> Self {
        let parsed = url::Url::parse(url).ok();
        let query = |key: &str| {
            parsed.as_ref().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.into_owned())
            })
        };
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let password = parsed
            .as_ref()
            .and_then(|u| u.password())
            .map(|p| {
                url::form_urlencoded::parse(format!("x={p}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            })
            .or_else(|| query("password"))
            .or_else(|| env("PGPASSWORD"))
            .unwrap_or_default();
        let user = opts.get_username().to_owned();
        ReplicationTarget {
            host: match opts.get_socket() {
                Some(dir) => dir.display().to_string(),
                None => opts.get_host().to_owned(),
            },
            port: opts.get_port(),
            database: opts.get_database().unwrap_or(&user).to_owned(),
            user,
            password,
            tls: match opts.get_ssl_mode() {
                PgSslMode::Disable | PgSslMode::Allow => ReplicationTls::Off,
                PgSslMode::Prefer => ReplicationTls::Prefer,
                PgSslMode::Require => ReplicationTls::Require,
                PgSslMode::VerifyCa => ReplicationTls::VerifyCa,
                PgSslMode::VerifyFull => ReplicationTls::VerifyFull,
            },
            sslrootcert: query("sslrootcert").or_else(|| env("PGSSLROOTCERT")),
            application_name: opts.get_application_name().unwrap_or("outboxd").to_owned(),
        }
    }
}

/// How long SQLite waits for another writer's lock before failing a statement.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Database {
    /// Options and a lazy pool from `database.url` (validated to be present); a database
    /// that is down at start-up delays work instead of failing the process.
    pub fn open(db: &DatabaseConfig) -> Result<Database, OpenError> {
        let url = db.url.as_deref().ok_or(OpenError::Missing)?;
        let unusable = |backend| move |source| OpenError::Url { backend, source };
        let slow = (tracing::log::LevelFilter::Warn, Duration::from_secs(5));
        match Backend::of_url(url) {
            Some(Backend::Postgres) => {
                let opts: PgConnectOptions = url.parse().map_err(unusable(Backend::Postgres))?;
                // Name the sessions in pg_stat_activity unless the URL already does.
                let opts = if url.contains("application_name=") {
                    opts
                } else {
                    opts.application_name("outboxd")
                };
                let opts = opts.log_slow_statements(slow.0, slow.1);
                let pool = PgPoolOptions::new()
                    .max_connections(db.max_connections)
                    .acquire_timeout(db.connect_timeout)
                    .connect_lazy_with(opts.clone());
                let replication = Arc::new(ReplicationTarget::new(&opts, url));
                Ok(Database::Postgres {
                    opts,
                    pool,
                    replication,
                })
            }
            Some(Backend::MySql) => {
                let url = url.replacen("mariadb:", "mysql:", 1);
                let opts: MySqlConnectOptions = url.parse().map_err(unusable(Backend::MySql))?;
                let opts = opts.log_slow_statements(slow.0, slow.1);
                let pool = MySqlPoolOptions::new()
                    .max_connections(db.max_connections)
                    .acquire_timeout(db.connect_timeout)
                    .connect_lazy_with(opts.clone());
                Ok(Database::MySql { opts, pool })
            }
            Some(Backend::Sqlite) => {
                let opts: SqliteConnectOptions = url.parse().map_err(unusable(Backend::Sqlite))?;
                // WAL lets the application read and write while the relay reads; the busy
                // timeout makes writers queue for the one write lock instead of failing.
                let opts = opts
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .log_slow_statements(slow.0, slow.1);
                let pool = SqlitePoolOptions::new()
                    .max_connections(db.max_connections)
                    .acquire_timeout(db.connect_timeout)
                    .connect_lazy_with(opts.clone());
                Ok(Database::Sqlite { opts, pool })
            }
            None => Err(OpenError::Scheme),
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Database::Postgres { .. } => Backend::Postgres,
            Database::MySql { .. } => Backend::MySql,
            Database::Sqlite { .. } => Backend::Sqlite,
        }
    }

    /// Applies every pending migration of the backend (safe to run concurrently on
    /// PostgreSQL and MySQL, where sqlx takes a lock; SQLite serialises writers).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let migrator = migrator(self.backend());
        match self {
            Database::Postgres { pool, .. } => migrator.run(pool).await,
            Database::MySql { pool, .. } => migrator.run(pool).await,
            Database::Sqlite { pool, .. } => migrator.run(pool).await,
        }
    }

    /// The embedded migrations not yet applied, as `(version, description)`.
    pub async fn pending_migrations(&self) -> Result<Vec<(i64, String)>, sqlx::Error> {
        const APPLIED: &str = "SELECT version FROM _sqlx_migrations WHERE success";
        let applied: Vec<i64> = match self {
            Database::Postgres { pool, .. } => {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                        .fetch_one(pool)
                        .await?;
                match exists {
                    true => sqlx::query_scalar(APPLIED).fetch_all(pool).await?,
                    false => Vec::new(),
                }
            }
            Database::MySql { pool, .. } => {
                let exists: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = '_sqlx_migrations'",
                )
                .fetch_one(pool)
                .await?;
                match exists {
                    0 => Vec::new(),
                    _ => sqlx::query_scalar(APPLIED).fetch_all(pool).await?,
                }
            }
            Database::Sqlite { pool, .. } => {
                let exists: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
                )
                .fetch_one(pool)
                .await?;
                match exists {
                    0 => Vec::new(),
                    _ => sqlx::query_scalar(APPLIED).fetch_all(pool).await?,
                }
            }
        };
        Ok(migrator(self.backend())
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| (m.version, m.description.to_string()))
            .collect())
    }

    /// Runs `SELECT 1` on the pool (readiness).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        const PROBE: &str = "SELECT 1";
        match self {
            Database::Postgres { pool, .. } => sqlx::query(PROBE).execute(pool).await.map(drop),
            Database::MySql { pool, .. } => sqlx::query(PROBE).execute(pool).await.map(drop),
            Database::Sqlite { pool, .. } => sqlx::query(PROBE).execute(pool).await.map(drop),
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            Database::Postgres { pool, .. } => pool.close().await,
            Database::MySql { pool, .. } => pool.close().await,
            Database::Sqlite { pool, .. } => pool.close().await,
        }
    }
}

/// The migrations of `backend`, embedded in the binary. Migrations applied by a newer
/// outboxd are tolerated, so rolling back the binary keeps working.
pub fn migrator(backend: Backend) -> Migrator {
    let mut migrator = match backend {
        Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        Backend::MySql => sqlx::migrate!("./migrations/mysql"),
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
    };
    migrator.set_ignore_missing(true);
    migrator
}

#[cfg(test)]
mod tests {
    use super::{PgConnectOptions, ReplicationTarget, ReplicationTls};

    fn target(url: &str) -> ReplicationTarget {
        let opts: PgConnectOptions = url.parse().unwrap();
        ReplicationTarget::new(&opts, url)
    }

    #[test]
    fn a_replication_session_connects_as_the_pool_does_and_never_shows_the_password() {
        let t = target(
            "postgres://relay:p%40ss@db.example:6432/app?sslmode=verify-full&application_name=a",
        );
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_str(),
                t.password.as_str()
            ),
            ("db.example", 6432, "relay", "p@ss")
        );
        assert_eq!(
            (t.database.as_str(), t.tls),
            ("app", ReplicationTls::VerifyFull)
        );
        assert_eq!(t.application_name, "a");
        assert!(!format!("{t:?}").contains("p@ss"));

        let d = target("postgresql://me@localhost/events?host=/run/postgresql&sslmode=allow");
        assert_eq!(
            (d.host.as_str(), d.user.as_str(), d.database.as_str()),
            ("/run/postgresql", "me", "events")
        );
        assert_eq!(d.tls, ReplicationTls::Off);
    }
}
