//! One partition's worker: handles its messages strictly in order, retries with the
//! handler's policy, dead-letters what fails for good, and stores each offset only once
//! the message's outcome is final.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::context::{Context, PartitionQueue};
use super::dead_letter::{DeadLetters, Failure};
use super::retry::{Next, Retrier};
use super::routing::{Router, TopicRoutes};
use crate::config::{RetryPolicy, Unrouted};
use crate::handlers::{ErrorClass, Event, Handler, Outcome};
use crate::metrics::Metrics;

/// A configured handler with its name and effective retry policy.
pub struct NamedHandler {
    /// `[handlers.NAME]`
    pub name: String,
    /// The handler.
    pub handler: Handler,
    /// `[consumer.retry]` with the handler's overrides applied; a reload may change it.
    pub policy: RwLock<RetryPolicy>,
}

/// What every worker shares.
pub struct Shared {
    /// The consumer, for storing offsets.
    pub consumer: Arc<StreamConsumer<Context>>,
    /// Message -> handler slot.
    pub router: Router,
    /// Handler slots.
    pub handlers: Vec<NamedHandler>,
    /// Dead-letter producer.
    pub dead_letters: DeadLetters,
    /// Policy for unrouted messages.
    pub unrouted: Unrouted,
    /// `max_in_flight` permits, held during a handler call.
    pub permits: Semaphore,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Where a worker's messages come from.
pub struct Input {
    /// The partition's own queue (None if it could not be split off).
    pub queue: Option<Arc<PartitionQueue>>,
    /// Messages of the partition that arrived on the consumer's main queue instead.
    pub strays: mpsc::Receiver<OwnedMessage>,
}

impl Input {
    /// The next message, waiting as long as it takes.
    async fn next(&mut self) -> OwnedMessage {
        loop {
            let received = tokio::select! {
                biased;
                Some(m) = self.strays.recv() => return m,
                m = recv(self.queue.as_deref()) => m,
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

async fn recv(queue: Option<&PartitionQueue>) -> Result<OwnedMessage, rdkafka::error::KafkaError> {
    match queue {
        Some(q) => q.recv().await.map(|m| m.detach()),
        None => std::future::pending().await,
    }
}

/// One handler's metrics, as one worker reports them: resolved once, because looking a
/// labelled metric up hashes its labels, which costs more than a fast handler's call.
struct Meters {
    in_flight: IntGauge,
    seconds: Histogram,
    done: IntCounter,
}

/// What a worker resolves once for its topic: the routes whose glob matches it, and each
/// handler's metrics (on first use).
struct Local {
    routes: TopicRoutes,
    meters: Vec<Option<Meters>>,
}

impl Local {
    fn new(s: &Shared, topic: &str) -> Self {
        Local {
            routes: s.router.for_topic(topic),
            meters: s.handlers.iter().map(|_| None).collect(),
        }
    }

    fn meters(&mut self, s: &Shared, slot: usize, topic: &str) -> &Meters {
        self.meters[slot].get_or_insert_with(|| {
            let name = s.handlers[slot].name.as_str();
            Meters {
                in_flight: s.metrics.consumer_in_flight.with_label_values(&[name]),
                seconds: s
                    .metrics
                    .consumer_handler_seconds
                    .with_label_values(&[name]),
                done: s
                    .metrics
                    .consumer_messages_total
                    .with_label_values(&[topic, name, "done"]),
            }
        })
    }
}

/// Runs the worker of `topic`'s partition until `stop` (after the message in flight).
/// Starts only once `previous` (a retired worker of the same partition) has finished.
pub async fn run(
    shared: Arc<Shared>,
    topic: String,
    mut input: Input,
    stop: CancellationToken,
    previous: Option<JoinHandle<()>>,
) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let mut local = Local::new(&shared, &topic);
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            m = input.next() => m,
        };
        let event = Event { message };
        if !process(&shared, &mut local, &event, &stop).await {
            return;
        }
        let m = &event.message;
        if let Err(e) = shared
            .consumer
            .store_offset(m.topic(), m.partition(), m.offset())
        {
            // The partition was revoked meanwhile: its new owner handles it again.
            tracing::debug!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "offset not stored");
        }
    }
}

/// Handles one message to a final outcome. False when stopped before that (the offset
/// must not move; the message is delivered again later).
async fn process(s: &Shared, local: &mut Local, event: &Event, stop: &CancellationToken) -> bool {
    let m = &event.message;
    let Some(slot) = local.routes.route(event.event_type()) else {
        return unrouted(s, event, stop).await;
    };
    let h = &s.handlers[slot];
    let meters = local.meters(s, slot, m.topic());
    let policy = h.policy.read().expect("policy lock poisoned").clone();
    let mut retrier = Retrier::new(&policy);
    loop {
        let attempt = retrier.attempt();
        let outcome = {
            let _permit = s
                .permits
                .acquire()
                .await
                .expect("semaphore is never closed");
            meters.in_flight.inc();
            let started = Instant::now();
            let outcome = h.handler.handle(event, attempt).await;
            meters.in_flight.dec();
            meters.seconds.observe(started.elapsed().as_secs_f64());
            outcome
        };
        let (class, error) = match outcome {
            Outcome::Done => {
                meters.done.inc();
                return true;
            }
            Outcome::DeadLetter(class, error) => (class, error),
            Outcome::Retry(error) => match retrier.next() {
                Next::GiveUp => (ErrorClass::RetryableExhausted, error),
                Next::RetryAfter(pause) => {
                    tracing::warn!(
                        topic = m.topic(), partition = m.partition(), offset = m.offset(),
                        handler = %h.name, attempt, ?pause, %error,
                        "handler failed; retrying"
                    );
                    s.metrics
                        .consumer_retries_total
                        .with_label_values(&[&h.name])
                        .inc();
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        let failure = Failure {
            handler: &h.name,
            attempts: retrier.attempts(),
            class,
            message: &error,
        };
        return dead_letter(s, event, &failure, stop).await;
    }
}

async fn unrouted(s: &Shared, event: &Event, stop: &CancellationToken) -> bool {
    let m = &event.message;
    match s.unrouted {
        Unrouted::Skip => {
            tracing::info!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                event_type = event.event_type().unwrap_or_default(),
                "no route matches; skipped"
            );
            s.metrics
                .consumer_messages_total
                .with_label_values(&[m.topic(), "-", "skipped"])
                .inc();
            true
        }
        Unrouted::DeadLetter => {
            let failure = Failure {
                handler: "-",
                attempts: 0,
                class: ErrorClass::Unrouted,
                message: "no route matches this message",
            };
            dead_letter(s, event, &failure, stop).await
        }
        Unrouted::Fail => {
            tracing::error!(
                topic = m.topic(), partition = m.partition(), offset = m.offset(),
                event_type = event.event_type().unwrap_or_default(),
                "no route matches and consumer.unrouted = \"fail\": this partition stops here until outboxd restarts with a route for it"
            );
            stop.cancelled().await;
            false
        }
    }
}

/// Produces the dead letter, retrying with backoff until Kafka acknowledges it; the
/// partition waits meanwhile. False if stopped first.
async fn dead_letter(
    s: &Shared,
    event: &Event,
    failure: &Failure<'_>,
    stop: &CancellationToken,
) -> bool {
    let m = &event.message;
    let mut retry = crate::backoff::exponential();
    loop {
        match s.dead_letters.send(m, failure).await {
            Ok(()) => {
                tracing::warn!(
                    topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    handler = failure.handler, attempts = failure.attempts,
                    class = failure.class.as_str(), error = failure.message,
                    dead_letter_topic = %s.dead_letters.topic_for(m.topic()),
                    "message dead-lettered"
                );
                s.metrics
                    .consumer_dead_letter_total
                    .with_label_values(&[m.topic(), failure.class.as_str()])
                    .inc();
                s.metrics
                    .consumer_messages_total
                    .with_label_values(&[m.topic(), failure.handler, "dead_letter"])
                    .inc();
                return true;
            }
            Err(e) => {
                let pause = retry.next().unwrap_or_default();
                tracing::error!(
                    topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    error = %e, ?pause,
                    "cannot produce the dead letter; the partition waits and retries"
                );
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}
