//! The dispatcher: polls the consumer's main queue (rebalances, statistics, errors, and
//! the messages of a partition that could not be split off), starts and retires one
//! worker per assigned partition, commits the offsets the workers publish, and at
//! shutdown drains the workers, commits, and leaves the group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::context::{Change, Context};
use super::delivery::Shared;
use super::{close, commits, input, worker};
use crate::handlers::Received;
use crate::systemd::{Heartbeat, Liveness};

/// Messages that reached the consumer's main queue (only if a partition could not be
/// split off) and wait for their partition's worker.
const STRAYS: usize = 1024;

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
pub(super) struct Stop {
    /// How long calls in flight may still run.
    pub calls: Duration,
    /// Leaving the group and closing the client after that.
    pub close: close::Within,
}

pub(super) struct Dispatcher {
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
    pub fn new(shared: Arc<Shared>, shutdown: CancellationToken, liveness: Arc<Liveness>) -> Self {
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

    pub async fn run(mut self, shutdown: CancellationToken, stop: Stop, heartbeat: Heartbeat) {
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
                        Ok(m) => self.stray(Received::detach(&m, &Arc::from(m.topic()), true)),
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
