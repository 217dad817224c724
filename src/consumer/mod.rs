//! The consumer half: reads the configured topics in a consumer group and hands every
//! message to its partition's worker, which delivers it to the routed handler.
//!
//! - this file: client setup and the dispatcher (polls the consumer, one queue per
//!   partition, pauses a partition whose queue is full so polling never stops);
//! - `worker`: one partition's in-order processing, retries, offset storing;
//! - `routing`, `retry`, `dead_letter`, `context` (rebalance and statistics callbacks).
//!
//! Offsets: `enable.auto.offset.store=false`; a worker stores a message's offset only
//! after its outcome is final; librdkafka commits stored offsets every second, on revoke
//! and at shutdown.

mod context;
mod dead_letter;
mod retry;
mod routing;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::handlers::{Handler, HandlerDeps};
use crate::systemd::Heartbeat;
use crate::Services;
use context::Context;
use dead_letter::DeadLetters;
use routing::Router;
use worker::{NamedHandler, Shared};

/// Messages a partition's worker queue holds.
const QUEUE: usize = 1024;

/// Messages that did not fit their worker's queue yet.
#[derive(Default)]
struct Waiting {
    messages: VecDeque<OwnedMessage>,
    bytes: usize,
    paused: bool,
}

impl Waiting {
    fn push_back(&mut self, m: OwnedMessage) {
        self.bytes += message_bytes(&m);
        self.messages.push_back(m);
    }

    fn pop_front(&mut self) -> Option<OwnedMessage> {
        let m = self.messages.pop_front()?;
        self.bytes -= message_bytes(&m);
        Some(m)
    }

    fn push_front(&mut self, m: OwnedMessage) {
        self.bytes += message_bytes(&m);
        self.messages.push_front(m);
    }
}

fn message_bytes(m: &OwnedMessage) -> usize {
    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len) + 64
}

/// Starts the consumer when `[consumer]` is configured, returning its task and a handle
/// for reloads. The task returns after `shutdown`
/// once workers finished their message in flight (or `drain` passed) and offsets were
/// committed.
pub fn start(
    config: &Config,
    bootstrap: &str,
    database: Option<crate::db::Database>,
    services: &Services,
    drain: Duration,
) -> Result<Option<(JoinHandle<()>, Handle)>, String> {
    let (producer, metrics) = (services.producer.clone(), services.metrics.clone());
    let Some(c) = &config.consumer else {
        return Ok(None);
    };
    let deps = HandlerDeps {
        database,
        producer: producer.clone(),
    };
    let mut handlers = Vec::new();
    for (name, hc) in &config.handlers {
        handlers.push(NamedHandler {
            name: name.clone(),
            handler: Handler::build(name, hc, &deps)?,
            policy: RwLock::new(hc.retry().over(&c.retry)),
        });
    }
    let router = Router::new(&c.routes, |name| {
        handlers
            .iter()
            .position(|h| h.name == name)
            .expect("validation checked that routes name configured handlers")
    });
    let mut client = ClientConfig::new();
    client
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "200")
        .set("statistics.interval.ms", "5000")
        // librdkafka prefetches up to 64 MiB by default; workers hold their own queues, so
        // a smaller prefetch keeps memory down without slowing dispatch.
        .set("queued.max.messages.kbytes", "16384");
    for (key, value) in &config.kafka.options {
        client.set(key, value.to_string());
    }
    client
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &c.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer<Context> = client
        .create_with_context(Context::new(metrics.clone()))
        .map_err(|e| format!("kafka consumer: {e}"))?;
    let topics: Vec<&str> = c.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| format!("consumer.topics: {e}"))?;
    let shared = Arc::new(Shared {
        consumer: Arc::new(consumer),
        router,
        handlers,
        dead_letters: DeadLetters::new(
            producer,
            &c.dead_letter_topic,
            c.dead_letter_headers,
            &c.group_id,
        ),
        unrouted: c.unrouted,
        permits: Semaphore::new(c.max_in_flight),
        metrics,
        space: Notify::new(),
    });
    tracing::info!(group = %c.group_id, topics = ?c.topics, "consumer subscribed");
    let heartbeat = services.liveness.register("consumer dispatcher");
    let task = tokio::spawn(
        Dispatcher::new(shared.clone(), c.partition_buffer_kib << 10).run(
            services.shutdown.clone(),
            drain,
            heartbeat,
        ),
    );
    Ok(Some((
        task,
        Handle {
            shared: Arc::downgrade(&shared),
        },
    )))
}

