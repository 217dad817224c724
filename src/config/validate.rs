//! Checks everything that can be checked without connecting: required keys, ranges,
//! identifiers, topic templates, fixed Kafka properties. Records one [`Problem`] per
//! problem, with the key it is about.
//!
//! [`Problem`]: super::Problem

use std::collections::HashSet;

use super::rules::{is_identifier, positive, Problems};
use super::{Backend, Capture, Config, OnPublished, TableConfig};
use crate::reserved_headers::is_reserved;
use crate::topic::{check_topic, TopicTemplate};

/// Adds every problem of `config` to `p`; none when it is usable.
pub fn validate(config: &Config, p: &mut Problems) {
    positive(p, "shutdown_timeout", config.shutdown_timeout);
    positive(
        p,
        "database.connect_timeout",
        config.database.connect_timeout,
    );
    if config.database.max_connections == 0 {
        p.add("database.max_connections", "must be at least 1");
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        p.add(
            "log.level",
            format!("`{}` is not a valid filter: {e}", config.log.level),
        );
    }
    validate_kafka(config, p);

    let tables = &config.relay.tables;
    if tables.is_empty() && config.consumer.is_none() {
        p.add(
            "relay.tables",
            "nothing to run; configure at least one [[relay.tables]] or a [consumer]",
        );
    }
    if config.needs_database() {
        match config.database.url.as_deref() {
            None => p.add("database.url", "missing; relay tables and sql handlers need a database (set url, url_file or OUTBOXD_DATABASE__URL)"),
            Some(url) => match Backend::of_url(url) {
                None => p.add("database.url", "must start with postgres://, postgresql://, mysql://, mariadb:// or sqlite://"),
                Some(backend) => {
                    for (i, table) in config.relay.tables.iter().enumerate() {
                        backend_limits(backend, table, &format!("relay.tables[{i}]"), p);
                    }
                }
            },
        }
    }
    super::validate_consumer::validate(config, p);
    let mut seen = HashSet::new();
    let mut slots = HashSet::new();
    for (i, table) in tables.iter().enumerate() {
        let at = format!("relay.tables[{i}]");
        if !seen.insert(table.table.as_str()) {
            p.add(
                format!("{at}.table"),
                format!("`{}` is configured twice", table.table),
            );
        }
        // Two readers of one slot would confirm each other's rows.
        if table.capture == Capture::Wal && !slots.insert(table.wal_slot()) {
            p.add(
                format!("{at}.wal.slot"),
                format!(
                    "`{}` is the slot of another table too; give each table a slot of its own",
                    table.wal_slot()
                ),
            );
        }
        validate_table(table, &at, p);
    }
}

fn validate_kafka(config: &Config, p: &mut Problems) {
    match config.kafka.brokers.as_deref().map(str::trim) {
        None | Some("") => p.add(
            "kafka.brokers",
            "missing; set \"host:9092,...\" or \"embedded\"",
        ),
        Some(_) => {}
    }
    let k = &config.kafka;
    let tables = [
        ("options", &k.options),
        ("producer_options", &k.producer_options),
        ("consumer_options", &k.consumer_options),
    ];
    for (table, key, value) in tables
        .iter()
        .flat_map(|(table, options)| options.iter().map(move |(k, v)| (table, k, v)))
    {
        let value = value.to_string();
        let bad = match key.as_str() {
            "enable.idempotence" => value != "true",
            "acks" | "request.required.acks" => value != "all" && value != "-1",
            "bootstrap.servers" | "metadata.broker.list" => true,
            _ => false,
        };
        if bad {
            p.add(format!("kafka.{table}.\"{key}\""), "outboxd fixes this property (enable.idempotence=true, acks=all, bootstrap.servers from kafka.brokers); remove it");
        }
    }
}

/// `allowed_topics`: well-formed globs, present whenever a row's own data starts its topic,
/// and covering a fixed topic.
fn validate_allowed_topics(t: &TableConfig, at: &str, p: &mut Problems) {
    for (i, glob) in t.allowed_topics.iter().enumerate() {
        let ok = !glob.is_empty()
            && glob
                .chars()
                .all(|c| c == '*' || c == '?' || c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            p.add(
                format!("{at}.allowed_topics[{i}]"),
                format!("`{glob}` is not a topic glob (letters, digits, '.', '_', '-', '*', '?')"),
            );
        }
    }
    let parsed = t
        .topic
        .as_deref()
        .and_then(|template| TopicTemplate::parse(template, &t.mapped_columns()).ok());
    let rows_choose = match &parsed {
        None => t.topic_column.is_some(),
        Some(template) => {
            template.columns().next().is_some() && template.literal_prefix().is_none()
        }
    };
    if rows_choose && t.allowed_topics.is_empty() {
        p.add(format!("{at}.allowed_topics"), "required when a row's data starts its topic (topic_column, or a template that starts with a column): list the topics or globs rows may publish to, e.g. [\"orders.*\"]");
    }
    if let (Some(template), Some(fixed)) = (&parsed, &t.topic) {
        let allowed = &t.allowed_topics;
        if template.columns().next().is_none()
            && !allowed.is_empty()
            && !allowed.iter().any(|g| crate::glob::glob_match(g, fixed))
        {
            p.add(
                format!("{at}.allowed_topics"),
                format!("does not allow the table's own topic `{fixed}`"),
            );
        }
    }
}

