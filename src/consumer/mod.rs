//! The consumer half: reads the configured topics in a consumer group and hands every
//! message to its partition's worker, which delivers it to the routed handler.
//!
//! - this file: client setup, reloads;
//! - `dispatcher`: polls the consumer's main queue for rebalances, statistics and errors;
//!   starts and retires one worker per assigned partition, which reads the partition's
//!   own queue; commits offsets; drains, commits and leaves the group at shutdown;
//! - `worker`: one partition's window of messages, its lanes, its offset to commit;
//! - `delivery`: one message's steps (a wait at its handler's gate, call, retry pause,
//!   dead letter);
//! - `outage`: per handler, whether its downstream is down (the decisions, no I/O);
//!   `gate`: what each call of a handler passes, built on it;
//! - `lanes`, `offsets` (what is final, and the commit metadata), `commits` (the table of
//!   offsets to commit), `input`, `routing`, `retry`, `dead_letter`, `context`
//!   (rebalance, commit and statistics callbacks), `close` (leaving the group at
//!   shutdown).
//!
//! Offsets: librdkafka's automatic commit is off. Each worker publishes its partition's
//! lowest offset without a final outcome, with a map of the final ones above it in the
//! commit's metadata; the dispatcher commits what changed every 200 ms, on revoke and at
//! shutdown, and a newly assigned partition's worker reads the map back first.

mod close;
mod commits;
mod context;
mod dead_letter;
mod delivery;
mod dispatcher;
mod gate;
mod input;
mod lanes;
mod offsets;
mod outage;
mod retry;
mod routing;
mod worker;

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Config, ConsumerConfig, HandlerConfig, OutagePolicy};
use crate::handlers::{Handler, HandlerDeps, HandlerError};
use crate::services::{DrainBudget, Services};
use context::Context;
use dead_letter::DeadLetters;
use delivery::{NamedHandler, Shared, Window};
use dispatcher::{Dispatcher, Stop};
use gate::Gate;
use routing::Router;

/// `queued.min.messages` for the handlers the routes lead to. A partition whose queue was
/// full when its fetch was due is fetched again `fetch.queue.backoff.ms` (10 ms) later, so
/// its queue must hold what its handler takes in that time. A `log` handler (or a consumer
/// without routes, which only skips or dead-letters) takes a few hundred thousand messages
/// a second per partition and gets 2,000. Every other handler waits for a call per message
/// or per batch (an HTTP answer, a commit, a child process, Kafka's ack), tens of thousands
/// a second over all partitions at the default `max_in_flight`; 500 serves them, and each
/// partition then keeps 1,500 fewer messages in librdkafka's queue.
fn refill_below(config: &Config, c: &ConsumerConfig) -> u32 {
    let logs = |name: &str| matches!(config.handlers.get(name), Some(HandlerConfig::Log(_)));
    if c.routes.is_empty() || c.routes.iter().any(|r| logs(&r.handler)) {
        2000
    } else {
        500
    }
}

/// Starts the consumer when `[consumer]` is configured, returning its task and a handle
/// for reloads. The task returns after `shutdown` once workers finished their message in
/// flight (or the budget's share for calls passed), offsets were committed, and the
/// consumer left the group and closed (or the budget's share for that passed).
pub fn start(
    config: &Config,
    bootstrap: &str,
    database: Option<crate::db::Database>,
    services: &Services,
    budget: DrainBudget,
) -> Result<Option<(JoinHandle<()>, Handle)>, StartError> {
    let (producer, metrics) = (services.producer.clone(), services.metrics.clone());
    let Some(c) = &config.consumer else {
        return Ok(None);
    };
    let deps = HandlerDeps {
        database,
        producer: producer.clone(),
        metrics: metrics.clone(),
    };
    let gate = |name: &str, what: String, policy: OutagePolicy| {
        Gate::new(
            what,
            policy,
            c.max_in_flight,
            gate::Meters::of(&metrics, name),
        )
    };
    let mut handlers = Vec::new();
    for (name, hc) in &config.handlers {
        let outage = hc.outage().over(&c.outage);
        handlers.push(NamedHandler {
            name: name.clone(),
            handler: Handler::build(name, hc, &deps)?,
            policy: watch::Sender::new(hc.retry().over(&c.retry)),
            gate: gate(name, format!("handler {name}"), outage),
        });
    }
    let dead_letter_gate = gate(
        "-",
        "dead-letter producer".to_owned(),
        dead_letter_policy(&c.outage),
    );
    let router = Router::new(&c.routes, |name| {
        handlers.iter().position(|h| h.name == name)
    })
    .map_err(StartError::UnknownHandler)?;
    let mut client = ClientConfig::new();
    client
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Every partition has a queue of its own, and these bound each one: a partition
        // whose handler lags is not fetched beyond `refill_below` messages or 1 MiB, plus
        // one fetch of at most 256 KiB (librdkafka's defaults, 100,000 messages and 64 MiB,
        // are meant for one queue shared by all partitions).
        .set("queued.min.messages", refill_below(config, c).to_string())
        .set("queued.max.messages.kbytes", "1024")
        .set("max.partition.fetch.bytes", "262144")
        // A full queue postpones its partition's next fetch by this much; librdkafka's 1 s
        // would leave a fast handler idle once it emptied a queue this small.
        .set("fetch.queue.backoff.ms", "10");
    for (key, value) in config.kafka.consumer_properties() {
        client.set(key, value.to_string());
    }
    client
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &c.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let strategy = client
        .get("partition.assignment.strategy")
        .map(str::to_owned);
    let leave_first = close::Within::leaves_first(
        client.get("group.instance.id"),
        client.get("group.protocol"),
    );
    let consumer: StreamConsumer<Context> = client
        .create_with_context(Context::new(metrics.clone(), strategy.as_deref()))
        .map_err(StartError::Client)?;
    let topics: Vec<&str> = c.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(StartError::Subscribe)?;
    let consumer = Arc::new(consumer);
    consumer.context().attach(&consumer);
    let shared = Arc::new(Shared {
        consumer,
        router,
        handlers,
        dead_letters: DeadLetters::new(
            producer,
            &c.dead_letter_topic,
            c.dead_letter_headers,
            &c.group_id,
        ),
        dead_letter_gate,
        unrouted: c.unrouted,
        permits: Semaphore::new(c.max_in_flight),
        window: Window {
            ordering: c.ordering,
            max_pending: c.max_pending_per_partition,
            max_bytes: c.max_pending_bytes_per_partition,
            max_metadata: c.offset_metadata_max_bytes,
        },
        metrics,
    });
    tracing::info!(group = %c.group_id, topics = ?c.topics, "consumer subscribed");
    let heartbeat = services.liveness.register("consumer dispatcher");
    let dispatcher = Dispatcher::new(
        shared.clone(),
        services.shutdown.clone(),
        services.liveness.clone(),
    );
    let stop = Stop {
        calls: budget.consumer_calls(),
        close: close::Within {
            leave_by: budget.consumer_leave_by(),
            close_by: budget.consumer_close_by(),
            leave_first,
        },
    };
    let task = tokio::spawn(dispatcher.run(services.shutdown.clone(), stop, heartbeat));
    Ok(Some((
        task,
        Handle {
            shared: Arc::downgrade(&shared),
        },
    )))
}

