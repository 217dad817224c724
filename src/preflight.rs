//! `outboxd check-config --connect`: the configuration against the database and the
//! brokers it names, changing nothing in either. Each finding names its place; any
//! problem fails the command, a warning does not.

use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{Capture, Config, HandlerConfig, OnPublished, TableConfig};
use crate::db::Database;
use crate::error_text::describe;
use crate::kafka::Brokers;
use crate::relay::store::{self, preflight::OwnTables};
use crate::relay::wal;

/// How long the brokers have to answer each request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// As it should be.
    Ok,
    /// Works, but worth changing.
    Warning,
    /// `outboxd run` would fail or lose its way here.
    Problem,
    /// A problem: the database or the brokers do not answer (a later try may succeed).
    Unanswered,
}

/// One finding: where, and what.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How much it matters.
    pub level: Level,
    /// What it is about: `database`, `relay table outbox`, `topic orders`, ...
    pub place: String,
    /// What was found.
    pub text: String,
}

/// Every finding of one preflight, in the order they were made.
#[derive(Debug, Default)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, level: Level, place: impl Into<String>, text: impl Into<String>) {
        self.findings.push(Finding {
            level,
            place: place.into(),
            text: text.into(),
        });
    }

    /// How many problems were found, unanswered services included.
    pub fn problems(&self) -> usize {
        let problem = |f: &&Finding| matches!(f.level, Level::Problem | Level::Unanswered);
        self.findings.iter().filter(problem).count()
    }

    /// How many of the problems are services that do not answer.
    pub fn unanswered(&self) -> usize {
        let unanswered = |f: &&Finding| f.level == Level::Unanswered;
        self.findings.iter().filter(unanswered).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            let level = match finding.level {
                Level::Ok => "ok",
                Level::Warning => "warning",
                Level::Problem | Level::Unanswered => "problem",
            };
            writeln!(f, "{level:<8} {}: {}", finding.place, finding.text)?;
        }
        Ok(())
    }
}

/// Checks `config` against its database (when it needs one) and its brokers.
pub async fn check(config: &Config) -> Report {
    let mut report = Report::default();
    if config.needs_database() {
        database(config, &mut report).await;
    }
    kafka(config, &mut report).await;
    report
}

async fn database(config: &Config, report: &mut Report) {
    let db = match Database::open(&config.database) {
        Ok(db) => db,
        Err(e) => return report.add(Level::Problem, "database", describe(&e)),
    };
    checked_database(config, &db, report).await;
    db.close().await;
}

async fn checked_database(config: &Config, db: &Database, report: &mut Report) {
    const PLACE: &str = "database";
    if let Err(e) = db.ping().await {
        let text = format!("does not answer: {}", describe(&e));
        return report.add(Level::Unanswered, PLACE, text);
    }
    report.add(Level::Ok, PLACE, format!("{} answers", db.backend().name()));
    let pending = db.pending_migrations().await;
    // The first migration creates the reference table, `outbox`.
    let reference_table_comes = config.database.migrate
        && matches!(&pending, Ok(pending) if pending.iter().any(|(_, d)| d == "outbox"));
    let own_tables_exist = match pending {
        Ok(pending) if pending.is_empty() => {
            report.add(Level::Ok, PLACE, "outboxd's migrations are applied");
            true
        }
        Ok(pending) => {
            let names: Vec<String> = pending.iter().map(|(v, d)| format!("{v} {d}")).collect();
            let names = names.join(", ");
            if config.database.migrate {
                let text = format!(
                    "migrations not applied yet: {names}; `outboxd run` applies them at start \
                     (the database user needs the privilege to create tables), or run `outboxd migrate` now"
                );
                report.add(Level::Warning, PLACE, text);
            } else {
                let text = format!(
                    "database.migrate is false and migrations are not applied: {names}; run `outboxd migrate`"
                );
                report.add(Level::Problem, PLACE, text);
            }
            // Their tables may be there (a partial history); probing them would name
            // missing tables as refused privileges.
            false
        }
        Err(e) => {
            let text = format!("cannot read the applied migrations: {}", describe(&e));
            report.add(Level::Problem, PLACE, text);
            false
        }
    };
    for t in &config.relay.tables {
        let place = format!("relay table {}", t.table);
        if t.capture == Capture::Wal {
            wal_table(db, t, &place, report).await;
            continue;
        }
        let checked = match store::open(db, t).await {
            Ok(store) => store.preflight().await,
            Err(e) => Err(e),
        };
        let check = match checked {
            Ok(check) => check,
            Err(store::StoreError::NoTable(_)) if reference_table_comes && t.table == "outbox" => {
                let text = "does not exist yet: the migrations `outboxd run` applies at start create it (the reference table)";
                report.add(Level::Warning, place, text);
                continue;
            }
            Err(e) => {
                report.add(Level::Problem, place, describe(&e));
                continue;
            }
        };
        for denied in &check.denied {
            let text = format!("may not run {}: {}", denied.need, denied.answer);
            report.add(Level::Problem, &place, text);
        }
        if let Some(index) = &check.missing_index {
            let text = format!(
                "no index serves the claim of pending rows, so each claim reads the whole table: {index}"
            );
            report.add(Level::Warning, &place, text);
        }
        if let Some(rows) = check.whole_table_claims {
            report.add(Level::Warning, &place, whole_table_claims(t, rows));
        }
        if check.denied.is_empty() {
            let mode = match t.on_published {
                OnPublished::Delete => "delete",
                OnPublished::Mark => "mark",
                OnPublished::Cursor => "cursor",
            };
            let text = format!("columns, types and the privileges of {mode} mode");
            report.add(Level::Ok, place, text);
        }
    }
    if own_tables_exist {
        own_tables(config, db, report).await;
    }
}

