//! The consumer's librdkafka context: on revoke, commits stored offsets and records the
//! revoked partitions for the dispatcher; turns statistics into the lag gauge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Statistics};

use crate::metrics::Metrics;

/// Shared between librdkafka's callbacks and the dispatcher.
pub struct Context {
    revoked: Mutex<Vec<(String, i32)>>,
    dirty: AtomicBool,
    metrics: Arc<Metrics>,
    /// Signalled when partitions were revoked, so the dispatcher retires their workers
    /// at once even if no message arrives.
    pub revoked_signal: Notify,
}

impl Context {
    /// A context reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Context {
            revoked: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            metrics,
            revoked_signal: Notify::new(),
        }
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.revoked.lock().expect("revoked lock poisoned"))
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Offsets stored so far belong to finished messages: commit them before the
            // partitions move to another member.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
                tracing::debug!(error = %e, "commit on revoke");
            }
            let mut revoked = self.revoked.lock().expect("revoked lock poisoned");
            for e in tpl.elements() {
                tracing::info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "partition revoked"
                );
                revoked.push((e.topic().to_owned(), e.partition()));
            }
            self.dirty.store(true, Ordering::Release);
            self.revoked_signal.notify_one();
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
            }
        }
    }
}