/// Why the consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A handler cannot be built from its configuration.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// A route names a handler that is not configured.
    #[error("consumer.routes: no handler named `{0}`")]
    UnknownHandler(String),
    /// librdkafka could not create the consumer client.
    #[error("kafka consumer could not be created")]
    Client(#[source] rdkafka::error::KafkaError),
    /// librdkafka refused the subscription to `consumer.topics`.
    #[error("consumer.topics: subscription refused")]
    Subscribe(#[source] rdkafka::error::KafkaError),
}

impl StartError {
    /// What kind of failure it is.
    pub fn class(&self) -> crate::exit::ExitClass {
        match self {
            StartError::Handler(_) | StartError::UnknownHandler(_) => {
                crate::exit::ExitClass::Config
            }
            StartError::Client(_) | StartError::Subscribe(_) => crate::exit::ExitClass::Failure,
        }
    }
}

/// Reaches into a running consumer to apply a reload.
pub struct Handle {
    /// Weak: the consumer closes when its dispatcher ends, while the broker (possibly the
    /// embedded one) is still there, not when the last reload handle goes.
    shared: std::sync::Weak<Shared>,
}

impl Handle {
    /// Applies retry and outage policies, http headers and timeouts and command timeouts from
    /// `config` to the handlers that exist in it with the same kind.
    pub fn reconfigure(&self, config: &Config) -> Result<(), HandlerError> {
        let (Some(c), Some(shared)) = (&config.consumer, self.shared.upgrade()) else {
            return Ok(());
        };
        for h in &shared.handlers {
            let Some(hc) = config.handlers.get(&h.name) else {
                continue;
            };
            h.handler.reconfigure(hc).map_err(|source| HandlerError {
                name: h.name.clone(),
                source,
            })?;
            h.policy.send_replace(hc.retry().over(&c.retry));
            h.gate.set_policy(hc.outage().over(&c.outage));
        }
        shared
            .dead_letter_gate
            .set_policy(dead_letter_policy(&c.outage));
        Ok(())
    }
}

/// The dead-letter producer's outage policy: `[consumer.outage]`, down at its first
/// failure. Kafka refusing one dead letter is answered apart; any other failure to produce
/// is Kafka out of reach, for every dead letter alike.
fn dead_letter_policy(consumer: &OutagePolicy) -> OutagePolicy {
    OutagePolicy {
        failures: 1,
        keys: 1,
        ..consumer.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(handlers: &[(&str, &str)]) -> Config {
        let mut toml = String::from(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[consumer]\ngroup_id = \"g\"\ntopics = [\"t\"]\n",
        );
        for (name, _) in handlers {
            toml += &format!("[[consumer.routes]]\ntopic = \"t\"\nhandler = \"{name}\"\n");
        }
        for (name, kind) in handlers {
            toml += &format!("[handlers.{name}]\n{kind}\n");
        }
        toml::from_str(&toml).unwrap()
    }

    fn refill(handlers: &[(&str, &str)]) -> u32 {
        let config = config(handlers);
        refill_below(&config, config.consumer.as_ref().unwrap())
    }

    #[test]
    fn partitions_refill_below_500_unless_a_route_leads_to_a_log_handler() {
        let http = ("web", "kind = \"http\"\nurl = \"http://127.0.0.1:1/\"");
        let log = ("trace", "kind = \"log\"");
        let command = ("run", "kind = \"command\"\nprogram = \"/bin/true\"");
        let forward = ("fwd", "kind = \"kafka\"\ntopic = \"other\"");
        assert_eq!(refill(&[http]), 500);
        assert_eq!(refill(&[http, command, forward]), 500);
        assert_eq!(refill(&[http, log]), 2000);
        assert_eq!(refill(&[log]), 2000);
        assert_eq!(refill(&[]), 2000);
    }
}
