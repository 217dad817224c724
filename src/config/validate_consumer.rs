//! Checks of `[consumer]`, its routes and `[handlers.*]`, without connecting.

use super::rules::{positive, Problems, ENV_PREFIX};
use super::{Config, HandlerConfig, OutagePolicy, RetryPolicy};
use crate::topic::check_topic;

/// Appends one message per problem to `p`, each starting with its key.
pub fn validate(config: &Config, p: &mut Problems) {
    let Some(c) = &config.consumer else {
        if !config.handlers.is_empty() {
            tracing::debug!("handlers are configured but no [consumer] uses them");
        }
        return;
    };
    if c.group_id.trim().is_empty() {
        p.add("consumer.group_id", "must not be empty");
    }
    if c.topics.is_empty() {
        p.add("consumer.topics", "list at least one topic");
    }
    for (i, topic) in c.topics.iter().enumerate() {
        if let Err(e) = check_topic(topic) {
            p.add(format!("consumer.topics[{i}]"), e.to_string());
        }
    }
    if !c.dead_letter_topic.contains("{topic}") && c.dead_letter_topic.contains('{') {
        p.add(
            "consumer.dead_letter_topic",
            "the only placeholder is {topic}",
        );
    } else if let Err(e) = check_topic(&c.dead_letter_topic.replace("{topic}", "t")) {
        p.add("consumer.dead_letter_topic", e.to_string());
    } else {
        // Checked for every topic now, so that no dead letter fails on its topic's name.
        for topic in &c.topics {
            let dead = c.dead_letter_topic.replace("{topic}", topic);
            if let Err(e) = check_topic(&dead) {
                p.add(
                    "consumer.dead_letter_topic",
                    format!("for topic `{topic}` it is `{dead}`: {e}"),
                );
            }
        }
    }
    for (key, value) in [
        ("max_in_flight", c.max_in_flight),
        ("max_pending_per_partition", c.max_pending_per_partition),
        (
            "max_pending_bytes_per_partition",
            c.max_pending_bytes_per_partition,
        ),
    ] {
        if value == 0 {
            p.add(format!("consumer.{key}"), "must be at least 1");
        }
    }
    retry_policy(p, "consumer.retry", &c.retry);
    outage_policy(p, "consumer.outage", &c.outage);
    for (i, route) in c.routes.iter().enumerate() {
        let at = format!("consumer.routes[{i}]");
        if route.topic.is_empty() {
            p.add(format!("{at}.topic"), "must not be empty");
        }
        if !config.handlers.contains_key(&route.handler) {
            let known: Vec<&str> = config.handlers.keys().map(String::as_str).collect();
            p.add(
                format!("{at}.handler"),
                format!(
                    "no [handlers.{}] is configured (known: {})",
                    route.handler,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }
    for (name, handler) in &config.handlers {
        let at = format!("handlers.{name}");
        let retry = handler.retry().over(&c.retry);
        retry_policy(p, &format!("{at}.retry"), &retry);
        let batch = match handler {
            HandlerConfig::Http(h) => h.batch_size,
            HandlerConfig::Sql(h) => h.batch_size,
            _ => 1,
        };
        if batch > 1 && retry.max_attempts < 2 {
            p.add(
                format!("{at}.batch_size"),
                "batches need max_attempts of at least 2: the events of a batch that fails retryably are each retried alone; set batch_size = 1 or raise max_attempts",
            );
        }
        outage_policy(
            p,
            &format!("{at}.outage"),
            &handler.outage().over(&c.outage),
        );
        match handler {
            HandlerConfig::Http(h) => {
                if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                    p.add(format!("{at}.url"), "must start with http:// or https://");
                }
                positive(p, &format!("{at}.timeout"), h.timeout);
                batch_size(p, &at, h.batch_size);
                for (i, status) in h.retry_statuses.iter().enumerate() {
                    if !(300..=599).contains(status) {
                        p.add(
                            format!("{at}.retry_statuses[{i}]"),
                            format!("{status} is not a failure status (300-599)"),
                        );
                    }
                }
                for header in h.headers.keys() {
                    if header.is_empty()
                        || !header.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                    {
                        p.add(
                            format!("{at}.headers"),
                            format!("`{header}` is not a header name"),
                        );
                    }
                }
            }
            HandlerConfig::Command(h) => {
                if h.program.as_os_str().is_empty() {
                    p.add(format!("{at}.program"), "must not be empty");
                }
                positive(p, &format!("{at}.timeout"), h.timeout);
                let names = h
                    .env
                    .keys()
                    .map(|k| ("env", k))
                    .chain(h.inherit_env.iter().map(|k| ("inherit_env", k)));
                for (key, name) in names {
                    if let Err(why) = env_name(name) {
                        p.add(format!("{at}.{key}"), format!("`{name}` {why}"));
                    }
                }
                for (name, value) in &h.env {
                    if value.contains('\0') {
                        p.add(format!("{at}.env.{name}"), "a value cannot hold a NUL byte");
                    }
                }
            }
            HandlerConfig::Sql(h) => {
                if h.statement.trim().is_empty() {
                    p.add(format!("{at}.statement"), "must not be empty");
                }
                for (i, pointer) in h.params.iter().enumerate() {
                    if !(pointer.is_empty() || pointer.starts_with('/')) {
                        p.add(format!("{at}.params[{i}]"), format!("`{pointer}` is not a JSON pointer (\"/field\", \"/a/0/b\" or \"\")"));
                    }
                }
                batch_size(p, &at, h.batch_size);
                let highest = highest_placeholder(&h.statement);
                if highest > h.params.len() {
                    p.add(
                        format!("{at}.params"),
                        format!(
                            "the statement uses ${highest} but only {} params are listed",
                            h.params.len()
                        ),
                    );
                }
            }
            HandlerConfig::Kafka(h) => {
                if let Err(e) = check_topic(&h.topic) {
                    p.add(format!("{at}.topic"), e.to_string());
                }
            }
            HandlerConfig::Log(_) => {}
        }
        if !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            p.add(
                format!("handlers.{name}"),
                "names use letters, digits, '_' and '-'",
            );
        }
    }
}

/// Whether `name` may be set in a child's environment by the configuration.
fn env_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.contains(['=', '\0']) {
        Err("is not a variable name")
    } else if name.to_ascii_uppercase().starts_with(ENV_PREFIX) {
        Err("is reserved: outboxd sets the OUTBOXD_* variables of the event")
    } else {
        Ok(())
    }
}

