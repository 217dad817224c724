//! Configuration through the binary: check-config output and redaction, environment
//! overrides, secret files, bad files (exit 78 naming the key), the commented reference
//! file, and property tests of the loader.

use std::process::Command;

use crate::cli::{run_with, BIN, GOOD};

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let (code, out, err) = run_with(&["check-config"], GOOD, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("hunter2") && !out.contains("swordfish"),
        "{out}"
    );
    assert!(
        out.contains("postgres://app:<redacted>@127.0.0.1:5432/test"),
        "{out}"
    );
    assert!(
        out.contains("batch_size = 1000"),
        "defaults are shown: {out}"
    );
    assert!(out.contains("linger.ms"), "{out}");
}

#[test]
fn every_kind_of_secret_is_redacted_by_its_name() {
    let toml = "[database]\nurl = \"postgres://app@db/x?sslmode=require&sslpassword=ssl-s3cret\"\n\
                [kafka]\nbrokers = \"embedded\"\n\
                [kafka.options]\n\"ssl.keystore.password\" = \"keystore-s3cret\"\n\
                [kafka.producer_options]\n\"ssl.key.password\" = \"key-s3cret\"\n\
                [kafka.consumer_options]\n\"sasl.password\" = \"sasl-s3cret\"\n\
                [consumer]\ngroup_id = \"g\"\ntopics = [\"events\"]\n\
                [[consumer.routes]]\ntopic = \"events\"\nhandler = \"web\"\n\
                [handlers.web]\nkind = \"http\"\nurl = \"https://hooks.example/in?token=url-s3cret&x=1\"\n\
                headers = { \"x-api-key\" = \"hdr-s3cret\" }\n\
                [handlers.cmd]\nkind = \"command\"\nprogram = \"/bin/true\"\n\
                env = { DB_PASSWORD = \"env-s3cret\", LANG = \"C.UTF-8\" }\n\
                [[relay.tables]]\ntable = \"outbox\"\ntopic = \"events.{event_type}\"\n";
    let (code, out, err) = run_with(&["check-config"], toml, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("s3cret"), "{out}");
    assert!(
        out.contains("sslmode=require&sslpassword=<redacted>"),
        "{out}"
    );
    assert!(out.contains("token=<redacted>&x=1"), "{out}");
    assert!(out.contains("LANG = \"C.UTF-8\""), "{out}");
}

#[test]
fn a_consumer_only_configuration_needs_no_database() {
    let toml = "[kafka]\nbrokers = \"embedded\"\n[consumer]\ngroup_id = \"g\"\ntopics = [\"events\"]\n\
                [[consumer.routes]]\ntopic = \"events\"\nhandler = \"h\"\n\
                [handlers.h]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/x\"\nheaders = { authorization = \"Bearer s3cret\" }\n";
    let (code, out, err) = run_with(&["check-config"], toml, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("authorization = \"<redacted>\""), "{out}");
    assert!(!out.contains("s3cret"));
}

#[test]
fn environment_overrides_the_file() {
    let env = [
        ("OUTBOXD_DATABASE__URL", "postgres://other@db.internal/app"),
        ("OUTBOXD_SHUTDOWN_TIMEOUT", "7s"),
    ];
    let (code, out, err) = run_with(&["check-config"], GOOD, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("postgres://other@db.internal/app"), "{out}");
    assert!(out.contains("shutdown_timeout = \"7s\""), "{out}");
}

#[test]
fn an_outboxd_started_by_a_command_handler_ignores_the_event_variables() {
    let env = [
        ("OUTBOXD_TOPIC", "orders"),
        ("OUTBOXD_PARTITION", "0"),
        ("OUTBOXD_OFFSET", "7"),
        ("OUTBOXD_KEY", "k"),
        ("OUTBOXD_EVENT_ID", "e-1"),
        ("OUTBOXD_EVENT_TYPE", "OrderPlaced"),
        ("OUTBOXD_ATTEMPT", "1"),
        ("OUTBOXD_SHUTDOWN_TIMEOUT", "7s"),
    ];
    let (code, out, err) = run_with(&["check-config"], GOOD, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shutdown_timeout = \"7s\""), "{out}");
    assert!(!out.contains("OrderPlaced"), "{out}");
}

