//! Database connections and the embedded migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::DatabaseConfig;

/// The migrations in `migrations/postgres`, embedded in the binary. Migrations applied by
/// a newer outboxd are tolerated, so rolling back the binary keeps working.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator
}

/// Connection options from `database.url` (validated to be present).
pub fn connect_options(db: &DatabaseConfig) -> Result<PgConnectOptions, String> {
    let url = db.url.as_deref().ok_or("database.url: missing")?;
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e| format!("database.url: not a usable PostgreSQL URL: {e}"))?;
    // Name the sessions in pg_stat_activity unless the URL already does.
    let opts = if url.contains("application_name=") {
        opts
    } else {
        opts.application_name("outboxd")
    };
    Ok(opts.log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5)))
}

/// The shared pool; connects lazily so a database that is down at start-up delays work
/// instead of failing the process.
pub fn pool(db: &DatabaseConfig, opts: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(db.max_connections)
        .acquire_timeout(db.connect_timeout)
        .connect_lazy_with(opts.clone())
}

/// Applies every pending migration (safe to run concurrently: sqlx takes a lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(pool).await
}