/// What WAL capture of `t` needs from the server, the table and its slot.
async fn wal_table(db: &Database, t: &TableConfig, place: &str, report: &mut Report) {
    let Database::Postgres { pool, .. } = db else {
        // Validation refuses WAL capture elsewhere.
        return;
    };
    let checked = match pool.acquire().await {
        Ok(mut conn) => wal::admin::preflight(&mut conn, t).await,
        Err(e) => Err(e.into()),
    };
    match checked {
        Ok(found) => {
            for text in found.problems {
                report.add(Level::Problem, place, text);
            }
            for text in found.warnings {
                report.add(Level::Warning, place, text);
            }
            if !found.fit.is_empty() {
                let text = format!("WAL capture: {}", found.fit.join(", "));
                report.add(Level::Ok, place, text);
            }
        }
        Err(e) => report.add(Level::Problem, place, describe(&e)),
    }
}

/// The warning for a cursor-mode table of about `rows` rows without a transaction-id
/// column, with the remedy spelled out for it.
fn whole_table_claims(t: &TableConfig, rows: i64) -> String {
    let name = t.table.rsplit('.').next().unwrap_or(&t.table);
    let quoted: Vec<String> = t.table.split('.').map(|p| format!("\"{p}\"")).collect();
    format!(
        "holds about {rows} rows, and every cursor-mode claim reads all of them (about 1 µs a row) \
         because relay.tables.xid_column is not set: add a transaction-id column \
         (`ALTER TABLE {table} ADD COLUMN txid xid8; CREATE INDEX CONCURRENTLY \"{name}_xid\" ON {table} (txid, {ord}); \
         ALTER TABLE {table} ALTER COLUMN txid SET DEFAULT pg_current_xact_id()`, the last with outboxd stopped) \
         and set xid_column = \"txid\"; rows written before it are still relayed \
         (docs/architecture.md, Cursor mode)",
        table = quoted.join("."),
        ord = format_args!("\"{}\"", t.order_column()),
    )
}

/// The privileges on outboxd's own tables.
async fn own_tables(config: &Config, db: &Database, report: &mut Report) {
    const PLACE: &str = "outboxd's tables";
    let own = OwnTables {
        relay: !config.relay.tables.is_empty(),
        cursors: config
            .relay
            .tables
            .iter()
            .any(|t| t.on_published == OnPublished::Cursor),
        slots: config
            .relay
            .tables
            .iter()
            .any(|t| t.capture == Capture::Wal),
        inbox: config
            .handlers
            .values()
            .any(|h| matches!(h, HandlerConfig::Sql(_))),
    };
    match store::preflight::own_tables(db, own).await {
        Ok(denied) if denied.is_empty() => report.add(Level::Ok, PLACE, "privileges"),
        Ok(denied) => {
            for d in denied {
                let text = format!("may not run {}: {}", d.need, d.answer);
                report.add(Level::Problem, PLACE, text);
            }
        }
        Err(e) => report.add(Level::Problem, PLACE, describe(&e)),
    }
}

