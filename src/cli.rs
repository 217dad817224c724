//! Subcommands and their exit codes, from the class of the error: 0 success, 78
//! (EX_CONFIG) for a configuration error, 64 (EX_USAGE) for an unusable argument, 69
//! (EX_UNAVAILABLE) when `check-config --connect` finds only services that do not
//! answer, 1 for every other failure.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError};
use crate::exit::ExitClass;
use crate::metrics::Metrics;
use crate::{db, kafka, shutdown, RunError};

/// Where `--config` points when not given.
pub const DEFAULT_CONFIG: &str = "/etc/outboxd/outboxd.toml";

/// sysexits.h EX_CONFIG: the configuration is unusable; restarting will not help.
pub const EX_CONFIG: u8 = 78;

/// sysexits.h EX_USAGE: a command-line argument is unusable.
pub const EX_USAGE: u8 = 64;

/// sysexits.h EX_UNAVAILABLE: a service does not answer; trying again later may succeed.
pub const EX_UNAVAILABLE: u8 = 69;

/// sysexits.h EX_SOFTWARE: a part of the daemon ended or panicked; restart the process.
pub const EX_SOFTWARE: u8 = 70;

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
    /// Validate the configuration, then print it with secrets redacted; with `--connect`,
    /// check it against the database and the brokers instead (changing nothing).
    CheckConfig {
        /// Connect: the database answers, every table and mapped column exists with a
        /// usable type, the database user has the privileges the relay needs, mark mode
        /// has an index for pending rows, the brokers answer and every topic the
        /// configuration names exists (or the brokers create topics). Exit 78 on any
        /// problem, 69 when the only problems are a database or brokers that do not
        /// answer (a restart may help).
        #[arg(long)]
        connect: bool,
    },
    /// Apply the embedded database migrations and exit.
    Migrate,
    /// Insert one event into an outbox table, as an application would (a smoke test of the
    /// whole pipeline).
    Emit(EmitArgs),
    /// Ask the local `/readyz`: exit 0 when ready, 1 otherwise (for container HEALTHCHECK).
    Healthcheck,
    /// Dead-letter tools.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Consumer group tools.
    Consumer {
        /// What to do.
        #[command(subcommand)]
        command: ConsumerCommand,
    },
    /// Relay tools.
    Relay {
        /// What to do.
        #[command(subcommand)]
        command: RelayCommand,
    },
    /// Show relay backlogs, dead rows and lane owners, and consumer offsets and lag.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `outboxd relay ...`
#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// Drop the replication slot of a `capture = "wal"` table, so that it no longer keeps
    /// PostgreSQL from recycling WAL (when retiring outboxd or the table). Refused while a
    /// session reads the slot: stop every outboxd relaying the table first. The next start
    /// creates the slot again (with the initial snapshot the table asks for).
    DropSlot {
        /// The `[[relay.tables]]` table whose slot to drop.
        #[arg(long)]
        table: String,
        /// Drop the table's publication too.
        #[arg(long)]
        publication: bool,
    },
}

/// `outboxd consumer ...`
#[derive(Debug, Subcommand)]
pub enum ConsumerCommand {
    /// Move the group's committed offsets to the start or end of its topics, or to a
    /// time, to rebuild a read model from its topics; refused while the group has other
    /// members (stop its consumers first).
    Reset(crate::reset::ResetArgs),
}

/// `outboxd dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Re-publish dead letters to their original topic (or another), without the
    /// dead-letter headers and with a replay counter.
    Replay(ReplayArgs),
}

/// `outboxd dlq replay`
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The dead-letter topic to read.
    #[arg(long)]
    pub topic: String,
    /// `ORIGINAL` (each message's original topic, from its headers) or a topic name.
    #[arg(long, default_value = "ORIGINAL")]
    pub to: String,
    /// Only dead letters written at or after this time (RFC 3339, or a duration ago: `2h`).
    #[arg(long, value_parser = crate::dlq::parse_time)]
    pub since: Option<std::time::SystemTime>,
    /// Only dead letters written before this time.
    #[arg(long, value_parser = crate::dlq::parse_time)]
    pub until: Option<std::time::SystemTime>,
    /// Only messages with this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Replay at most this many messages.
    #[arg(long)]
    pub limit: Option<u64>,
    /// At most this many messages per second, e.g. `100/s`.
    #[arg(long, value_parser = crate::dlq::parse_rate)]
    pub rate: Option<f64>,
    /// Count and summarise by error class and event type; produce and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse messages already replayed this many times (loop guard).
    #[arg(long, default_value_t = 3)]
    pub max_replays: u32,
    /// Consumer group recording how far replay got (filtered messages are passed too:
    /// use a group of its own for a filtered pass).
    #[arg(long, default_value = "outboxd-dlq-replay")]
    pub group: String,
}

