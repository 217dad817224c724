//! Configuration reload (SIGHUP): the new file is loaded and validated; what can change
//! safely at runtime is applied (log level, retry policies, http handler headers and
//! timeouts, command timeouts, relay poll interval and batch size); every other changed key
//! keeps its running value and is named as needing a restart. An invalid file changes
//! nothing.
//!
//! [`reloadable`] is the one definition of what a reload may change: it takes those parts
//! of the new configuration into the running one. The keys it changed are the ones
//! applied; the keys in which the result still differs from the new file need a restart.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::config::{Config, HandlerConfig};
use crate::handlers::HandlerError;
use crate::relay::TableSettings;

/// Applies the log filter (installed by the binary; tests run without one).
pub type LogReload =
    Box<dyn Fn(&str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// Why a reload could not be applied; what it had applied before stays in effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A handler refused its new settings.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The new log filter could not be installed.
    #[error("log.level")]
    Log(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed keys now in effect.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until a restart.
    pub needs_restart: Vec<String>,
}

/// Holds the running configuration and the handles to change it.
pub struct Reloader {
    current: Mutex<Config>,
    tables: Vec<watch::Sender<TableSettings>>,
    consumer: Option<crate::consumer::Handle>,
    log: Mutex<Option<LogReload>>,
}

impl Reloader {
    /// A reloader for a daemon started with `config`.
    pub fn new(
        config: Config,
        tables: Vec<watch::Sender<TableSettings>>,
        consumer: Option<crate::consumer::Handle>,
    ) -> Self {
        Reloader {
            current: Mutex::new(config),
            tables,
            consumer,
            log: Mutex::new(None),
        }
    }

    /// Installs the function that changes the log filter.
    pub fn set_log_reload(&self, f: LogReload) {
        *self.log.lock().expect("reload lock poisoned") = Some(f);
    }

    /// Applies the reloadable part of `new` (already validated).
    pub fn apply(&self, new: &Config) -> Result<Reloaded, ReloadError> {
        let mut current = self.current.lock().expect("reload lock poisoned");
        let merged = reloadable(&current, new);
        let reloaded = Reloaded {
            applied: changed_keys(&current, &merged),
            needs_restart: changed_keys(&merged, new),
        };
        if reloaded.applied.is_empty() {
            return Ok(reloaded);
        }
        if let Some(consumer) = &self.consumer {
            consumer.reconfigure(&merged)?;
        }
        for (settings, table) in self.tables.iter().zip(&merged.relay.tables) {
            let now = TableSettings::of(table);
            settings.send_if_modified(|s| std::mem::replace(s, now) != now);
        }
        if merged.log.level != current.log.level {
            if let Some(log) = &*self.log.lock().expect("reload lock poisoned") {
                log(&merged.log.level).map_err(ReloadError::Log)?;
            }
        }
        *current = merged;
        Ok(reloaded)
    }
}

/// The `running` configuration with the parts a reload may change taken from `new`: the
/// log level, the consumer's retry and outage policies, each table's [`TableSettings`] (a table still at
/// its place under the same name), and each handler's retry and outage policies, http headers and
/// timeout and command timeout (a handler of the same name and kind).
pub fn reloadable(running: &Config, new: &Config) -> Config {
    let mut merged = running.clone();
    merged.log.level = new.log.level.clone();
    for (mine, theirs) in merged.relay.tables.iter_mut().zip(&new.relay.tables) {
        if mine.table == theirs.table {
            TableSettings::of(theirs).write_into(mine);
        }
    }
    if let (Some(mine), Some(theirs)) = (&mut merged.consumer, &new.consumer) {
        mine.retry = theirs.retry.clone();
        mine.outage = theirs.outage.clone();
    }
    for (name, mine) in merged.handlers.iter_mut() {
        if let Some(theirs) = new.handlers.get(name) {
            take_reloadable(mine, theirs);
        }
    }
    merged
}

/// A handler's reloadable keys from `theirs`, when both are of one kind.
fn take_reloadable(mine: &mut HandlerConfig, theirs: &HandlerConfig) {
    use HandlerConfig as H;
    match (mine, theirs) {
        (H::Http(m), H::Http(t)) => {
            m.headers = t.headers.clone();
            m.timeout = t.timeout;
            (m.retry, m.outage) = (t.retry.clone(), t.outage.clone());
        }
        (H::Command(m), H::Command(t)) => {
            m.timeout = t.timeout;
            (m.retry, m.outage) = (t.retry.clone(), t.outage.clone());
        }
        (H::Sql(m), H::Sql(t)) => (m.retry, m.outage) = (t.retry.clone(), t.outage.clone()),
        (H::Kafka(m), H::Kafka(t)) => (m.retry, m.outage) = (t.retry.clone(), t.outage.clone()),
        (H::Log(m), H::Log(t)) => (m.retry, m.outage) = (t.retry.clone(), t.outage.clone()),
        _ => {}
    }
}

/// Dotted paths of every value that differs between `old` and `new` (secrets included by
/// name only).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (
        toml::Value::try_from(old).unwrap_or(toml::Value::Boolean(false)),
        toml::Value::try_from(new).unwrap_or(toml::Value::Boolean(false)),
    );
    let mut out = Vec::new();
    diff("", Some(&a), Some(&b), &mut out);
    out
}