fn retry_policy(p: &mut Problems, at: &str, r: &RetryPolicy) {
    positive(p, &format!("{at}.initial"), r.initial);
    positive(p, &format!("{at}.max_elapsed"), r.max_elapsed);
    if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
        p.add(format!("{at}.multiplier"), "must be a number >= 1");
    }
    if r.max_delay < r.initial {
        p.add(format!("{at}.max_delay"), "must be at least initial");
    }
    if r.max_attempts == 0 {
        p.add(format!("{at}.max_attempts"), "must be at least 1");
    }
}

fn outage_policy(p: &mut Problems, at: &str, o: &OutagePolicy) {
    if !(1..=1024).contains(&o.failures) {
        p.add(format!("{at}.failures"), "must be between 1 and 1024");
    }
    if o.keys == 0 {
        p.add(format!("{at}.keys"), "must be at least 1");
    } else if o.keys > o.failures {
        p.add(
            format!("{at}.keys"),
            format!(
                "must be at most failures ({}): {} failures cannot come from more keys",
                o.failures, o.failures
            ),
        );
    }
    positive(p, &format!("{at}.window"), o.window);
    positive(p, &format!("{at}.probe_interval"), o.probe_interval);
    if o.max_probe_interval < o.probe_interval {
        p.add(
            format!("{at}.max_probe_interval"),
            "must be at least probe_interval",
        );
    }
}

/// The largest `$n` in a statement (a rough scan; the database has the last word).
fn highest_placeholder(statement: &str) -> usize {
    let bytes = statement.as_bytes();
    let mut highest = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let digits: String = statement[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                highest = highest.max(n);
            }
            i += 1 + digits.len();
        } else {
            i += 1;
        }
    }
    highest
}

/// A handler's `batch_size`: 1 (no batches) to 10,000.
fn batch_size(p: &mut Problems, at: &str, size: usize) {
    if !(1..=10_000).contains(&size) {
        p.add(
            format!("{at}.batch_size"),
            format!("{size} is not between 1 and 10000"),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_highest_placeholder() {
        assert_eq!(
            super::highest_placeholder("UPDATE a SET b = b + $1 WHERE c = $12"),
            12
        );
        assert_eq!(super::highest_placeholder("SELECT '$'"), 0);
    }
}