#[test]
fn bad_configurations_exit_78_and_name_the_key() {
    let table = "[[relay.tables]]\ntable = \"outbox\"\ntopic = \"events.{event_type}\"\n";
    let base =
        "[database]\nurl = \"postgres://x@127.0.0.1/test\"\n[kafka]\nbrokers = \"embedded\"\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown top-level key",
            format!("colour = \"red\"\n{base}{table}"),
            "colour",
        ),
        (
            "unknown table key",
            format!("{base}{table}batchsize = 5\n"),
            "batchsize",
        ),
        (
            "wrong type",
            format!("{base}{table}batch_size = \"lots\"\n"),
            "batch_size",
        ),
        (
            "bad duration",
            format!("{base}{table}poll_interval = \"soon\"\n"),
            "poll_interval",
        ),
        (
            "zero duration",
            format!("shutdown_timeout = \"0s\"\n{base}{table}"),
            "shutdown_timeout",
        ),
        (
            "WAL capture on MySQL",
            format!("[database]\nurl = \"mysql://root@127.0.0.1/test\"\n[kafka]\nbrokers = \"embedded\"\n{table}capture = \"wal\"\nnotify_channel = \"\"\n"),
            "relay.tables[0].capture",
        ),
        (
            "WAL capture with lanes",
            format!("{base}{table}capture = \"wal\"\nlanes = 2\n"),
            "relay.tables[0].lanes",
        ),
        (
            "WAL capture that marks",
            format!("{base}{table}capture = \"wal\"\non_published = \"mark\"\n"),
            "relay.tables[0].on_published",
        ),
        (
            "two tables on one slot",
            format!("{base}{table}capture = \"wal\"\n[[relay.tables]]\ntable = \"a.outbox\"\ntopic = \"events.x\"\ncapture = \"wal\"\n[relay.tables.wal]\nslot = \"outboxd_outbox\"\n"),
            "relay.tables[1].wal.slot",
        ),
        (
            "a slot name PostgreSQL refuses",
            format!("{base}{table}capture = \"wal\"\n[relay.tables.wal]\nslot = \"Outbox-Slot\"\n"),
            "relay.tables[0].wal.slot",
        ),
        (
            "a table-less outbox without a prefix",
            format!("{base}{table}capture = \"wal\"\n[relay.tables.wal]\ninserts = false\n"),
            "relay.tables[0].wal.inserts",
        ),
        (
            "cursor mode on MySQL",
            format!("[database]\nurl = \"mysql://root@127.0.0.1/test\"\n[kafka]\nbrokers = \"embedded\"\n{table}on_published = \"cursor\"\nnotify_channel = \"\"\n"),
            "relay.tables[0].on_published",
        ),
        (
            "a transaction-id column outside cursor mode",
            format!("{base}{table}xid_column = \"txid\"\n"),
            "relay.tables[0].xid_column",
        ),
        (
            "a transaction-id column on SQLite",
            format!("[database]\nurl = \"sqlite://x.db\"\n[kafka]\nbrokers = \"embedded\"\n{table}on_published = \"cursor\"\nxid_column = \"txid\"\nnotify_channel = \"\"\n"),
            "relay.tables[0].xid_column",
        ),
        (
            "a reserved header name",
            format!("{base}{table}header_columns = {{ outboxd-replay-count = \"n\" }}\n"),
            "relay.tables[0].header_columns.outboxd-replay-count",
        ),
        (
            "a header name twice",
            format!("{base}{table}header_names = {{ event_id = \"id\" }}\nheader_columns = {{ ID = \"x\" }}\n"),
            "relay.tables[0].header_columns.ID",
        ),
        (
            "no name for the event id",
            format!("{base}{table}header_names = {{ event_id = \"\" }}\n"),
            "relay.tables[0].header_names.event_id",
        ),
        (
            "a header column that is no column name",
            format!("{base}{table}header_columns = {{ tenant = \"tenant id\" }}\n"),
            "relay.tables[0].header_columns.tenant",
        ),
        (
            "unknown null_payload",
            format!("{base}{table}null_payload = \"drop\"\n"),
            "null_payload",
        ),
        (
            "unknown template column",
            format!("{base}[[relay.tables]]\ntable = \"outbox\"\ntopic = \"events.{{colour}}\"\n"),
            "relay.tables[0].topic",
        ),
        (
            "missing url",
            format!("[kafka]\nbrokers = \"embedded\"\n{table}"),
            "database.url",
        ),
        (
            "missing brokers",
            format!("[database]\nurl = \"postgres://x@h/db\"\n{table}"),
            "kafka.brokers",
        ),
        (
            "fixed topic Kafka rejects",
            format!(
                "{base}[[relay.tables]]\ntable = \"outbox\"\ntopic = \"{}\"\n",
                "e".repeat(250)
            ),
            "relay.tables[0].topic",
        ),
        (
            "zero lanes",
            format!("{base}{table}lanes = 0\n"),
            "relay.tables[0].lanes",
        ),
        (
            "rows choose the topic without allowed_topics",
            format!("{base}[[relay.tables]]\ntable = \"outbox\"\ntopic = \"{{aggregate_type}}.events\"\n"),
            "relay.tables[0].allowed_topics",
        ),
        (
            "topic_column without allowed_topics",
            format!("{base}[[relay.tables]]\ntable = \"outbox\"\ntopic_column = \"topic\"\n"),
            "relay.tables[0].allowed_topics",
        ),
        (
            "allowed_topics that exclude the fixed topic",
            format!("{base}[[relay.tables]]\ntable = \"outbox\"\ntopic = \"orders\"\nallowed_topics = [\"billing.*\"]\n"),
            "relay.tables[0].allowed_topics",
        ),
        (
            "a bad allowed topic glob",
            format!("{base}{table}allowed_topics = [\"events/*\"]\n"),
            "relay.tables[0].allowed_topics[0]",
        ),
        (
            "topic and topic_column",
            format!("{base}{table}topic_column = \"topic\"\n"),
            "relay.tables[0].topic",
        ),
        (
            "bad on_published",
            format!("{base}{table}on_published = \"archive\"\n"),
            "on_published",
        ),
        (
            "injection in a column name",
            format!("{base}{table}key_column = \"id; DROP TABLE x\"\n"),
            "relay.tables[0].key_column",
        ),
        (
            "an empty required column",
            format!("{base}{table}payload_column = \"\"\n"),
            "relay.tables.0.payload_column",
        ),
        (
            "an empty order column",
            format!("{base}{table}order_column = \"\"\n"),
            "relay.tables.0.order_column",
        ),
        ("no tables", base.to_string(), "relay.tables"),
        (
            "idempotence off",
            format!("{base}[kafka.options]\n\"enable.idempotence\" = false\n{table}"),
            "enable.idempotence",
        ),
        (
            "unknown librdkafka property",
            format!("{base}[kafka.options]\n\"no.such.property\" = 1\n{table}"),
            "kafka.options",
        ),
        (
            "bad log level",
            format!("[log]\nlevel = \"info,=[\"\n{base}{table}"),
            "log.level",
        ),
        (
            "toml syntax",
            format!("{base}{table}batch_size = = 3\n"),
            "outboxd.toml",
        ),
        (
            "bad url scheme",
            format!(
                "[database]\nurl = \"oracle://x@h/db\"\n[kafka]\nbrokers = \"embedded\"\n{table}"
            ),
            "database.url",
        ),
        (
            "several lanes on SQLite",
            format!(
                "[database]\nurl = \"sqlite://outbox.db\"\n[kafka]\nbrokers = \"embedded\"\n{table}lanes = 2\n"
            ),
            "relay.tables[0].lanes",
        ),
        (
            "a LISTEN channel on MySQL",
            format!(
                "[database]\nurl = \"mysql://x@h/db\"\n[kafka]\nbrokers = \"embedded\"\n{table}notify_channel = \"orders\"\n"
            ),
            "relay.tables[0].notify_channel",
        ),
    ];
    let consumer =
        "[kafka]\nbrokers = \"embedded\"\n[consumer]\ngroup_id = \"g\"\ntopics = [\"events\"]\n";
    let route = "[[consumer.routes]]\ntopic = \"events\"\nhandler = \"h\"\n";
    let consumer_cases: Vec<(&str, String, &str)> = vec![
        ("route to a missing handler", format!("{consumer}{route}"), "consumer.routes[0].handler"),
        ("unknown handler kind", format!("{consumer}{route}[handlers.h]\nkind = \"smtp\"\n"), "handlers.h.kind"),
        ("http url scheme", format!("{consumer}{route}[handlers.h]\nkind = \"http\"\nurl = \"ftp://x\"\n"), "handlers.h.url"),
        ("bad JSON pointer", format!("[database]\nurl = \"postgres://x@h/db\"\n{consumer}{route}[handlers.h]\nkind = \"sql\"\nstatement = \"SELECT $1\"\nparams = [\"amount\"]\n"), "handlers.h.params[0]"),
        ("too few params", format!("[database]\nurl = \"postgres://x@h/db\"\n{consumer}{route}[handlers.h]\nkind = \"sql\"\nstatement = \"SELECT $1, $2\"\nparams = [\"/a\"]\n"), "handlers.h.params"),
        ("sql without database", format!("{consumer}{route}[handlers.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n"), "database.url"),
        ("batches without a retry", format!("[database]\nurl = \"postgres://x@h/db\"\n{consumer}{route}[handlers.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n[handlers.h.retry]\nmax_attempts = 1\n"), "handlers.h.batch_size"),
        ("http batch of zero", format!("{consumer}{route}[handlers.h]\nkind = \"http\"\nurl = \"http://x/\"\nbatch_size = 0\n"), "handlers.h.batch_size"),
        ("retry multiplier", format!("{consumer}{route}[handlers.h]\nkind = \"log\"\n[handlers.h.retry]\nmultiplier = 0.5\n"), "handlers.h.retry.multiplier"),
        ("no topics", "[kafka]\nbrokers = \"embedded\"\n[consumer]\ngroup_id = \"g\"\ntopics = []\n".to_string(), "consumer.topics"),
        ("bad unrouted", format!("{consumer}unrouted = \"drop\"\n"), "unrouted"),
        ("bad dialect", format!("{consumer}dead_letter_headers = \"camel\"\n"), "dead_letter_headers"),
        ("dead-letter topic too long", format!("[kafka]\nbrokers = \"embedded\"\n[consumer]\ngroup_id = \"g\"\ntopics = [\"{}\"]\n", "e".repeat(247)), "consumer.dead_letter_topic"),
        ("a success status to retry", format!("{consumer}{route}[handlers.h]\nkind = \"http\"\nurl = \"http://x\"\nretry_statuses = [200]\n"), "handlers.h.retry_statuses[0]"),
        ("reserved child variable", format!("{consumer}{route}[handlers.h]\nkind = \"command\"\nprogram = \"/bin/true\"\nenv = {{ OUTBOXD_KEY = \"x\" }}\n"), "handlers.h.env"),
        ("bad inherited name", format!("{consumer}{route}[handlers.h]\nkind = \"command\"\nprogram = \"/bin/true\"\ninherit_env = [\"A=B\"]\n"), "handlers.h.inherit_env"),
    ];
    for (what, toml, key) in cases.into_iter().chain(consumer_cases) {
        let (code, _, err) = run_with(&["check-config"], &toml, &[]);
        assert_eq!(code, 78, "{what}: exit {code}, stderr: {err}");
        assert!(
            err.contains(key),
            "{what}: stderr does not name `{key}`: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // A missing file is a configuration error too.
    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/outboxd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/outboxd.toml"));
}

#[test]
fn published_at_column_is_still_accepted_for_published_column() {
    let toml =
        "[database]\nurl = \"postgres://x@127.0.0.1/test\"\n[kafka]\nbrokers = \"embedded\"\n\
        [[relay.tables]]\ntable = \"outbox\"\ntopic = \"e.{event_type}\"\non_published = \"mark\"\n\
        published_at_column = \"sent\"\n";
    let (code, out, err) = run_with(&["check-config"], toml, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published_column = \"sent\""), "{out}");
}