fn diff(path: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
    use toml::Value::{Array, Table};
    match (a, b) {
        (Some(Table(x)), Some(Table(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(&p, x.get(k), y.get(k), out);
            }
        }
        (Some(Array(x)), Some(Array(y))) if x.iter().chain(y).all(toml::Value::is_table) => {
            for i in 0..x.len().max(y.len()) {
                diff(&format!("{path}[{i}]"), x.get(i), y.get(i), out);
            }
        }
        (x, y) if x != y => out.push(path.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        toml::from_str(
            r#"
            [kafka]
            brokers = "embedded"
            [database]
            url = "postgres://x@h/db"
            [[relay.tables]]
            table = "outbox"
            topic = "e.{event_type}"
            [consumer]
            group_id = "g"
            topics = ["t"]
            [handlers.web]
            kind = "http"
            url = "http://h/x"
            [handlers.cmd]
            kind = "command"
            program = "/bin/true"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn safe_keys_are_reloadable_and_others_need_a_restart() {
        let old = base();
        let mut new = base();
        new.log.level = "debug".into();
        new.relay.tables[0].poll_interval = std::time::Duration::from_secs(2);
        new.relay.tables[0].lanes = 4;
        if let crate::config::HandlerConfig::Http(h) = new.handlers.get_mut("web").unwrap() {
            h.headers.insert("x-tenant".into(), "acme".into());
            h.url = "http://elsewhere/x".into();
            h.outage.enabled = Some(false);
        }
        new.consumer.as_mut().unwrap().retry.max_attempts = 3;
        new.consumer.as_mut().unwrap().outage.failures = 20;
        new.http.listen = "127.0.0.1:1".parse().unwrap();
        let merged = reloadable(&old, &new);
        let (ok, restart) = (changed_keys(&old, &merged), changed_keys(&merged, &new));
        assert_eq!(
            ok,
            [
                "consumer.outage.failures",
                "consumer.retry.max_attempts",
                "handlers.web.headers.x-tenant",
                "handlers.web.outage.enabled",
                "log.level",
                "relay.tables[0].poll_interval"
            ]
        );
        assert_eq!(
            restart,
            ["handlers.web.url", "http.listen", "relay.tables[0].lanes"]
        );
    }

    #[test]
    fn a_handler_changing_kind_needs_a_restart() {
        let old = base();
        let mut new = base();
        new.handlers.insert(
            "cmd".into(),
            toml::from_str("kind = \"log\"\n[retry]\nmax_attempts = 2").unwrap(),
        );
        let changed = changed_keys(&old, &new);
        assert!(!changed.is_empty());
        let merged = reloadable(&old, &new);
        assert!(changed_keys(&old, &merged).is_empty());
        assert_eq!(changed_keys(&merged, &new), changed);
    }

    #[test]
    fn apply_keeps_restart_only_keys_at_their_running_values() {
        let (settings, mut lane) = watch::channel(TableSettings::of(&base().relay.tables[0]));
        let reloader = Reloader::new(base(), vec![settings], None);
        let mut new = base();
        new.relay.tables[0].batch_size = 7;
        new.relay.tables[0].lanes = 3;
        let r = reloader.apply(&new).unwrap();
        assert_eq!(r.applied, ["relay.tables[0].batch_size"]);
        assert_eq!(r.needs_restart, ["relay.tables[0].lanes"]);
        assert!(
            lane.has_changed().unwrap(),
            "the lanes see the new settings"
        );
        assert_eq!(lane.borrow_and_update().batch_size, 7);
        // Reloading the same file again: the batch size is in effect, lanes still pending.
        let again = reloader.apply(&new).unwrap();
        assert!(again.applied.is_empty());
        assert_eq!(again.needs_restart, ["relay.tables[0].lanes"]);
        assert!(
            !lane.has_changed().unwrap(),
            "nothing changed for the lanes"
        );
    }
}
