//! Subcommands and their exit codes: 0 success, 78 (EX_CONFIG) for any configuration
//! error, 1 for every other failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, LogConfig, LogFormat};
use crate::metrics::Metrics;
use crate::{db, kafka, shutdown, RunError};

/// Where `--config` points when not given.
pub const DEFAULT_CONFIG: &str = "/etc/outboxd/outboxd.toml";

/// sysexits.h EX_CONFIG: the configuration is unusable; restarting will not help.
pub const EX_CONFIG: u8 = 78;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Transactional outbox relay for Kafka"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (until SIGTERM/SIGINT, then drain).
    Run,
    /// Validate the configuration without connecting, then print it with secrets redacted.
    CheckConfig,
    /// Apply the embedded database migrations and exit.
    Migrate,
}

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Unusable configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(String),
    /// The process could not set itself up (runtime, signal handlers).
    #[error("startup: {0}")]
    Startup(#[from] std::io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Run(RunError::Config(_)) => EX_CONFIG,
            _ => 1,
        }
    }
}

/// Runs the chosen subcommand to completion.
pub fn execute(cli: Cli) -> Result<(), CliError> {
    let config = config::load(&cli.config)?;
    check_kafka_options(&config, &cli.config)?;
    match cli.command {
        Command::CheckConfig => {
            let text = toml::to_string_pretty(&config.redacted())
                .map_err(|e| CliError::Startup(std::io::Error::other(e)))?;
            println!("# {}: valid\n{text}", cli.config.display());
            Ok(())
        }
        Command::Migrate => {
            init_logging(&config.log);
            runtime()?.block_on(async {
                let opts = db::connect_options(&config.database)
                    .map_err(|e| CliError::Run(RunError::Config(e)))?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(config.database.connect_timeout)
                    .connect_with(opts)
                    .await
                    .map_err(|e| CliError::Migrate(e.to_string()))?;
                db::migrate(&pool)
                    .await
                    .map_err(|e| CliError::Migrate(e.to_string()))?;
                tracing::info!("migrations applied");
                Ok(())
            })
        }
        Command::Run => {
            init_logging(&config.log);
            runtime()?.block_on(async {
                let shutdown = shutdown::install()?;
                crate::run(config, Arc::new(Metrics::new()), shutdown).await?;
                Ok(())
            })
        }
    }
}

/// librdkafka knows its properties: ask it, without creating a client.
fn check_kafka_options(config: &Config, file: &std::path::Path) -> Result<(), ConfigError> {
    let cfg = kafka::producer_config(&config.kafka, "127.0.0.1:9092");
    match cfg.create_native_config() {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError::Invalid {
            file: file.to_owned(),
            problems: vec![format!("kafka.options: librdkafka rejected them: {e}")],
        }),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outboxd")
        .build()
}

/// Logs to stderr as configured (validation already checked the filter). PostgreSQL's
/// NOTICE messages (relayed by sqlx at info) are quieted unless the filter names sqlx.
pub fn init_logging(log: &LogConfig) {
    let level = if log.level.contains("sqlx") {
        log.level.clone()
    } else {
        format!("{},sqlx::postgres::notice=warn", log.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