#[test]
fn url_file_supplies_the_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db-url");
    std::fs::write(&secret, "postgres://app:topsecret@10.0.0.1/app\n").unwrap();
    let toml = format!(
        "[database]\nurl_file = \"{}\"\n[kafka]\nbrokers = \"embedded\"\n[[relay.tables]]\ntable = \"outbox\"\ntopic = \"e.{{event_type}}\"\n",
        secret.display()
    );
    let (code, out, err) = run_with(&["check-config"], &toml, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("postgres://app:<redacted>@10.0.0.1/app"),
        "{out}"
    );
}

/// Every key of the configuration schema appears in config/outboxd.toml, the commented
/// reference, and in the tables of docs/configuration.md, and the file passes
/// check-config.
#[test]
fn the_reference_config_documents_every_key() {
    use crate::helpers::col;
    use outboxd::config::*;
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/outboxd.toml"))
            .unwrap();
    let mut full = Config::default();
    full.database.url_file = Some("/run/secrets/db".into());
    full.relay.tables.push(TableConfig {
        topic_column: Some(col("topic")),
        order_column: Some(col("seq")),
        ..TableConfig::default()
    });
    let mut consumer: ConsumerConfig = toml::from_str("group_id = \"g\"\ntopics = []").unwrap();
    consumer.routes.push(RouteConfig {
        topic: "t".into(),
        event_type: Some("E".into()),
        handler: "h".into(),
    });
    full.consumer = Some(consumer);
    for text in [
        "kind = \"http\"\nurl = \"http://x\"\nheaders = { x-tenant = \"t\" }\n[retry]\ninitial = \"1s\"\nmultiplier = 2.0\nmax_delay = \"2s\"\nmax_attempts = 2\nmax_elapsed = \"1m\"",
        "kind = \"command\"\nprogram = \"/bin/true\"",
        "kind = \"sql\"\nstatement = \"SELECT 1\"",
        "kind = \"kafka\"\ntopic = \"t\"",
        "kind = \"log\"",
    ] {
        let h: HandlerConfig = toml::from_str(text).unwrap();
        full.handlers.insert(format!("h{}", full.handlers.len()), h);
    }
    let value = toml::Value::try_from(&full).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    collect_keys(&value, &mut keys);
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            !reference.lines().any(|l| {
                l.trim_start_matches(['#', ' '])
                    .starts_with(&format!("{k} ="))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "config/outboxd.toml does not document: {missing:?}"
    );
    // The reference page names each key in the first column of its tables.
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let named: std::collections::BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split(" |").next())
        .flat_map(|cell| cell.split(|c: char| !(c.is_alphanumeric() || c == '_')))
        .collect();
    let undocumented: Vec<&String> = keys
        .iter()
        .filter(|k| !named.contains(k.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/configuration.md does not name: {undocumented:?}"
    );
    let (code, _, err) = run_with(&["check-config"], &reference, &[]);
    assert_eq!(code, 0, "{err}");
}

/// Names of keys holding values (not sections); entries of free-form maps (`headers`,
/// `options`) are examples, not schema keys.
fn collect_keys(v: &toml::Value, keys: &mut std::collections::BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let section = v.is_table()
                    || v.as_array()
                        .is_some_and(|a| a.iter().all(toml::Value::is_table) && !a.is_empty());
                if !section {
                    keys.insert(k.clone());
                }
                if k != "headers" && k != "options" {
                    collect_keys(v, keys);
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| collect_keys(v, keys)),
        _ => {}
    }
}

