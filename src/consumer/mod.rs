//! The consumer half: reads the configured topics in a consumer group and hands every
//! message to its partition's worker, which delivers it to the routed handler.
//!
//! - this file: client setup and the dispatcher (polls the consumer's main queue for
//!   rebalances, statistics and errors; starts and retires one worker per assigned
//!   partition, which reads the partition's own queue; commits offsets);
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
mod gate;
mod input;
mod lanes;
mod offsets;
mod outage;
mod retry;
mod routing;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OutagePolicy};
use crate::handlers::{Handler, HandlerDeps, HandlerError, Received};
use crate::services::{DrainBudget, Services};
use crate::systemd::{Heartbeat, Liveness};
use context::{Change, Context};
use dead_letter::DeadLetters;
use delivery::{NamedHandler, Shared, Window};
use gate::Gate;
use routing::Router;

/// Messages that reached the consumer's main queue (only if a partition could not be
/// split off) and wait for their partition's worker.
const STRAYS: usize = 1024;

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
        // whose handler lags is not fetched beyond 2,000 messages or 1 MiB, plus one fetch
        // of at most 256 KiB (librdkafka's defaults, 100,000 messages and 64 MiB, are meant
        // for one queue shared by all partitions).
        .set("queued.min.messages", "2000")
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
    let static_member = client.get("group.instance.id").is_some();
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
            static_member,
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

struct Worker {
    strays: mpsc::Sender<Received>,
    /// Strays its channel had no room for, in order; its partition is paused meanwhile.
    overflow: std::collections::VecDeque<Received>,
    stop: CancellationToken,
    /// Resolves once the worker ended (its sender dropped), for a later worker of the same
    /// partition to wait on.
    ended: oneshot::Receiver<()>,
    /// The worker's turns, and their count when last read.
    turns: (Arc<worker::Turns>, u64),
    /// Beaten on the worker's behalf while its turns move (or it waits): silent only while
    /// one turn does not end.
    heartbeat: Heartbeat,
}