/// `outboxd emit`
#[derive(Debug, clap::Args)]
pub struct EmitArgs {
    /// The `[[relay.tables]]` table to insert into (default: the first one).
    #[arg(long)]
    pub table: Option<String>,
    /// Event type.
    #[arg(long = "type")]
    pub event_type: String,
    /// Key (aggregate id).
    #[arg(long)]
    pub key: String,
    /// Aggregate type.
    #[arg(long, default_value = "outboxd-emit")]
    pub aggregate_type: String,
    /// A header `name=value`; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// The payload, a JSON document.
    pub payload: String,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not name=value"))
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
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// `emit` could not insert the event.
    #[error("emit")]
    Emit(#[source] crate::relay::store::StoreError),
    /// `emit` was given something unusable.
    #[error("emit: {0}")]
    EmitInput(String),
    /// `dlq replay` failed.
    #[error("dlq replay")]
    Dlq(#[source] crate::dlq::ReplayError),
    /// A command was given something unusable.
    #[error("{0}")]
    Usage(String),
    /// `consumer reset` failed or was refused.
    #[error("consumer reset")]
    Reset(#[source] crate::reset::ResetError),
    /// `relay drop-slot` failed or was refused.
    #[error("relay drop-slot")]
    DropSlot(#[source] crate::relay::wal::WalError),
    /// `status` could not read the database or Kafka.
    #[error("status")]
    Status(#[source] crate::status::StatusError),
    /// `healthcheck`: not ready.
    #[error("not ready: {0}")]
    NotReady(String),
    /// `check-config --connect` found problems (each is printed).
    #[error("check-config --connect: {problems} problem(s), listed above")]
    Preflight {
        /// How many.
        problems: usize,
        /// Whether each is a service that does not answer (nothing to fix in the
        /// configuration, as far as could be seen).
        unavailable: bool,
    },
    /// The process could not set itself up (runtime, signal handlers).
    #[error("startup: {0}")]
    Startup(#[from] std::io::Error),
}

impl CliError {
    /// What kind of failure it is.
    pub fn class(&self) -> ExitClass {
        match self {
            CliError::Config(_) => ExitClass::Config,
            CliError::Preflight { unavailable, .. } => match unavailable {
                true => ExitClass::Unavailable,
                false => ExitClass::Config,
            },
            CliError::Run(e) => e.class(),
            CliError::EmitInput(_) | CliError::Usage(_) => ExitClass::Usage,
            CliError::Migrate(_)
            | CliError::Emit(_)
            | CliError::Dlq(_)
            | CliError::Reset(_)
            | CliError::DropSlot(_)
            | CliError::Status(_)
            | CliError::NotReady(_)
            | CliError::Startup(_) => ExitClass::Failure,
        }
    }

    /// The process exit code for this error, from its class.
    pub fn exit_code(&self) -> u8 {
        match self.class() {
            ExitClass::Config => EX_CONFIG,
            ExitClass::Usage => EX_USAGE,
            ExitClass::Unavailable => EX_UNAVAILABLE,
            ExitClass::Software => EX_SOFTWARE,
            ExitClass::Failure => 1,
        }
    }
}

/// Runs the chosen subcommand to completion.
pub fn execute(cli: Cli) -> Result<(), CliError> {
    let config = config::load(&cli.config)?;
    crate::secrets::learn(&config);
    check_kafka_options(&config, &cli.config)?;
    match cli.command {
        Command::CheckConfig { connect: true } => runtime()?.block_on(async {
            let report = crate::preflight::check(&config).await;
            print!("{}", crate::secrets::scrub(&report.to_string()));
            match report.problems() {
                0 => Ok(()),
                problems => Err(CliError::Preflight {
                    problems,
                    unavailable: report.problems() == report.unanswered(),
                }),
            }
        }),
        Command::CheckConfig { connect: false } => {
            let text = toml::to_string_pretty(&config.redacted())
                .map_err(|e| CliError::Startup(std::io::Error::other(e)))?;
            println!("# {}: valid\n{text}", cli.config.display());
            Ok(())
        }
        Command::Migrate => {
            crate::logging::init(&config.log);
            runtime()?.block_on(async {
                let database = db::Database::open(&config.database).map_err(RunError::from)?;
                let migrated = database.migrate().await;
                database.close().await;
                migrated.map_err(CliError::Migrate)?;
                tracing::info!("migrations applied");
                Ok(())
            })
        }
        Command::Emit(args) => runtime()?.block_on(emit(&config, &args)),
        Command::Healthcheck => runtime()?.block_on(healthcheck(&config)),
        Command::Dlq {
            command: DlqCommand::Replay(args),
        } => {
            let brokers = kafka::Brokers::start(&config.kafka, &config.consumed_topics())
                .map_err(RunError::from)?;
            let replay = crate::dlq::Replay {
                topic: args.topic.clone(),
                to: (args.to != "ORIGINAL").then(|| args.to.clone()),
                since: args.since,
                until: args.until,
                key: args.key.clone(),
                limit: args.limit,
                rate: args.rate,
                dry_run: args.dry_run,
                max_replays: args.max_replays,
                group: args.group.clone(),
            };
            let report =
                crate::dlq::run(&config, &brokers.bootstrap, &replay).map_err(CliError::Dlq)?;
            print!("{}{report}", if args.dry_run { "dry run: " } else { "" });
            Ok(())
        }
        Command::Consumer {
            command: ConsumerCommand::Reset(args),
        } => {
            let reset = crate::reset::Reset::new(&config, args).map_err(CliError::Usage)?;
            let brokers = kafka::Brokers::start(&config.kafka, &config.consumed_topics())
                .map_err(RunError::from)?;
            let report = crate::reset::run(&config, &brokers.bootstrap, &reset, &runtime()?)
                .map_err(CliError::Reset)?;
            print!("{report}");
            Ok(())
        }
        Command::Relay {
            command: RelayCommand::DropSlot { table, publication },
        } => runtime()?.block_on(drop_slot(&config, &table, publication)),
        Command::Status { json } => runtime()?.block_on(async {
            let brokers = kafka::Brokers::start(&config.kafka, &config.consumed_topics())
                .map_err(RunError::from)?;
            let status = crate::status::gather(&config, &brokers.bootstrap)
                .await
                .map_err(CliError::Status)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serializes")
                );
            } else {
                print!("{status}");
            }
            Ok(())
        }),
        Command::Run => {
            let log_reload = crate::logging::init(&config.log);
            crate::logging::log_panics();
            runtime()?.block_on(async {
                let mut signals = shutdown::install()?;
                let running =
                    crate::start(config, Arc::new(Metrics::new()), signals.stop.clone()).await?;
                if let Some(log_reload) = log_reload {
                    running.reloader.set_log_reload(log_reload);
                }
                let reloader = running.reloader.clone();
                let path = cli.config.clone();
                tokio::spawn(async move {
                    while signals.reload.recv().await.is_some() {
                        reload(&reloader, &path);
                    }
                });
                running.wait().await?;
                Ok(())
            })
        }
    }
}

async fn emit(config: &Config, args: &EmitArgs) -> Result<(), CliError> {
    use crate::relay::store::NewEvent;
    let table = match &args.table {
        Some(name) => config.relay.tables.iter().find(|t| &t.table == name),
        None => config.relay.tables.first(),
    }
    .ok_or_else(|| {
        CliError::EmitInput(format!(
            "no [[relay.tables]] entry named `{}` in the configuration",
            args.table.as_deref().unwrap_or_default()
        ))
    })?;
    serde_json::from_str::<serde_json::Value>(&args.payload)
        .map_err(|e| CliError::EmitInput(format!("the payload is not JSON: {e}")))?;
    let headers = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let database = db::Database::open(&config.database).map_err(RunError::from)?;
    let event = NewEvent {
        key: &args.key,
        event_type: &args.event_type,
        aggregate_type: &args.aggregate_type,
        payload: &args.payload,
        headers: &headers,
    };
    let id = crate::relay::store::emit(&database, table, &event).await;
    database.close().await;
    let id = id.map_err(CliError::Emit)?;
    println!("inserted row {id} into {}", table.table);
    Ok(())
}

async fn drop_slot(config: &Config, table: &str, publication: bool) -> Result<(), CliError> {
    let t = config
        .relay
        .tables
        .iter()
        .find(|t| t.table == table)
        .ok_or_else(|| CliError::Usage(format!("no [[relay.tables]] entry named `{table}`")))?;
    if t.capture != config::Capture::Wal {
        return Err(CliError::Usage(format!(
            "relay.tables `{table}` is not relayed with capture = \"wal\": it has no slot"
        )));
    }
    let database = db::Database::open(&config.database).map_err(RunError::from)?;
    let db::Database::Postgres { pool, .. } = &database else {
        return Err(CliError::Usage("capture = \"wal\" needs PostgreSQL".into()));
    };
    let retired = crate::relay::wal::admin::retire(pool, t, publication).await;
    database.close().await;
    print!("{}", retired.map_err(CliError::DropSlot)?);
    Ok(())
}

async fn healthcheck(config: &Config) -> Result<(), CliError> {
    let mut addr = config.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/readyz");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| CliError::NotReady(e.to_string()))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| CliError::NotReady(format!("{url}: {e}")))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{}", body.trim());
        Ok(())
    } else {
        Err(CliError::NotReady(format!(
            "{url}: HTTP {status}: {}",
            body.trim()
        )))
    }
}

/// Reloads the file at `path` (SIGHUP); problems are logged, the daemon keeps running.
fn reload(reloader: &crate::reload::Reloader, path: &std::path::Path) {
    let new = match config::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; still running on the previous configuration");
            return;
        }
    };
    crate::secrets::learn(&new);
    match reloader.apply(&new) {
        Ok(r) => {
            if !r.needs_restart.is_empty() {
                tracing::warn!(keys = ?r.needs_restart, "reload: these changes need a restart; their old values stay in effect");
            }
            tracing::warn!(keys = ?r.applied, "configuration reloaded");
        }
        Err(e) => {
            let error = crate::error_text::describe(&e);
            tracing::error!(%error, "reload failed; still running on the previous configuration")
        }
    }
}