/// Reaches into a running consumer to apply a reload.
pub struct Handle {
    /// Weak: the consumer closes when its dispatcher ends, while the broker (possibly the
    /// embedded one) is still there, not when the last reload handle goes.
    shared: std::sync::Weak<Shared>,
}

impl Handle {
    /// Applies retry policies, http headers and timeouts and command timeouts from
    /// `config` to the handlers that exist in it with the same kind.
    pub fn reconfigure(&self, config: &Config) -> Result<(), String> {
        let (Some(c), Some(shared)) = (&config.consumer, self.shared.upgrade()) else {
            return Ok(());
        };
        for h in &shared.handlers {
            let Some(hc) = config.handlers.get(&h.name) else {
                continue;
            };
            h.handler
                .reconfigure(hc)
                .map_err(|e| format!("handlers.{}: {e}", h.name))?;
            *h.policy.write().expect("policy lock poisoned") = hc.retry().over(&c.retry);
        }
        Ok(())
    }
}

struct Worker {
    queue: mpsc::Sender<OwnedMessage>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Per topic, per partition.
type ByPartition<T> = HashMap<String, HashMap<i32, T>>;

struct Dispatcher {
    shared: Arc<Shared>,
    workers: ByPartition<Worker>,
    /// Messages waiting for room in a full queue; past `pause_bytes` their partition is
    /// paused until they are all queued. Pausing makes librdkafka drop what it prefetched
    /// for the partition and fetch it again on resume, from after the last message
    /// received here.
    pending: ByPartition<Waiting>,
    /// `consumer.partition_buffer_kib` in bytes.
    pause_bytes: usize,
    /// Workers of revoked partitions still finishing their message in flight.
    retiring: ByPartition<JoinHandle<()>>,
}

impl Dispatcher {
    fn new(shared: Arc<Shared>, pause_bytes: usize) -> Self {
        Dispatcher {
            shared,
            workers: HashMap::new(),
            pending: HashMap::new(),
            pause_bytes,
            retiring: HashMap::new(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken, drain: Duration, heartbeat: Heartbeat) {
        let shared = self.shared.clone();
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Not biased: a busy branch must not starve polling (rebalances, heartbeats
            // of max.poll.interval.ms) nor the flushing of waiting messages.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = beat.tick() => heartbeat.beat(),
                _ = shared.consumer.context().revoked_signal.notified() => self.retire_revoked(),
                _ = shared.space.notified(), if !self.pending.is_empty() => self.flush_pending(),
                received = shared.consumer.recv() => {
                    self.retire_revoked();
                    match received {
                        Ok(m) => self.dispatch(m.detach()),
                        Err(e) => {
                            tracing::warn!(error = %e, "kafka consumer error");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
        self.drain(drain).await;
    }

    fn dispatch(&mut self, m: OwnedMessage) {
        let (topic, partition) = (m.topic(), m.partition());
        if self
            .pending
            .get(topic)
            .is_some_and(|t| t.contains_key(&partition))
        {
            self.wait(m);
            return;
        }
        if !self
            .workers
            .get(topic)
            .is_some_and(|t| t.contains_key(&partition))
        {
            let worker = self.spawn_worker(topic, partition);
            self.workers
                .entry(topic.to_owned())
                .or_default()
                .insert(partition, worker);
        }
        let worker = &self.workers[topic][&partition];
        if let Err(e) = worker.queue.try_send(m) {
            let m = match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            self.wait(m);
        }
    }

    /// Parks `m` behind its partition's full queue, pausing the partition when too much
    /// is waiting.
    fn wait(&mut self, m: OwnedMessage) {
        let (topic, partition) = (m.topic().to_owned(), m.partition());
        let waiting = self
            .pending
            .entry(topic)
            .or_default()
            .entry(partition)
            .or_default();
        waiting.push_back(m);
        if waiting.bytes > self.pause_bytes && !waiting.paused {
            waiting.paused = true;
            let topic = waiting.messages[0].topic().to_owned();
            self.shared
                .metrics
                .consumer_paused_total
                .with_label_values(&[topic.as_str()])
                .inc();
            self.pause(&topic, partition, true);
        }
    }

    fn spawn_worker(&mut self, topic: &str, partition: i32) -> Worker {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let previous = self
            .retiring
            .get_mut(topic)
            .and_then(|t| t.remove(&partition));
        let task = tokio::spawn(worker::run(
            self.shared.clone(),
            receiver,
            stop.clone(),
            previous,
        ));
        Worker { queue, stop, task }
    }

    /// Moves waiting messages into queues that have room; resumes drained paused partitions.
    fn flush_pending(&mut self) {
        let mut resumed = Vec::new();
        for (topic, partitions) in &mut self.pending {
            for (partition, waiting) in partitions.iter_mut() {
                let Some(worker) = self.workers.get(topic).and_then(|t| t.get(partition)) else {
                    continue;
                };
                while let Some(m) = waiting.pop_front() {
                    if let Err(e) = worker.queue.try_send(m) {
                        let m = match e {
                            mpsc::error::TrySendError::Full(m)
                            | mpsc::error::TrySendError::Closed(m) => m,
                        };
                        waiting.push_front(m);
                        break;
                    }
                }
                if waiting.messages.is_empty() {
                    resumed.push((topic.clone(), *partition, waiting.paused));
                }
            }
        }
        for (topic, partition, paused) in resumed {
            if let Some(t) = self.pending.get_mut(&topic) {
                t.remove(&partition);
                if t.is_empty() {
                    self.pending.remove(&topic);
                }
            }
            if paused {
                self.pause(&topic, partition, false);
            }
        }
    }

    fn pause(&self, topic: &str, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Invalid)
            .is_err()
        {
            return;
        }
        let done = if pause {
            self.shared.consumer.pause(&tpl)
        } else {
            self.shared.consumer.resume(&tpl)
        };
        if let Err(e) = done {
            tracing::debug!(topic, partition, pause, error = %e, "pause/resume failed");
        }
    }

    /// Stops the workers of partitions revoked by a rebalance. Their queued messages are
    /// dropped: nothing past the committed offset is lost, the next owner fetches them.
    /// A paused partition is resumed: librdkafka keeps an application's pause across a
    /// revoke, so were it assigned here again it would never be fetched.
    fn retire_revoked(&mut self) {
        for (topic, partition) in self.shared.consumer.context().take_revoked() {
            let dropped = self
                .pending
                .get_mut(&topic)
                .and_then(|t| t.remove(&partition));
            if dropped.is_some_and(|w| w.paused) {
                self.pause(&topic, partition, false);
            }
            let Some(worker) = self
                .workers
                .get_mut(&topic)
                .and_then(|t| t.remove(&partition))
            else {
                continue;
            };
            worker.stop.cancel();
            let older = self
                .retiring
                .get_mut(&topic)
                .and_then(|t| t.remove(&partition));
            let task = worker.task;
            let retiring = tokio::spawn(async move {
                if let Some(older) = older {
                    let _ = older.await;
                }
                let _ = task.await;
            });
            self.retiring
                .entry(topic)
                .or_default()
                .insert(partition, retiring);
        }
        self.pending.retain(|_, t| !t.is_empty());
    }

    /// Workers finish their message in flight (a message sleeping in backoff is left for
    /// the next start), then stored offsets are committed.
    async fn drain(self, deadline: Duration) {
        let mut tasks = Vec::new();
        for (_, partitions) in self.workers {
            for (_, worker) in partitions {
                worker.stop.cancel();
                tasks.push(worker.task);
            }
        }
        tasks.extend(self.retiring.into_values().flat_map(HashMap::into_values));
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(deadline, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!("handler calls still running at the drain deadline were cut; their messages are delivered again after restart");
            aborts.iter().for_each(|a| a.abort());
        }
        let consumer = self.shared.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
        match committed {
            Ok(Ok(())) => tracing::info!("consumer offsets committed"),
            Ok(Err(e)) => tracing::debug!(error = %e, "final commit (nothing to commit?)"),
            Err(e) => tracing::warn!(error = %e, "final commit failed"),
        }
    }
}
