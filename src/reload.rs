//! Configuration reload (SIGHUP): the new file is loaded and validated; what can change
//! safely at runtime is applied (log level, retry policies, http handler headers and
//! timeouts, command timeouts, relay poll interval and batch size); every other changed key
//! keeps its running value and is named as needing a restart. An invalid file changes
//! nothing.

use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::relay::TableTunables;

/// Applies the log filter (installed by the binary; tests run without one).
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

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
    tables: Vec<Arc<TableTunables>>,
    consumer: Option<crate::consumer::Handle>,
    log: Mutex<Option<LogReload>>,
}

impl Reloader {
    /// A reloader for a daemon started with `config`.
    pub fn new(
        config: Config,
        tables: Vec<Arc<TableTunables>>,
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
    pub fn apply(&self, new: &Config) -> Result<Reloaded, String> {
        let mut current = self.current.lock().expect("reload lock poisoned");
        let changed = changed_keys(&current, new);
        let (applied, needs_restart): (Vec<String>, Vec<String>) = changed
            .into_iter()
            .partition(|k| reloadable(k, &current, new));
        if applied.is_empty() {
            return Ok(Reloaded {
                applied,
                needs_restart,
            });
        }
        // The running configuration with only the reloadable keys taken from `new`.
        let mut merged = current.clone();
        merged.log.level = new.log.level.clone();
        for (mine, theirs) in merged.relay.tables.iter_mut().zip(&new.relay.tables) {
            if mine.table == theirs.table {
                mine.batch_size = theirs.batch_size;
                mine.poll_interval = theirs.poll_interval;
            }
        }
        if let (Some(mine), Some(theirs)) = (&mut merged.consumer, &new.consumer) {
            mine.retry = theirs.retry.clone();
        }
        for (name, handler) in merged.handlers.iter_mut() {
            if let Some(theirs) = new.handlers.get(name) {
                if std::mem::discriminant(handler) == std::mem::discriminant(theirs) {
                    take_reloadable(handler, theirs);
                }
            }
        }
        if let Some(consumer) = &self.consumer {
            consumer.reconfigure(&merged)?;
        }
        for (tunables, table) in self.tables.iter().zip(&merged.relay.tables) {
            tunables.set(table);
        }
        if merged.log.level != current.log.level {
            if let Some(log) = &*self.log.lock().expect("reload lock poisoned") {
                log(&merged.log.level)?;
            }
        }
        *current = merged;
        Ok(Reloaded {
            applied,
            needs_restart,
        })
    }
}

fn take_reloadable(mine: &mut crate::config::HandlerConfig, theirs: &crate::config::HandlerConfig) {
    use crate::config::HandlerConfig as H;
    match (mine, theirs) {
        (H::Http(m), H::Http(t)) => {
            m.headers = t.headers.clone();
            m.timeout = t.timeout;
            m.retry = t.retry.clone();
        }
        (H::Command(m), H::Command(t)) => {
            m.timeout = t.timeout;
            m.retry = t.retry.clone();
        }
        (H::Sql(m), H::Sql(t)) => m.retry = t.retry.clone(),
        (H::Kafka(m), H::Kafka(t)) => m.retry = t.retry.clone(),
        (H::Log(m), H::Log(t)) => m.retry = t.retry.clone(),
        _ => {}
    }
}

/// Whether `key` may change at runtime.
fn reloadable(key: &str, old: &Config, new: &Config) -> bool {
    if key == "log.level" || key.starts_with("consumer.retry.") {
        return true;
    }
    if let Some(rest) = key.strip_prefix("relay.tables[") {
        let (index, field) = rest.split_once("].").unwrap_or(("", ""));
        let same_table = index.parse::<usize>().ok().is_some_and(|i| {
            old.relay.tables.get(i).map(|t| &t.table) == new.relay.tables.get(i).map(|t| &t.table)
        });
        return same_table && (field == "batch_size" || field == "poll_interval");
    }
    if let Some(rest) = key.strip_prefix("handlers.") {
        let (name, field) = rest.split_once('.').unwrap_or((rest, ""));
        let same_kind = match (old.handlers.get(name), new.handlers.get(name)) {
            (Some(a), Some(b)) => std::mem::discriminant(a) == std::mem::discriminant(b),
            _ => false,
        };
        let kind = new.handlers.get(name);
        let field_ok = field.starts_with("retry.")
            || (matches!(kind, Some(crate::config::HandlerConfig::Http(_)))
                && (field == "timeout" || field == "headers" || field.starts_with("headers.")))
            || (matches!(kind, Some(crate::config::HandlerConfig::Command(_)))
                && field == "timeout");
        return same_kind && field_ok;
    }
    false
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
        }
        new.consumer.as_mut().unwrap().retry.max_attempts = 3;
        new.http.listen = "127.0.0.1:1".parse().unwrap();
        let changed = changed_keys(&old, &new);
        let (ok, restart): (Vec<_>, Vec<_>) =
            changed.into_iter().partition(|k| reloadable(k, &old, &new));
        assert_eq!(
            ok,
            [
                "consumer.retry.max_attempts",
                "handlers.web.headers.x-tenant",
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
        assert!(
            changed.iter().all(|k| !reloadable(k, &old, &new)),
            "{changed:?}"
        );
    }

    #[test]
    fn apply_keeps_restart_only_keys_at_their_running_values() {
        let tunables = Arc::new(TableTunables::new(&base().relay.tables[0]));
        let reloader = Reloader::new(base(), vec![tunables], None);
        let mut new = base();
        new.relay.tables[0].batch_size = 7;
        new.relay.tables[0].lanes = 3;
        let r = reloader.apply(&new).unwrap();
        assert_eq!(r.applied, ["relay.tables[0].batch_size"]);
        assert_eq!(r.needs_restart, ["relay.tables[0].lanes"]);
        // Reloading the same file again: the batch size is in effect, lanes still pending.
        let again = reloader.apply(&new).unwrap();
        assert!(again.applied.is_empty());
        assert_eq!(again.needs_restart, ["relay.tables[0].lanes"]);
    }
}