/// librdkafka knows its properties: ask it, without creating a client.
fn check_kafka_options(config: &Config, file: &std::path::Path) -> Result<(), ConfigError> {
    let producer = kafka::producer_config(&config.kafka, "127.0.0.1:9092");
    let mut consumer = rdkafka::ClientConfig::new();
    for (key, value) in config.kafka.consumer_properties() {
        consumer.set(key, value.to_string());
    }
    let checks = [
        ("kafka.options or kafka.producer_options", producer),
        ("kafka.options or kafka.consumer_options", consumer),
    ];
    for (keys, cfg) in checks {
        if let Err(e) = cfg.create_native_config() {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems: vec![config::Problem {
                    key: keys.to_owned(),
                    message: format!("librdkafka rejected them: {e}"),
                }],
            });
        }
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outboxd")
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::StartError;
    use crate::handlers::{HandlerError, SetupError};
    use rdkafka::error::KafkaError;

    #[test]
    fn the_exit_code_follows_the_class_of_the_error() {
        let config = CliError::Run(RunError::Database(crate::db::OpenError::Scheme));
        assert_eq!(config.exit_code(), EX_CONFIG);
        let handler = CliError::Run(RunError::Consumer(StartError::Handler(HandlerError {
            name: "h".into(),
            source: SetupError::NoDatabase,
        })));
        assert_eq!(handler.exit_code(), EX_CONFIG);
        let preflight = |unavailable| CliError::Preflight {
            problems: 2,
            unavailable,
        };
        assert_eq!(preflight(false).exit_code(), EX_CONFIG);
        assert_eq!(preflight(true).exit_code(), EX_UNAVAILABLE);
        // A client librdkafka could not set up, with properties it accepted when checked:
        // the environment, not the configuration; a restart may help.
        let client = CliError::Run(RunError::Consumer(StartError::Subscribe(
            KafkaError::Subscription("broker gone".into()),
        )));
        assert_eq!(client.exit_code(), 1);
        assert_eq!(
            CliError::EmitInput("no payload".into()).exit_code(),
            EX_USAGE
        );
        let drain = CliError::Run(RunError::DrainTimeout(std::time::Duration::from_secs(1)));
        assert_eq!(drain.exit_code(), 1);
    }
}
