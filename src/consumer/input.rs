//! Where a partition's worker reads its messages: the partition's own queue, or the
//! messages the dispatcher forwards when the partition has none. Messages come in batches
//! of what is already waiting, so a fast handler pays one wake-up per batch.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use super::context::PartitionQueue;
use crate::handlers::Received;

/// A worker's message source.
pub struct Input {
    /// The partition's topic, shared by its messages.
    pub topic: Arc<str>,
    /// The partition's own queue (None if it could not be split off).
    pub queue: Option<Arc<PartitionQueue>>,
    /// Messages of the partition that arrived on the consumer's main queue instead.
    pub strays: mpsc::Receiver<Received>,
}

impl Input {
    /// Waits for the next message, then adds it and those already waiting behind it to
    /// `batch`, until it holds `max`; each with its headers if `headers()` says so as it
    /// is taken (see [`Received::detach`]). Cancel-safe: a message is taken off a queue
    /// only when it is added.
    pub async fn next_batch(
        &mut self,
        batch: &mut Vec<Received>,
        max: usize,
        headers: &impl Fn() -> bool,
    ) {
        batch.push(self.next(headers).await);
        while batch.len() < max {
            match self.strays.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let Some(queue) = self.queue.as_deref() else {
            return;
        };
        // One stream for the whole batch: each one registers a waker slot.
        let mut stream = queue.stream();
        while batch.len() < max {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(Received::detach(&m, &self.topic, headers())),
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, "kafka consumer error on a partition queue");
                    return;
                }
                Some(None) | None => return,
            }
        }
    }

    /// The next message, waiting as long as it takes.
    async fn next(&mut self, headers: &impl Fn() -> bool) -> Received {
        loop {
            let received = tokio::select! {
                biased;
                Some(m) = self.strays.recv() => return m,
                m = recv(self.queue.as_deref(), &self.topic, headers) => m,
            };
            match received {
                Ok(m) => return m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error on a partition queue");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn recv(
    queue: Option<&PartitionQueue>,
    topic: &Arc<str>,
    headers: &impl Fn() -> bool,
) -> Result<Received, KafkaError> {
    match queue {
        Some(q) => q
            .recv()
            .await
            .map(|m| Received::detach(&m, topic, headers())),
        None => std::future::pending().await,
    }
}