fn validate_table(t: &TableConfig, at: &str, p: &mut Problems) {
    if t.table.is_empty() {
        p.add(format!("{at}.table"), "missing");
    } else if !t.table.split('.').all(is_identifier) || t.table.split('.').count() > 2 {
        p.add(
            format!("{at}.table"),
            format!(
                "`{}` is not a table name (letters, digits, _ and $, optionally schema.table)",
                t.table
            ),
        );
    }
    let optional = [
        ("event_id_column", &t.event_id_column),
        ("headers_column", &t.headers_column),
        ("event_type_column", &t.event_type_column),
        ("aggregate_type_column", &t.aggregate_type_column),
        ("created_at_column", &t.created_at_column),
        ("order_column", &t.order_column),
        ("topic_column", &t.topic_column),
        ("xid_column", &t.xid_column),
    ];
    let named = [
        ("key_column", &t.key_column),
        ("id_column", &t.id_column),
        ("payload_column", &t.payload_column),
        ("published_column", &t.published_column),
    ]
    .into_iter()
    .chain(
        optional
            .into_iter()
            .filter_map(|(n, c)| Some((n, c.as_ref()?))),
    )
    .map(|(n, c)| (n.to_owned(), c))
    .chain(
        t.header_columns
            .iter()
            .map(|(header, c)| (format!("header_columns.{header}"), c)),
    );
    for (name, column) in named {
        if !is_identifier(column) {
            p.add(
                format!("{at}.{name}"),
                format!("`{column}` is not a column name (letters, digits, _ and $)"),
            );
        }
    }
    validate_header_names(t, at, p);
    match (&t.topic, &t.topic_column) {
        (Some(_), Some(_)) => p.add(
            format!("{at}.topic"),
            "set together with topic_column; keep one",
        ),
        (None, None) => p.add(
            format!("{at}.topic"),
            "missing; set topic (a template) or topic_column",
        ),
        (Some(template), None) => match TopicTemplate::parse(template, &t.mapped_columns()) {
            Err(e) => p.add(format!("{at}.topic"), e.to_string()),
            // Without columns it is the topic of every row: check it here, not per row.
            Ok(parsed) if parsed.columns().next().is_none() => {
                if let Err(e) = check_topic(template) {
                    p.add(format!("{at}.topic"), e.to_string());
                }
            }
            Ok(_) => {}
        },
        (None, Some(_)) => {}
    }
    validate_allowed_topics(t, at, p);
    if t.batch_size == 0 {
        p.add(format!("{at}.batch_size"), "must be at least 1");
    }
    if t.lanes == 0 {
        p.add(format!("{at}.lanes"), "must be at least 1");
    }
    if t.max_attempts == 0 {
        p.add(format!("{at}.max_attempts"), "must be at least 1");
    }
    positive(p, &format!("{at}.poll_interval"), t.poll_interval);
    positive(p, &format!("{at}.rebalance_interval"), t.rebalance_interval);
    positive(
        p,
        &format!("{at}.maintenance_interval"),
        t.maintenance_interval,
    );
    if t.on_published == OnPublished::Mark {
        positive(p, &format!("{at}.retention"), t.retention);
    }
    if t.xid_column.is_some() && t.on_published != OnPublished::Cursor {
        p.add(
            format!("{at}.xid_column"),
            "orders the claims of cursor mode only; set on_published = \"cursor\" or remove it",
        );
    }

    if t.capture == Capture::Wal {
        validate_wal(t, at, p);
    }

    if let Some(channel) = t.notify_channel.as_deref().filter(|c| !is_identifier(c)) {
        p.add(
            format!("{at}.notify_channel"),
            format!("`{channel}` is not a channel name (letters, digits, _ and $)"),
        );
    }
}

