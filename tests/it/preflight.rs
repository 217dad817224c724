//! `outboxd check-config --connect` against real databases and a mock cluster: a sound
//! setup passes; each mistake it names makes it exit 78 naming the place, a database or
//! brokers that do not answer 69; a missing index is a warning.

use crate::backends::{mysql_url, on_backends, Kind, TestDb};
use crate::cli::run_with;
use crate::helpers::*;

/// `[database]` and `[kafka]` for `db` and `bootstrap`.
fn head(url: &str, bootstrap: &str) -> String {
    format!("[database]\nurl = \"{url}\"\n\n[kafka]\nbrokers = \"{bootstrap}\"\n")
}

/// `check-config --connect` on `toml`: `(exit code, stdout + stderr)`.
fn preflight(toml: &str) -> (i32, String) {
    let (code, out, err) = run_with(&["check-config", "--connect"], toml, &[]);
    (code, format!("{out}{err}"))
}

on_backends!(a_sound_setup_passes_the_preflight: postgres, mysql, sqlite);
async fn a_sound_setup_passes_the_preflight(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = db.outbox_table("pf_sound").await;
    let cluster = cluster("orders", 1);
    cluster.create_topic("orders.dlq", 1, 1).unwrap();
    cluster.create_topic("copies", 1, 1).unwrap();
    let toml = format!(
        "{}\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\n\n\
         [consumer]\ngroup_id = \"g\"\ntopics = [\"orders\"]\n\n\
         [[consumer.routes]]\ntopic = \"orders\"\nhandler = \"copy\"\n\n\
         [handlers.copy]\nkind = \"kafka\"\ntopic = \"copies\"\n",
        head(&db.url, &cluster.bootstrap_servers())
    );
    let (code, out) = preflight(&toml);
    assert_eq!(code, 0, "{out}");
    for expected in [
        "ok       database: ",
        "outboxd's migrations are applied",
        &format!("ok       relay table {table}: columns, types and the privileges of delete mode"),
        "ok       outboxd's tables: privileges",
        "ok       topic orders: exists",
        "ok       topic orders.dlq: exists",
        "ok       topic copies: exists",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from:\n{out}");
    }
    assert!(!out.contains("problem"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_and_a_missing_column_are_named() {
    let db = TestDb::new(Kind::Postgres).await;
    let table = db.outbox_table("pf_columns").await;
    let cluster = cluster("orders", 1);
    let toml = format!(
        "{}\n[[relay.tables]]\ntable = \"{table}_nowhere\"\ntopic = \"orders\"\n\n\
         [[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\nkey_column = \"account\"\n",
        head(&db.url, &cluster.bootstrap_servers())
    );
    let (code, out) = preflight(&toml);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains(&format!(
            "problem  relay table {table}_nowhere: table `{table}_nowhere` does not exist"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "problem  relay table {table}: table `{table}` has no column `account` (relay.tables.key_column)"
        )),
        "{out}"
    );
    assert!(out.contains("2 problem(s)"), "{out}");
}

/// A database user that may only read `table`, `_sqlx_migrations` and the dead rows; its
/// URL. Dropped by [`drop_reader`].
async fn reader(db: &TestDb, table: &str) -> (String, String) {
    let user = unique("reader");
    let (grantee, create, url) = match db.kind {
        Kind::Postgres => (
            user.clone(),
            format!("CREATE ROLE {user} LOGIN;"),
            database_url().replacen("postgres@", &format!("{user}@"), 1),
        ),
        Kind::MySql => (
            format!("'{user}'@'%'"),
            format!("CREATE USER '{user}'@'%';"),
            mysql_url().replacen("root@", &format!("{user}@"), 1),
        ),
        Kind::Sqlite => unreachable!("SQLite has no users"),
    };
    let grants: String = [table, "_sqlx_migrations", "outboxd_dead_rows"]
        .iter()
        .map(|on| format!("GRANT SELECT ON {on} TO {grantee};"))
        .collect();
    db.exec(&format!("{create}{grants}")).await;
    (user, url)
}

async fn drop_reader(db: &TestDb, user: &str) {
    match db.kind {
        Kind::Postgres => {
            db.exec(&format!("DROP OWNED BY {user}; DROP ROLE {user}"))
                .await
        }
        _ => db.exec(&format!("DROP USER '{user}'@'%'")).await,
    }
}

on_backends!(privileges_the_mode_needs_are_named: postgres, mysql);
async fn privileges_the_mode_needs_are_named(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = db.outbox_table("pf_grants").await;
    let (user, url) = reader(&db, &table).await;
    let cluster = cluster("orders", 1);
    let toml = |mode: &str| {
        format!(
            "{}\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\non_published = \"{mode}\"\n",
            head(&url, &cluster.bootstrap_servers())
        )
    };
    let (code, out) = preflight(&toml("delete"));
    drop_reader(&db, &user).await;
    assert_eq!(code, 78, "{out}");
    let place = format!("problem  relay table {table}: may not run");
    assert!(
        out.contains(&format!("{place} DELETE on {table}: ")),
        "{out}"
    );
    if kind == Kind::Postgres {
        // PostgreSQL locks rows for a claim only with UPDATE on the table.
        assert!(
            out.contains(&format!("{place} SELECT ... FOR UPDATE on {table}: ")),
            "{out}"
        );
    }
    for own in [
        "INSERT on outboxd_dead_rows",
        "SELECT on outboxd_relay_attempts",
        "UPDATE on outboxd_relay_attempts",
        "DELETE on outboxd_relay_attempts",
    ] {
        assert!(
            out.contains(&format!("problem  outboxd's tables: may not run {own}: ")),
            "`{own}` missing from:\n{out}"
        );
    }
    assert!(
        !out.contains("SELECT on outboxd_dead_rows"),
        "granted, so not named:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_mode_needs_only_select_on_the_table() {
    let db = TestDb::new(Kind::Postgres).await;
    let table = db.outbox_table("pf_cursor").await;
    let (user, url) = reader(&db, &table).await;
    let cluster = cluster("orders", 1);
    let toml = format!(
        "{}\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\non_published = \"cursor\"\n",
        head(&url, &cluster.bootstrap_servers())
    );
    let (code, out) = preflight(&toml);
    drop_reader(&db, &user).await;
    assert_eq!(code, 78, "outboxd's own tables are still refused:\n{out}");
    assert!(
        out.contains(&format!(
            "ok       relay table {table}: columns, types and the privileges of cursor mode"
        )),
        "{out}"
    );
    assert!(
        out.contains("problem  outboxd's tables: may not run INSERT on outboxd_relay_cursors: "),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_sqlite_database_is_named() {
    let db = TestDb::new(Kind::Sqlite).await;
    let table = db.outbox_table("pf_ro").await;
    let cluster = cluster("orders", 1);
    let url = db.url.replace("mode=rwc", "mode=ro");
    let toml = format!(
        "{}\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\n",
        head(&url, &cluster.bootstrap_servers())
    );
    let (code, out) = preflight(&toml);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains(&format!(
            "problem  relay table {table}: may not run DELETE on {table}: "
        )),
        "{out}"
    );
}

on_backends!(mark_mode_without_an_index_for_pending_rows_is_a_warning: postgres, mysql, sqlite);
async fn mark_mode_without_an_index_for_pending_rows_is_a_warning(kind: Kind) {
    let db = TestDb::new(kind).await;
    let table = unique("pf_mark");
    let (id, text, flag) = db.pick(
        ("bigserial PRIMARY KEY", "text", "boolean"),
        (
            "BIGINT AUTO_INCREMENT PRIMARY KEY",
            "VARCHAR(64)",
            "BOOLEAN",
        ),
        ("INTEGER PRIMARY KEY", "TEXT", "BOOLEAN"),
    );
    db.exec(&format!(
        "CREATE TABLE {table} (id {id}, aggregate_id {text}, event_type {text}, \
         payload text, published {flag} DEFAULT false)"
    ))
    .await;
    let cluster = cluster("orders", 1);
    let toml = format!(
        "{}\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\n\
         on_published = \"mark\"\npublished_column = \"published\"\n\
         aggregate_type_column = \"\"\nheaders_column = \"\"\nevent_id_column = \"\"\n\
         created_at_column = \"\"\n",
        head(&db.url, &cluster.bootstrap_servers())
    );
    let (code, out) = preflight(&toml);
    assert_eq!(code, 0, "a warning alone passes:\n{out}");
    let warning = format!(
        "warning  relay table {table}: no index serves the claim of pending rows, so each claim reads the whole table: "
    );
    let line = out
        .lines()
        .find(|l| l.starts_with(&warning))
        .unwrap_or_else(|| panic!("{out}"));
    let index = line[warning.len()..].to_owned();
    let expected = db.pick(
        format!("CREATE INDEX {table}_pending ON {table} (id) WHERE published IS NOT TRUE"),
        format!("CREATE INDEX {table}_pending ON {table} (published, id)"),
        format!("CREATE INDEX {table}_pending ON {table} (id) WHERE published IS NOT TRUE"),
    );
    assert_eq!(index.replace(['"', '`'], ""), expected);
    // The advice is the index that ends the warning.
    db.exec(&index).await;
    let (code, out) = preflight(&toml);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_named_with_what_uses_them() {
    let cluster = cluster("orders", 1);
    let toml = format!(
        "[kafka]\nbrokers = \"{}\"\n\n\
         [consumer]\ngroup_id = \"g\"\ntopics = [\"orders\", \"payments\"]\n\n\
         [[consumer.routes]]\ntopic = \"*\"\nhandler = \"copy\"\n\n\
         [handlers.copy]\nkind = \"kafka\"\ntopic = \"copies\"\n",
        cluster.bootstrap_servers()
    );
    let (code, out) = preflight(&toml);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("ok       topic orders: exists (consumer.topics)"),
        "{out}"
    );
    for (topic, used_by) in [
        ("payments", "consumer.topics"),
        ("orders.dlq", "consumer.dead_letter_topic of orders"),
        ("payments.dlq", "consumer.dead_letter_topic of payments"),
        ("copies", "handlers.copy"),
    ] {
        // The mock cluster answers no DescribeConfigs, so auto-creation is unknown.
        let named = format!(
            "problem  topic {topic}: does not exist ({used_by}); whether the brokers create topics"
        );
        assert!(out.contains(&named), "`{named}` missing from:\n{out}");
    }
    assert!(!out.contains("database"), "no database needed:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_that_do_not_answer_are_named() {
    let toml = "[kafka]\nbrokers = \"127.0.0.1:1\"\n\n\
                [consumer]\ngroup_id = \"g\"\ntopics = [\"orders\"]\n\n\
                [[consumer.routes]]\ntopic = \"orders\"\nhandler = \"log\"\n\n\
                [handlers.log]\nkind = \"log\"\n";
    let (code, out) = preflight(toml);
    assert_eq!(
        code, 69,
        "nothing to fix in the configuration, a restart may help:\n{out}"
    );
    assert!(
        out.contains("problem  kafka: the brokers (127.0.0.1:1) do not answer within 10 s"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_answer_is_named() {
    let cluster = cluster("orders", 1);
    let toml = format!(
        "{}\n[[relay.tables]]\ntable = \"outbox\"\ntopic = \"orders\"\n",
        head(
            "postgres://postgres@127.0.0.1:1/test?connect_timeout=2",
            &cluster.bootstrap_servers()
        )
    );
    let (code, out) = preflight(&toml);
    assert_eq!(code, 69, "{out}");
    assert!(
        out.contains("problem  database: does not answer: "),
        "{out}"
    );
    assert!(
        out.contains("ok       kafka: the brokers"),
        "Kafka is still checked:\n{out}"
    );
    // With a mistake in the configuration as well, it is a configuration error.
    let (code, out) = preflight(&toml.replace("topic = \"orders\"", "topic = \"nowhere\""));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("problem  topic nowhere: does not exist"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_not_applied_are_named_unless_run_applies_them() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/fresh.db?mode=rwc", dir.path().display());
    let cluster = cluster("orders", 1);
    cluster.create_topic("orders.dlq", 1, 1).unwrap();
    let toml = |migrate: bool| {
        format!(
            "[database]\nurl = \"{url}\"\nmigrate = {migrate}\n\n\
             [kafka]\nbrokers = \"{}\"\n\n\
             [consumer]\ngroup_id = \"g\"\ntopics = [\"orders\"]\n\n\
             [[consumer.routes]]\ntopic = \"orders\"\nhandler = \"store\"\n\n\
             [handlers.store]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n",
            cluster.bootstrap_servers()
        )
    };
    let (code, out) = preflight(&toml(false));
    assert_eq!(code, 78, "{out}");
    let named = "problem  database: database.migrate is false and migrations are not applied: 20261126000001 outbox";
    assert!(out.contains(named), "{out}");
    assert!(out.contains("run `outboxd migrate`"), "{out}");
    let (code, out) = preflight(&toml(true));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning  database: migrations not applied yet: "),
        "{out}"
    );
    // The quick start: its reference table comes with the migrations `run` applies.
    let quickstart = std::fs::read_to_string("config/quickstart.toml").unwrap();
    let (code, out) = preflight(&quickstart.replace(
        "sqlite://outboxd-quickstart.db",
        &format!("sqlite://{}/quickstart.db", dir.path().display()),
    ));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning  relay table outbox: does not exist yet: the migrations"),
        "{out}"
    );
}

/// An event store past a few hundred thousand rows in cursor mode without a
/// transaction-id column is a warning that spells out the column; once it is there, its
/// index is checked, and a column of another type is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_cursor_table_is_told_how_to_claim_an_index_range() {
    let db = TestDb::new(Kind::Postgres).await;
    let table = unique("pf_store");
    db.exec(&format!(
        "CREATE TABLE {table} (id bigserial PRIMARY KEY, aggregate_id text NOT NULL, \
         event_type text NOT NULL, version integer NOT NULL, data jsonb NOT NULL); \
         INSERT INTO {table} (aggregate_id, event_type, version, data) \
         SELECT 'a' || (g % 100), 'Deposited', g, '{{}}' FROM generate_series(1, 260000) g; \
         ANALYZE {table}"
    ))
    .await;
    let cluster = cluster("orders", 1);
    let toml = |xid: &str| {
        format!(
            "{}\n[[relay.tables]]\ntable = \"{table}\"\ntopic = \"orders\"\n\
             on_published = \"cursor\"\npayload_column = \"data\"\nxid_column = \"{xid}\"\n\
             aggregate_type_column = \"\"\nheaders_column = \"\"\nevent_id_column = \"\"\n\
             created_at_column = \"\"\n",
            head(&db.url, &cluster.bootstrap_servers())
        )
    };
    let (code, out) = preflight(&toml(""));
    assert_eq!(code, 0, "a warning alone passes:\n{out}");
    let warning = format!("warning  relay table {table}: holds about 2");
    let line = out
        .lines()
        .find(|l| l.starts_with(&warning))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("every cursor-mode claim reads all of them")
            && line.contains("set xid_column = \"txid\""),
        "{line}"
    );
    // The statements the warning gives, one at a time (CREATE INDEX CONCURRENTLY runs
    // outside a transaction).
    let advice = line.split('`').nth(1).expect("the statements in backticks");
    for statement in advice.split(';') {
        db.exec(statement).await;
    }
    let (code, out) = preflight(&toml("txid"));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    // Without the index each claim would read the whole table again.
    db.exec(&format!("DROP INDEX {table}_xid")).await;
    let (code, out) = preflight(&toml("txid"));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "warning  relay table {table}: no index serves the claim of pending rows, so each claim reads the whole table: \
             CREATE INDEX CONCURRENTLY {table}_xid ON \"{table}\" (\"txid\", \"id\")"
        )),
        "{out}"
    );
    db.exec(&format!(
        "ALTER TABLE {table} ALTER COLUMN txid DROP DEFAULT"
    ))
    .await;
    let (code, out) = preflight(&toml("txid"));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("must have DEFAULT pg_current_xact_id() (it has none)"),
        "{out}"
    );
    let (code, out) = preflight(&toml("version"));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains(&format!(
            "problem  relay table {table}: table `{table}`: `version` (relay.tables.xid_column) is of type integer; it must be xid8"
        )),
        "{out}"
    );
}
