//! One partition's worker: handles its messages strictly in order, retries with the
//! handler's policy, dead-letters what fails for good, and stores each offset only once
//! the message's outcome is final.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::context::Context;
use super::dead_letter::{DeadLetters, Failure};
use super::input::Input;
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

/// Messages a worker takes from its queue at a time (fewer when fewer are waiting). Each
/// batch costs one wake-up, one `max_in_flight` permit (while its calls follow each other)
/// and one offset store, instead of one of each per message.
const BATCH: usize = 64;

/// Within a batch, a handled message's offset is stored at once when the last store is
/// this old (else at the end of the batch). It bounds what a rebalance makes the next
/// owner handle again beyond the messages in flight.
const STORE_EVERY: Duration = Duration::from_millis(10);

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
    let mut batch = Vec::with_capacity(BATCH);
    let mut stored_at = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = input.next_batch(&mut batch, BATCH) => {}
        }
        let mut turn = Turn::new();
        // Messages not handled when stopped are dropped unstored: the partition's next
        // owner, or this worker's successor after a restart, fetches them again.
        let mut unstored = None;
        for message in batch.drain(..) {
            if stop.is_cancelled() {
                break;
            }
            let event = Event { message };
            if !process(&shared, &mut local, &event, &stop, &mut turn).await {
                break;
            }
            // A batch of slow calls stores as it goes, so that its progress is committed.
            if turn.since.duration_since(stored_at) >= STORE_EVERY {
                store_offset(&shared, &event.message);
                stored_at = turn.since;
                unstored = None;
            } else {
                unstored = Some(event.message);
            }
        }
        let ended = turn.since;
        drop(turn);
        if let Some(m) = unstored {
            store_offset(&shared, &m);
            stored_at = ended;
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Stores `m`'s offset: it and every earlier message of its partition are final.
fn store_offset(s: &Shared, m: &OwnedMessage) {
    if let Err(e) = s
        .consumer
        .store_offset(m.topic(), m.partition(), m.offset())
    {
        // The partition was revoked meanwhile: its new owner handles it again.
        tracing::debug!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "offset not stored");
    }
}

/// A worker's right to call handlers while it works through a batch: the permit is kept
/// while calls follow each other and given back before any other wait (a retry's pause,
/// a dead letter's production), and the clock is read once per call: each call's time is
/// from the end of the previous one (or from taking the permit) to its own end.
struct Turn<'a> {
    permit: Option<SemaphorePermit<'a>>,
    since: Instant,
}

impl<'a> Turn<'a> {
    fn new() -> Self {
        Turn {
            permit: None,
            since: Instant::now(),
        }
    }

    /// Takes a permit unless one is held.
    async fn begin(&mut self, permits: &'a Semaphore) {
        if self.permit.is_none() {
            let permit = permits.acquire().await.expect("semaphore is never closed");
            self.permit = Some(permit);
            self.since = Instant::now();
        }
    }

    /// The time since the call began; the next call begins now.
    fn lap(&mut self) -> Duration {
        let now = Instant::now();
        let took = now - self.since;
        self.since = now;
        took
    }

    /// Gives the permit back before a wait that is not a handler call.
    fn pause(&mut self) {
        self.permit = None;
    }
}

/// Handles one message to a final outcome. False when stopped before that (the offset
/// must not move; the message is delivered again later).
async fn process<'a>(
    s: &'a Shared,
    local: &mut Local,
    event: &Event,
    stop: &CancellationToken,
    turn: &mut Turn<'a>,
) -> bool {
    let m = &event.message;
    let Some(slot) = local.routes.route(event.event_type()) else {
        if s.unrouted != Unrouted::Skip {
            turn.pause();
        }
        return unrouted(s, event, stop).await;
    };
    let h = &s.handlers[slot];
    let meters = local.meters(s, slot, m.topic());
    // Made at the first failure: a message handled at once needs no retry state.
    let mut retrier: Option<Retrier> = None;
    loop {
        let attempt = retrier.as_mut().map_or(1, Retrier::attempt);
        turn.begin(&s.permits).await;
        meters.in_flight.inc();
        let outcome = h.handler.handle(event, attempt).await;
        meters.in_flight.dec();
        let took = turn.lap();
        meters.seconds.observe(took.as_secs_f64());
        let (class, error) = match outcome {
            Outcome::Done => {
                meters.done.inc();
                return true;
            }
            Outcome::DeadLetter(class, error) => (class, error),
            Outcome::Retry(error) => {
                let retrier = retrier.get_or_insert_with(|| {
                    Retrier::new(&h.policy.read().expect("policy lock poisoned"), took)
                });
                match retrier.next() {
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
                        turn.pause();
                        tokio::select! {
                            _ = stop.cancelled() => return false,
                            _ = tokio::time::sleep(pause) => continue,
                        }
                    }
                }
            }
        };
        let failure = Failure {
            handler: &h.name,
            attempts: retrier.as_ref().map_or(1, Retrier::attempts),
            class,
            message: &error,
        };
        turn.pause();
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
            stopped(s, m, stop).await;
            false
        }
    }
}

/// Holds the partition at `m` until the worker stops, with the stopped gauge at 1
/// meanwhile. `m`'s offset is not stored: after a restart it is handled again.
async fn stopped(s: &Shared, m: &OwnedMessage, stop: &CancellationToken) {
    let gauge = s
        .metrics
        .consumer_partition_stopped
        .with_label_values(&[m.topic(), &m.partition().to_string()]);
    gauge.set(1);
    stop.cancelled().await;
    gauge.set(0);
}

/// Produces the dead letter, retrying with backoff until Kafka acknowledges it; the
/// partition waits meanwhile. A dead letter Kafka refuses for what it is (too large with
/// its context, say) is sent once more without the original value and headers; if Kafka
/// refuses that too, the partition stops until outboxd restarts. False if stopped first.
async fn dead_letter(
    s: &Shared,
    event: &Event,
    failure: &Failure<'_>,
    stop: &CancellationToken,
) -> bool {
    let m = &event.message;
    let mut retry = crate::backoff::exponential();
    let mut stripped: Option<String> = None;
    loop {
        match s.dead_letters.send(m, failure, stripped.as_deref()).await {
            Ok(()) => {
                tracing::warn!(
                    topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    handler = failure.handler, attempts = failure.attempts,
                    class = failure.class.as_str(), error = failure.message,
                    dead_letter_topic = %s.dead_letters.topic_for(m.topic()),
                    stripped = stripped.is_some(),
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
            Err(e) if crate::kafka::is_refusal(&e) && stripped.is_none() => {
                tracing::error!(
                    topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    error = %e,
                    "Kafka refuses the dead letter; sending it without the original value and headers"
                );
                stripped = Some(format!(
                    "the original value and headers were left out: Kafka refused them ({e})"
                ));
            }
            Err(e) if crate::kafka::is_refusal(&e) => {
                tracing::error!(
                    topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    error = %e, dead_letter_topic = %s.dead_letters.topic_for(m.topic()),
                    "Kafka refuses even the stripped dead letter: this partition stops here until outboxd restarts; the message stays on its topic, uncommitted"
                );
                stopped(s, m, stop).await;
                return false;
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