/// The topics the configuration names outright, with what uses each: fixed relay topics,
/// consumer topics and their dead-letter topics, and `kafka` handler targets. Topics a
/// row or a message names are only known when it arrives.
fn fixed_topics(config: &Config) -> Vec<(String, String)> {
    let mut topics: Vec<(String, String)> = Vec::new();
    let mut add = |topic: &str, used_by: String| {
        if !topics.iter().any(|(t, _)| t == topic) {
            topics.push((topic.to_owned(), used_by));
        }
    };
    for t in &config.relay.tables {
        if let Some(topic) = t.topic.as_deref().filter(|topic| !topic.contains('{')) {
            add(topic, format!("relay table {}", t.table));
        }
    }
    if let Some(c) = &config.consumer {
        for topic in &c.topics {
            add(topic, "consumer.topics".into());
            let dead_letters = c.dead_letter_topic.replace("{topic}", topic);
            add(
                &dead_letters,
                format!("consumer.dead_letter_topic of {topic}"),
            );
        }
    }
    for (name, handler) in &config.handlers {
        if let HandlerConfig::Kafka(k) = handler {
            add(&k.topic, format!("handlers.{name}"));
        }
    }
    topics
}

async fn kafka(config: &Config, report: &mut Report) {
    const PLACE: &str = "kafka";
    let brokers = match Brokers::start(&config.kafka, &config.consumed_topics()) {
        Ok(brokers) => brokers,
        Err(e) => return report.add(Level::Problem, PLACE, describe(&e)),
    };
    if brokers.is_embedded() {
        let text = "the embedded broker (in process, not durable; it creates topics on first use)";
        return report.add(Level::Ok, PLACE, text);
    }
    let mut cfg = ClientConfig::new();
    for (key, value) in &config.kafka.options {
        cfg.set(key, value.to_string());
    }
    cfg.set("bootstrap.servers", &brokers.bootstrap);
    let listed = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || list_topics(&cfg)).await
    };
    let (existing, broker) = match listed {
        Ok(Ok(listed)) => listed,
        Ok(Err(e)) => {
            let text = format!(
                "the brokers ({}) do not answer within {} s: {e}",
                brokers.bootstrap,
                KAFKA_TIMEOUT.as_secs()
            );
            return report.add(Level::Unanswered, PLACE, text);
        }
        Err(e) => return report.add(Level::Problem, PLACE, e.to_string()),
    };
    report.add(
        Level::Ok,
        PLACE,
        format!("the brokers ({}) answer", brokers.bootstrap),
    );
    let missing: Vec<(String, String)> = fixed_topics(config)
        .into_iter()
        .filter(|(topic, used_by)| {
            let found = existing.contains(topic);
            if found {
                report.add(
                    Level::Ok,
                    format!("topic {topic}"),
                    format!("exists ({used_by})"),
                );
            }
            !found
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    let auto_create = match broker {
        Some(id) => auto_create(&cfg, id).await,
        None => Err("the brokers listed no broker".to_owned()),
    };
    for (topic, used_by) in missing {
        let place = format!("topic {topic}");
        match &auto_create {
            Ok(true) => report.add(
                Level::Warning,
                place,
                format!("does not exist yet ({used_by}); the brokers create it on first use, with their default partitions"),
            ),
            Ok(false) => report.add(
                Level::Problem,
                place,
                format!("does not exist ({used_by}) and the brokers do not create topics (auto.create.topics.enable = false)"),
            ),
            Err(why) => report.add(
                Level::Problem,
                place,
                format!("does not exist ({used_by}); whether the brokers create topics on first use is unknown ({why})"),
            ),
        }
    }
}

/// The topics of the cluster, and the id of one broker.
fn list_topics(
    cfg: &ClientConfig,
) -> Result<(Vec<String>, Option<i32>), rdkafka::error::KafkaError> {
    let client: BaseConsumer = cfg.create()?;
    let metadata = client.fetch_metadata(None, KAFKA_TIMEOUT)?;
    let topics = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_owned())
        .collect();
    Ok((topics, metadata.brokers().first().map(|b| b.id())))
}

/// The broker's `auto.create.topics.enable`.
async fn auto_create(cfg: &ClientConfig, broker: i32) -> Result<bool, String> {
    let admin: AdminClient<DefaultClientContext> = cfg.create().map_err(|e| e.to_string())?;
    let options = AdminOptions::new().request_timeout(Some(KAFKA_TIMEOUT));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Broker(broker)], &options)
        .await
        .map_err(|e| format!("describing broker {broker}'s configuration failed: {e}"))?;
    let resource = described
        .into_iter()
        .next()
        .ok_or("the broker described no configuration")?
        .map_err(|code| format!("describing broker {broker}'s configuration failed: {code}"))?;
    let value = resource
        .get("auto.create.topics.enable")
        .and_then(|e| e.value.as_deref())
        .ok_or("the broker did not report auto.create.topics.enable")?;
    Ok(value == "true")
}
