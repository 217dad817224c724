//! The consumer's librdkafka context: gives every assigned partition a queue of its own
//! (before librdkafka starts fetching it), commits the workers' offsets on revoke, records
//! assignment changes for the dispatcher, and turns statistics into the lag gauge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use tokio::sync::Notify;

use super::commits::{commit, Commits};
use crate::metrics::Metrics;

/// One partition's own message queue. librdkafka stops fetching the partition while it
/// holds `queued.min.messages` or `queued.max.messages.kbytes`, so a lagging handler holds
/// back only its partition and memory stays bounded per partition, without pausing and
/// refetching.
pub type PartitionQueue = StreamPartitionQueue<Context>;

/// A change of the assignment, in the order librdkafka reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The partition is now this member's.
    Assigned,
    /// The partition was taken away.
    Revoked,
}

/// Shared between librdkafka's callbacks and the dispatcher.
pub struct Context {
    changes: Mutex<Vec<(Change, String, i32)>>,
    metrics: Arc<Metrics>,
    /// The consumer this context belongs to, to split partition queues off it.
    consumer: OnceLock<Weak<StreamConsumer<Context>>>,
    /// Each partition's queue, made at its first assignment and kept: librdkafka keeps
    /// the partition split off, and a queue's handle must outlive every worker reading it.
    queues: Mutex<HashMap<(String, i32), Arc<PartitionQueue>>>,
    /// Signalled when the assignment changed, so the dispatcher starts and retires workers
    /// at once even if no message arrives.
    pub changed: Notify,
    /// Every assigned partition's offset to commit.
    pub commits: Commits,
    /// The group's assignment is incremental (`partition.assignment.strategy` names the
    /// cooperative-sticky assignor), decided from the configuration once.
    cooperative: bool,
    /// The consumer is leaving the group at shutdown: no worker reads a partition any
    /// more.
    leaving: AtomicBool,
}

impl Context {
    /// A context reporting into `metrics`, for a consumer whose
    /// `partition.assignment.strategy` is `strategy` (librdkafka's default when `None`).
    pub fn new(metrics: Arc<Metrics>, strategy: Option<&str>) -> Self {
        Context {
            changes: Mutex::new(Vec::new()),
            metrics,
            consumer: OnceLock::new(),
            queues: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            commits: Commits::default(),
            cooperative: strategy.is_some_and(|s| s.contains("cooperative")),
            leaving: AtomicBool::new(false),
        }
    }

    /// From now on partitions assigned get no queue of their own: the consumer is
    /// leaving the group, and no worker will read them.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
    }

    /// Tells the context its consumer; before the first poll.
    pub fn attach(&self, consumer: &Arc<StreamConsumer<Context>>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    /// Assignment changes since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<(Change, String, i32)> {
        std::mem::take(&mut *self.changes.lock().expect("changes lock poisoned"))
    }

    /// The partition's own queue; None if it could not be split off (its messages then
    /// arrive on the consumer's main queue).
    pub fn queue(&self, topic: &str, partition: i32) -> Option<Arc<PartitionQueue>> {
        let queues = self.queues.lock().expect("queues lock poisoned");
        queues.get(&(topic.to_owned(), partition)).cloned()
    }

    /// Drops every partition queue (each holds the consumer): at shutdown, once no worker
    /// reads them.
    pub fn release_queues(&self) {
        self.queues.lock().expect("queues lock poisoned").clear();
    }

    fn split(&self, topic: &str, partition: i32) {
        let mut queues = self.queues.lock().expect("queues lock poisoned");
        let key = (topic.to_owned(), partition);
        if queues.contains_key(&key) {
            return;
        }
        let consumer = self.consumer.get().and_then(Weak::upgrade);
        match consumer.and_then(|c| c.split_partition_queue(topic, partition)) {
            Some(queue) => {
                queues.insert(key, Arc::new(queue));
            }
            None => tracing::error!(
                topic,
                partition,
                "could not give the partition a queue of its own; its messages come through the consumer's queue"
            ),
        }
    }

    fn record(&self, change: Change, topic: &str, partition: i32) {
        let mut changes = self.changes.lock().expect("changes lock poisoned");
        changes.push((change, topic.to_owned(), partition));
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    /// As rdkafka's own, without asking librdkafka for the rebalance protocol: that
    /// question waits, with no time limit, for the group's thread, which no longer answers
    /// once the consumer is closing, and the close that revokes the partitions then never
    /// ends (seen as a stop that hung after a rebalance).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => {
                tracing::warn!(error = ?err, "rebalance failed");
                Rebalance::Error(rdkafka::error::KafkaError::Rebalance(err.into()))
            }
        };
        if consumer.closed() {
            // A rebalance delivered after the group handle terminated: librdkafka drops
            // an assignment call or a commit then without an answer, and either would
            // wait for one forever.
            tracing::debug!("rebalance after the consumer closed; nothing to assign");
            return;
        }
        self.pre_rebalance(consumer, &rebalance);
        let client = rdkafka::consumer::Consumer::client(consumer).native_ptr();
        // SAFETY: the client pointer is the live consumer's, and `tpl` is the list
        // librdkafka handed to this callback.
        unsafe {
            match (err, self.cooperative) {
                (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, true) => {
                    rdkafka::bindings::rd_kafka_incremental_assign(client, tpl.ptr());
                }
                (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, false) => {
                    rdkafka::bindings::rd_kafka_assign(client, tpl.ptr());
                }
                (_, true) => {
                    rdkafka::bindings::rd_kafka_incremental_unassign(client, tpl.ptr());
                }
                (_, false) => {
                    rdkafka::bindings::rd_kafka_assign(client, std::ptr::null());
                }
            }
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                // What the workers published so far: commit it before the partitions move
                // to another member, and take no later publication of theirs. The commit
                // is synchronous, so the next owner reads it: it handles nothing that was
                // final here. (This blocks the dispatcher for one round trip to the group
                // coordinator, during a rebalance only.)
                let last = self.commits.close(tpl);
                // Leaving, the drain has committed already: this only repeats it (or
                // retries one the coordinator refused), and must not block the leave.
                let mode = if self.leaving.load(Ordering::Relaxed) {
                    CommitMode::Async
                } else {
                    CommitMode::Sync
                };
                if let Err(e) = commit(consumer, &last, mode) {
                    tracing::info!(error = %e, "commit on revoke failed; the next owner handles the messages final since the last commit again");
                }
                for e in tpl.elements() {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition revoked"
                    );
                    self.metrics
                        .consumer_assigned_partitions
                        .with_label_values(&[e.topic()])
                        .dec();
                    self.record(Change::Revoked, e.topic(), e.partition());
                }
            }
            // Split before librdkafka starts fetching: a queue split off by the
            // application stays split, so no message of the partition reaches the
            // consumer's main queue.
            Rebalance::Assign(tpl) if !self.leaving.load(Ordering::Relaxed) => {
                for e in tpl.elements() {
                    self.split(e.topic(), e.partition());
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(_) => {}
        }
        self.changed.notify_one();
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit failed; retried at the next interval");
            self.commits.failed(offsets);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            for e in tpl.elements() {
                tracing::info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "partition assigned"
                );
                self.metrics
                    .consumer_assigned_partitions
                    .with_label_values(&[e.topic()])
                    .inc();
                self.record(Change::Assigned, e.topic(), e.partition());
            }
            self.changed.notify_one();
        }
    }
}