mod fuzz {
    use proptest::prelude::*;

    fn load(text: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(&path, text).unwrap();
        outboxd::config::load(&path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    const KEYS: &[&str] = &[
        "shutdown_timeout",
        "[database]",
        "url",
        "max_connections",
        "[kafka]",
        "brokers",
        "[kafka.options]",
        "[http]",
        "listen",
        "[log]",
        "level",
        "format",
        "[[relay.tables]]",
        "table",
        "topic",
        "key_column",
        "batch_size",
        "lanes",
        "poll_interval",
        "on_published",
        "[consumer]",
        "group_id",
        "topics",
        "[[consumer.routes]]",
        "handler",
        "[handlers.h]",
        "kind",
        "statement",
        "params",
        "[handlers.h.retry]",
        "multiplier",
        "max_attempts",
    ];
    const VALUES: &[&str] = &[
        "\"outbox\"",
        "\"x\"",
        "0",
        "-1",
        "1",
        "1e9",
        "true",
        "\"500ms\"",
        "\"soon\"",
        "[]",
        "[\"/a\"]",
        "\"{event_type}\"",
        "\"{nope\"",
        "\"postgres://u:p@h/db\"",
        "\"embedded\"",
        "\"http\"",
        "\"sql\"",
        "\"mark\"",
        "{}",
        "\"\"",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any text: a configuration or an error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = load(&text);
        }

        /// Plausible files assembled from real keys and odd values: errors name a key.
        #[test]
        fn assembled_files_load_or_name_the_problem(
            lines in proptest::collection::vec((0..KEYS.len(), 0..VALUES.len()), 1..20)
        ) {
            let text: String = lines
                .iter()
                .map(|(k, v)| if KEYS[*k].starts_with('[') { format!("{}\n", KEYS[*k]) } else { format!("{} = {}\n", KEYS[*k], VALUES[*v]) })
                .collect();
            if let Err(e) = load(&text) {
                prop_assert!(e.contains("configuration"), "{}", e);
            }
        }
    }
}