/// Pauses (or resumes) fetching `topic`/`partition`.
fn pause(consumer: &StreamConsumer<Context>, topic: &str, partition: i32, paused: bool) {
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let done = if paused {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = done {
        tracing::warn!(topic, partition, paused, error = %e, "cannot pause or resume the partition");
    }
}

/// Per topic, per partition.
type ByPartition<T> = HashMap<String, HashMap<i32, T>>;

/// How the consumer stops.
struct Stop {
    /// How long calls in flight may still run.
    calls: Duration,
    /// Leaving the group and closing the client after that.
    close: close::Within,
}

struct Dispatcher {
    shared: Arc<Shared>,
    workers: ByPartition<Worker>,
    /// How workers of revoked partitions still finishing their message in flight tell that
    /// they ended.
    retiring: ByPartition<oneshot::Receiver<()>>,
    /// Every worker task: their ends are observed here.
    tasks: JoinSet<()>,
    /// The daemon's shutdown: each worker's stop is a child of it.
    shutdown: CancellationToken,
    /// Where each worker's heartbeat registers.
    liveness: Arc<Liveness>,
    /// What a worker panicked with: passed on once the rest drained.
    panic: Option<Panic>,
}

impl Dispatcher {
    fn new(shared: Arc<Shared>, shutdown: CancellationToken, liveness: Arc<Liveness>) -> Self {
        Dispatcher {
            shared,
            workers: HashMap::new(),
            retiring: HashMap::new(),
            tasks: JoinSet::new(),
            shutdown,
            liveness,
            panic: None,
        }
    }

    async fn run(mut self, shutdown: CancellationToken, stop: Stop, heartbeat: Heartbeat) {
        let shared = self.shared.clone();
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        let mut commit = tokio::time::interval(commits::INTERVAL);
        loop {
            // The main queue carries rebalances, statistics and errors (messages come
            // through each partition's own queue); polling it never waits for a handler.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = beat.tick() => {
                    heartbeat.beat();
                    self.beat_for_workers();
                }
                _ = commit.tick() => {
                    self.hand_on_overflow();
                    self.commit(false, CommitMode::Async);
                }
                _ = shared.consumer.context().changed.notified() => self.apply_changes(),
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    // A worker ends only when stopped; a panic loses the messages it took
                    // off its partition's queue, which only a restart from the committed
                    // offsets hands out again: the consumer stops, and so the process.
                    if let Some(panic) = self.panicked(joined) {
                        tracing::error!("a partition worker panicked: the consumer stops, and outboxd with it (exit code 70), so that a restart hands its messages out again from the committed offsets");
                        self.panic = Some(panic);
                        break;
                    }
                }
                received = shared.consumer.recv() => {
                    self.apply_changes();
                    match received {
                        Ok(m) => self.stray(Received::detach(&m, &Arc::from(m.topic()))),
                        Err(e) => {
                            tracing::warn!(error = %e, "kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
        let stopped = tokio::time::Instant::now();
        let consumer = shared.consumer.clone();
        drop(shared);
        let panic = self.drain(stop.calls).await;
        close::close(consumer, stopped, &stop.close).await;
        if let Some(panic) = panic {
            // The consumer's task ends as the worker did: the daemon exits non-zero.
            std::panic::resume_unwind(panic);
        }
    }

    /// Beats for each worker whose loop is not stuck inside one turn.
    fn beat_for_workers(&mut self) {
        for worker in self.workers.values_mut().flat_map(HashMap::values_mut) {
            let (turns, seen) = &mut worker.turns;
            if turns.moving(seen) {
                worker.heartbeat.beat();
            }
        }
    }

    /// A worker task joined: what it panicked with, counted, if it did.
    fn panicked(&self, joined: Result<(), tokio::task::JoinError>) -> Option<Panic> {
        let panic = joined.err()?.try_into_panic().ok()?;
        self.shared
            .metrics
            .task_panics_total
            .with_label_values(&["partition worker"])
            .inc();
        Some(panic)
    }

    /// Commits the offsets the workers published since the last commit (all of them with
    /// `all`).
    fn commit(&self, all: bool, mode: CommitMode) {
        let (tpl, overflowed) = self.shared.consumer.context().commits.take(all);
        for topic in overflowed {
            self.shared
                .metrics
                .consumer_offset_metadata_overflow_total
                .with_label_values(&[&topic])
                .inc();
        }
        if let Err(e) = commits::commit(self.shared.consumer.as_ref(), &tpl, mode) {
            tracing::debug!(error = %e, "offset commit failed; retried at the next interval");
            self.shared.consumer.context().commits.failed(&tpl);
        }
    }

    /// Starts a worker for every newly assigned partition and retires the workers of
    /// revoked ones, in the order librdkafka reported the changes.
    fn apply_changes(&mut self) {
        for (change, topic, partition) in self.shared.consumer.context().take_changes() {
            match change {
                Change::Assigned => self.start_worker(&topic, partition),
                Change::Revoked => self.retire(topic, partition),
            }
        }
    }

    /// A message that came through the main queue: its partition has no queue of its own,
    /// so its worker reads these (all of the partition's messages, in order).
    ///
    /// Never waits for the worker: a message its channel has no room for waits in the
    /// worker's overflow, in order, with the partition paused at librdkafka until the
    /// overflow is handed on (at the next commit tick or later).
    fn stray(&mut self, m: Received) {
        let (topic, partition) = (m.topic().to_owned(), m.partition());
        self.start_worker(&topic, partition);
        let consumer = self.shared.consumer.clone();
        let worker = self
            .workers
            .get_mut(&topic)
            .and_then(|t| t.get_mut(&partition))
            .expect("started above");
        if !worker.overflow.is_empty() {
            worker.overflow.push_back(m);
            return;
        }
        match worker.strays.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(
                    topic,
                    partition,
                    "worker gone; the next owner reads the message again"
                );
            }
            Err(mpsc::error::TrySendError::Full(m)) => {
                worker.overflow.push_back(m);
                pause(&consumer, &topic, partition, true);
            }
        }
    }

    /// Hands what waits in the workers' overflows on as far as their channels take it,
    /// resuming the partitions whose overflow emptied.
    fn hand_on_overflow(&mut self) {
        let consumer = self.shared.consumer.clone();
        for (topic, partitions) in &mut self.workers {
            for (partition, worker) in partitions {
                if worker.overflow.is_empty() {
                    continue;
                }
                while let Some(m) = worker.overflow.pop_front() {
                    if let Err(e) = worker.strays.try_send(m) {
                        match e {
                            mpsc::error::TrySendError::Full(m) => worker.overflow.push_front(m),
                            mpsc::error::TrySendError::Closed(_) => worker.overflow.clear(),
                        }
                        break;
                    }
                }
                if worker.overflow.is_empty() {
                    pause(&consumer, topic, *partition, false);
                }
            }
        }
    }

    fn start_worker(&mut self, topic: &str, partition: i32) {
        if self
            .workers
            .get(topic)
            .is_some_and(|t| t.contains_key(&partition))
        {
            return;
        }
        // librdkafka keeps a pause across a revoke and a new assignment: a partition paused
        // for an earlier worker's overflow is fetched again.
        pause(&self.shared.consumer, topic, partition, false);
        let (strays, receiver) = mpsc::channel(STRAYS);
        let stop = self.shutdown.child_token();
        let (ending, ended) = oneshot::channel::<()>();
        let previous = self
            .retiring
            .get_mut(topic)
            .and_then(|t| t.remove(&partition));
        let input = input::Input {
            topic: Arc::from(topic),
            queue: self.shared.consumer.context().queue(topic, partition),
            strays: receiver,
        };
        let at = worker::Assignment {
            topic: topic.to_owned(),
            partition,
            generation: self
                .shared
                .consumer
                .context()
                .commits
                .open(topic, partition),
        };
        let turns = Arc::new(worker::Turns::default());
        let heartbeat = self
            .liveness
            .register(format!("consumer worker {topic}/{partition}"));
        let run = worker::run(
            self.shared.clone(),
            at,
            input,
            stop.clone(),
            previous,
            turns.clone(),
        );
        self.tasks.spawn(async move {
            // Dropped when the worker ends, a panic included.
            let _ending = ending;
            run.await
        });
        self.workers.entry(topic.to_owned()).or_default().insert(
            partition,
            Worker {
                strays,
                overflow: Default::default(),
                stop,
                ended,
                turns: (turns, 0),
                heartbeat,
            },
        );
    }

    /// Stops the worker of a partition revoked by a rebalance after its message in
    /// flight: nothing past the committed offset is lost, the next owner fetches it.
    fn retire(&mut self, topic: String, partition: i32) {
        let Some(worker) = self
            .workers
            .get_mut(&topic)
            .and_then(|t| t.remove(&partition))
        else {
            return;
        };
        worker.stop.cancel();
        // A worker starts only once the one before it ended, so this one ending means
        // every older one of the partition has.
        self.retiring
            .entry(topic)
            .or_default()
            .insert(partition, worker.ended);
    }

    /// Workers finish their calls in flight (a message sleeping in backoff is left for
    /// the next start, its calls so far recorded), then every partition's offset and map
    /// are committed.
    async fn drain(mut self, deadline: Duration) -> Option<Panic> {
        for worker in self.workers.values().flat_map(HashMap::values) {
            worker.stop.cancel();
        }
        let mut panic = self.panic.take();
        let joined = tokio::time::timeout(deadline, async {
            while let Some(joined) = self.tasks.join_next().await {
                let panicked = self.panicked(joined);
                panic = panic.take().or(panicked);
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!("handler calls still running at the drain deadline were cut; their messages are delivered again after restart");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        let consumer = self.shared.consumer.clone();
        let (tpl, _) = consumer.context().commits.take(true);
        let committed = tokio::task::spawn_blocking(move || {
            commits::commit(consumer.as_ref(), &tpl, CommitMode::Sync)
        })
        .await;
        match committed {
            Ok(Ok(())) => tracing::info!("consumer offsets committed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "final offset commit failed; messages finished since the last commit are delivered again after restart")
            }
            Err(e) => tracing::warn!(error = %e, "final commit failed"),
        }
        self.shared.consumer.context().release_queues();
        panic
    }
}

/// What a task panicked with.
type Panic = Box<dyn std::any::Any + Send + 'static>;