/// `capture = "wal"`: one reader per slot, rows never changed, names PostgreSQL takes.
fn validate_wal(t: &TableConfig, at: &str, p: &mut Problems) {
    if t.lanes != 1 {
        p.add(
            format!("{at}.lanes"),
            format!("{} with capture = \"wal\": a replication slot has one reader, in commit order; set lanes = 1 (other replicas stand by and take over)", t.lanes),
        );
    }
    if t.on_published == OnPublished::Mark {
        p.add(
            format!("{at}.on_published"),
            "\"mark\" with capture = \"wal\", which never changes a row; remove it",
        );
    }
    if t.xid_column.is_some() {
        p.add(
            format!("{at}.xid_column"),
            "orders polling claims; capture = \"wal\" reads in commit order without it, remove it",
        );
    }
    let names = [
        ("wal.slot", t.wal.slot.as_deref()),
        ("wal.publication", t.wal.publication.as_deref()),
    ];
    for (key, name) in names {
        let Some(name) = name else { continue };
        let fits = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !fits {
            p.add(
                format!("{at}.{key}"),
                format!("`{name}` is not a slot or publication name (1 to 63 of a-z, 0-9 and _)"),
            );
        }
    }
    if !t.wal.inserts && t.wal.message_prefix.is_none() {
        p.add(
            format!("{at}.wal.inserts"),
            "false leaves nothing to relay; set wal.message_prefix for a table-less outbox, or remove it",
        );
    }
    if t.wal.message_prefix.as_deref() == Some("") {
        p.add(
            format!("{at}.wal.message_prefix"),
            "is empty; name the prefix the application writes, or remove it",
        );
    }
    positive(
        p,
        &format!("{at}.wal.status_interval"),
        t.wal.status_interval,
    );
}

/// The headers outboxd adds and `header_columns`: named, each name once, none of the
/// names only outboxd's dead-letter tools write.
fn validate_header_names(t: &TableConfig, at: &str, p: &mut Problems) {
    let names = &t.header_names;
    let fixed = [
        ("header_names.event_id", &names.event_id),
        ("header_names.event_type", &names.event_type),
        ("header_names.aggregate_type", &names.aggregate_type),
    ];
    let all = fixed
        .iter()
        .map(|(key, name)| ((*key).to_owned(), name.as_str()))
        .chain(
            t.header_columns
                .keys()
                .map(|name| (format!("header_columns.{name}"), name.as_str())),
        );
    let mut seen: Vec<(String, &str)> = Vec::new();
    for (key, name) in all {
        // Empty turns the event and aggregate type headers off (the columns may still
        // name the topic); the event id is always sent.
        let may_be_off = key == "header_names.event_type" || key == "header_names.aggregate_type";
        if name.is_empty() && may_be_off {
            continue;
        }
        if name.is_empty() {
            p.add(format!("{at}.{key}"), "is empty; a header needs a name");
        } else if is_reserved(name) {
            p.add(
                format!("{at}.{key}"),
                format!("`{name}` is a header only outboxd's dead-letter tools write; choose another name"),
            );
        } else if let Some((other, _)) = seen.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)) {
            p.add(
                format!("{at}.{key}"),
                format!("`{name}` is also the name of {at}.{other}; each header needs a name of its own"),
            );
        }
        seen.push((key, name));
    }
}

/// What a backend cannot do: several lanes on SQLite (one writer), a LISTEN channel
/// anywhere but PostgreSQL, cursor mode on MySQL, a transaction-id column anywhere but
/// PostgreSQL.
fn backend_limits(backend: Backend, t: &TableConfig, at: &str, p: &mut Problems) {
    if backend == Backend::MySql && t.on_published == OnPublished::Cursor {
        p.add(
            format!("{at}.on_published"),
            "\"cursor\" is not available on MySQL/MariaDB: InnoDB hands out AUTO_INCREMENT values to concurrent transactions that commit in another order, and MySQL shows no transaction horizon to wait for, so a position could pass over a row committed late; use \"mark\" or \"delete\"",
        );
    }
    if t.capture == Capture::Wal && backend != Backend::Postgres {
        p.add(
            format!("{at}.capture"),
            format!(
                "\"wal\" needs PostgreSQL (logical replication); {} tables are polled, remove it",
                backend.name()
            ),
        );
    }
    if t.xid_column.is_some() && backend != Backend::Postgres {
        p.add(
            format!("{at}.xid_column"),
            format!(
                "needs PostgreSQL (transaction ids in an xid8 column); {} has none, remove it",
                backend.name()
            ),
        );
    }
    if backend == Backend::Sqlite && t.lanes > 1 {
        p.add(
            format!("{at}.lanes"),
            format!(
                "{} with SQLite, which has one writer; set lanes = 1",
                t.lanes
            ),
        );
    }
    let default_channel = TableConfig::default().notify_channel;
    if let Some(channel) = t.notify_channel.as_deref() {
        if backend != Backend::Postgres && default_channel.as_deref() != Some(channel) {
            p.add(format!("{at}.notify_channel"), format!("`{channel}` needs PostgreSQL (LISTEN/NOTIFY); {} tables are polled every poll_interval, remove it", backend.name()));
        }
    }
}
