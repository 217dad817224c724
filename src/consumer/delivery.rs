//! One message's delivery, step by step: a handler call (after its backoff pause, if it
//! is a retry), a dead letter produced until Kafka acknowledges it, or a hold until
//! shutdown. Each step is a future that owns its [`Job`] and hands it back with what
//! happened; the partition's worker decides the next step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus::{Histogram, IntCounter, IntGauge};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::context::Context;
use super::dead_letter::{DeadLetters, Failure};
use super::gate::{Admission, Gate};
use super::lanes::LaneId;
use super::outage::{self, Verdict};
use super::retry::Retrier;
use super::routing::{Router, TopicRoutes};
use crate::config::{Ordering, RetryPolicy, Unrouted};
use crate::handlers::{ErrorClass, Event, Handler, Outcome, Received};
use crate::metrics::Metrics;

/// A configured handler with its name, effective retry policy and outage gate.
pub struct NamedHandler {
    /// `[handlers.NAME]`
    pub name: String,
    /// The handler.
    pub handler: Handler,
    /// `[consumer.retry]` with the handler's overrides applied; a reload may change it.
    pub policy: watch::Sender<RetryPolicy>,
    /// Where every call of the handler waits while it is down; it holds `[consumer.outage]`
    /// with the handler's overrides applied, which a reload may change.
    pub gate: Gate,
}

/// The bounds of one partition's window of fetched messages.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// `consumer.ordering`
    pub ordering: Ordering,
    /// `consumer.max_pending_per_partition`
    pub max_pending: usize,
    /// `consumer.max_pending_bytes_per_partition`
    pub max_bytes: usize,
    /// `consumer.offset_metadata_max_bytes`
    pub max_metadata: usize,
}

/// What every worker shares.
pub struct Shared {
    /// The consumer.
    pub consumer: Arc<StreamConsumer<Context>>,
    /// Message -> handler slot.
    pub router: Router,
    /// Handler slots.
    pub handlers: Vec<NamedHandler>,
    /// Dead-letter producer.
    pub dead_letters: DeadLetters,
    /// Where dead letters wait while Kafka does not take them: one probe at a time
    /// instead of each message retrying on its own (`[consumer.outage]`, down at the first
    /// failure).
    pub dead_letter_gate: Gate,
    /// Policy for unrouted messages.
    pub unrouted: Unrouted,
    /// `max_in_flight` permits, each held during one handler call.
    pub permits: Semaphore,
    /// Each partition's bounds.
    pub window: Window,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// One handler's metrics, as one partition reports them: resolved once, because looking
/// a labelled metric up hashes its labels, which costs more than a fast handler's call.
pub struct Meters {
    in_flight: IntGauge,
    seconds: Histogram,
    done: IntCounter,
}

/// What a partition's deliveries resolve once for its topic: the routes whose glob
/// matches it, and the metrics of the handlers they name.
pub struct Local {
    /// The topic's routes.
    pub routes: TopicRoutes,
    meters: Vec<Option<Meters>>,
}

impl Local {
    /// The routes and meters of `topic`.
    pub fn new(s: &Shared, topic: &str) -> Self {
        let routes = s.router.for_topic(topic);
        let meters = s
            .handlers
            .iter()
            .enumerate()
            .map(|(slot, h)| {
                routes.names(slot).then(|| Meters {
                    in_flight: s.metrics.consumer_in_flight.with_label_values(&[&h.name]),
                    seconds: s
                        .metrics
                        .consumer_handler_seconds
                        .with_label_values(&[&h.name]),
                    done: s
                        .metrics
                        .consumer_messages_total
                        .with_label_values(&[topic, &h.name, "done"]),
                })
            })
            .collect();
        Local { routes, meters }
    }

    /// True when something may read the headers of this topic's messages: a route that
    /// picks by event type, a handler that reads them (every kind but `log` with its
    /// line off), or the handling of a message no route takes.
    pub fn reads_headers(&self, s: &Shared) -> bool {
        self.routes
            .catch_all()
            .is_none_or(|slot| s.handlers[slot].handler.reads_headers())
    }
}

/// What a message held in the window costs besides its key, value and headers: the job
/// (184 bytes), its allocations and its step's future, counted as 0.5 KiB (the peak RSS a
/// backlog of 120-byte messages added per message held, measured when each also carried
/// its topic and librdkafka's header list: an upper bound now).
const OVERHEAD: usize = 512;

/// The memory a message held in the window takes, as the byte bound counts it.
fn footprint(message: &Received) -> usize {
    OVERHEAD + message.bytes()
}

/// A message in delivery.
pub struct Job {
    /// The message.
    pub event: Event,
    /// Its lane.
    pub lane: LaneId,
    /// Its memory, as counted against the partition's byte bound.
    pub size: usize,
    /// Handler calls made, by this process and (as its commit recorded) earlier ones.
    pub calls: u32,
    /// Made at the first failure: a message handled at once needs no retry state. Boxed,
    /// so that a job moving between its steps stays small.
    pub retrier: Option<Box<Retrier>>,
}

impl Job {
    /// A job for `message` in `lane`, after `calls` earlier calls.
    pub fn new(message: Received, lane: LaneId, calls: u32) -> Self {
        let size = footprint(&message);
        Job {
            event: Event { message },
            lane,
            size,
            calls,
            retrier: None,
        }
    }

    /// The message.
    pub fn message(&self) -> &Received {
        &self.event.message
    }

    /// The lane as the outage detector tells keys apart: the same for every message of
    /// one key, different across topics and partitions.
    fn spot(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        let m = self.message();
        (m.topic(), m.partition(), self.lane).hash(&mut h);
        h.finish()
    }
}

/// A call that failed in a way that may pass later, and counts against its message's
/// attempts.
pub struct Failed {
    /// What went wrong.
    pub error: String,
    /// How long the call took.
    pub took: Duration,
    /// How long it waited at its handler's gate (and then for a permit) before it began,
    /// when the gate was not up as it arrived; else zero.
    pub waited: Duration,
    /// The least wait the downstream asked for (`Retry-After`), if any.
    pub after: Option<Duration>,
}

impl Failed {
    fn new(error: String, took: Duration, waited: Duration, after: Option<Duration>) -> Self {
        Failed {
            error,
            took,
            waited,
            after,
        }
    }
}

/// What a step ended with.
pub enum Step {
    /// The message's outcome is final.
    Final,
    /// The call failed and may be retried.
    Retry(Failed),
    /// The call failed because its handler is down: it does not count against the
    /// message's attempts, nor this long against its retry time. The message waits at the
    /// gate again.
    Outage(Duration),
    /// The message got through its handler's gate (after waiting this long): its call may
    /// begin.
    Admitted(Admission, Duration),
    /// The message must be dead-lettered.
    DeadLetter(ErrorClass, String),
    /// A retry's backoff pause is over: the next call may begin.
    Paused,
    /// Stopped before a final outcome: the message is delivered again later.
    Stopped,
}

/// A step in progress.
pub type Running = BoxFuture<'static, (Job, Step)>;

/// A retry's backoff pause: no permit is held, and `stop` ends the wait.
pub fn pause(job: Job, pause: Duration, stop: CancellationToken) -> Running {
    Box::pin(async move {
        tokio::select! {
            _ = stop.cancelled() => (job, Step::Stopped),
            _ = tokio::time::sleep(pause) => (job, Step::Paused),
        }
    })
}

/// Waits at `slot`'s gate until `job`'s call may begin.
pub fn admit(s: Arc<Shared>, job: Job, slot: usize, stop: CancellationToken) -> Running {
    Box::pin(async move {
        let began = Instant::now();
        tokio::select! {
            biased;
            _ = stop.cancelled() => (job, Step::Stopped),
            admission = s.handlers[slot].gate.enter() => (job, Step::Admitted(admission, began.elapsed())),
        }
    })
}

/// Calls `slot`'s handler with `job`, holding one `max_in_flight` permit during the call:
/// through the handler's gate first unless `admitted`. A call that has not begun when
/// `stop` comes does not begin.
pub fn call(
    s: Arc<Shared>,
    local: Arc<Local>,
    mut job: Job,
    slot: usize,
    admitted: Option<Admission>,
    stop: CancellationToken,
) -> Running {
    Box::pin(async move {
        let h = &s.handlers[slot];
        let meters = local.meters[slot]
            .as_ref()
            .expect("meters are resolved for every routed handler");
        // The time a call waits at a gate that is not up is left out of its retry clock;
        // an open gate costs no clock read.
        let entered = (!h.gate.is_up()).then(Instant::now);
        // An open gate passes without a future (and without registering with `stop`).
        let admission = match admitted.or_else(|| h.gate.pass_if_up()) {
            Some(admission) => admission,
            None => tokio::select! {
                biased;
                _ = stop.cancelled() => return (job, Step::Stopped),
                admission = h.gate.enter() => admission,
            },
        };
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return (job, Step::Stopped),
            permit = s.permits.acquire() => permit.expect("semaphore is never closed"),
        };
        if !h.gate.admits(&admission) {
            // The handler went down while this call waited for a permit: it waits at the
            // gate again instead of calling a dead downstream, its call not counted.
            let waited = entered.map_or(Duration::ZERO, |e| e.elapsed());
            return (job, Step::Outage(waited));
        }
        let began = Instant::now();
        let waited = entered.map_or(Duration::ZERO, |e| began - e);
        meters.in_flight.inc();
        let outcome = h.handler.handle(&job.event, job.calls + 1).await;
        meters.in_flight.dec();
        drop(permit);
        let step = conclude(
            h,
            meters,
            &admission,
            &mut job,
            outcome,
            began.elapsed(),
            waited,
        );
        (job, step)
    })
}

/// Calls `slot`'s handler with `job` on the spot when the handler answers without waiting
/// (`log`), its gate is up and a `max_in_flight` permit is free: no future, no task
/// wake-up. `None` when it cannot: [`call`] calls it then.
pub fn call_now(s: &Shared, local: &Local, job: &mut Job, slot: usize) -> Option<Step> {
    let h = &s.handlers[slot];
    if !h.handler.answers_at_once() {
        return None;
    }
    let admission = h.gate.pass_if_up()?;
    let permit = s.permits.try_acquire().ok()?;
    let meters = local.meters[slot]
        .as_ref()
        .expect("meters are resolved for every routed handler");
    let began = Instant::now();
    meters.in_flight.inc();
    let outcome = h.handler.handle_at_once(&job.event, job.calls + 1);
    meters.in_flight.dec();
    drop(permit);
    // `answers_at_once` said it would; if not, the call is made as a future.
    let outcome = outcome?;
    let took = began.elapsed();
    Some(conclude(
        h,
        meters,
        &admission,
        job,
        outcome,
        took,
        Duration::ZERO,
    ))
}

/// The step after `h`'s call of `job` (let through by `admission`, begun after waiting
/// `waited` at a gate that was not up) ended with `outcome` after `took`.
fn conclude(
    h: &NamedHandler,
    meters: &Meters,
    admission: &Admission,
    job: &mut Job,
    outcome: Outcome,
    took: Duration,
    waited: Duration,
) -> Step {
    meters.seconds.observe(took.as_secs_f64());
    let (error, after) = match outcome {
        Outcome::Done => {
            h.gate.record(admission, 0, outage::Result::Answered);
            job.calls += 1;
            meters.done.inc();
            return Step::Final;
        }
        Outcome::DeadLetter(class, error) => {
            h.gate.record(admission, 0, outage::Result::Answered);
            job.calls += 1;
            return Step::DeadLetter(class, error);
        }
        Outcome::Retry(error) => (error, None),
        Outcome::RetryAfter(error, after) => (error, Some(after.min(h.policy.borrow().max_delay))),
        Outcome::RetryShared(error, after) => {
            // The batch's failure was recorded once, by the call that carries it.
            let after = after.map(|a| a.min(h.policy.borrow().max_delay));
            let verdict = h.gate.shared_failure(admission, job.spot(), &error);
            return retry_step(job, verdict, Failed::new(error, took, waited, after));
        }
    };
    let verdict = h
        .gate
        .record(admission, job.spot(), outage::Result::Failed(&error, after));
    retry_step(job, verdict, Failed::new(error, took, waited, after))
}

/// The step after a retryable failure the gate judged `verdict`.
fn retry_step(job: &mut Job, verdict: Verdict, failed: Failed) -> Step {
    match verdict {
        Verdict::Outage => Step::Outage(failed.waited + failed.took),
        Verdict::Counted => {
            job.calls += 1;
            Step::Retry(failed)
        }
    }
}

/// Produces the dead letter, retrying with backoff until Kafka acknowledges it; the
/// message's lane waits meanwhile. A dead letter Kafka refuses for what it is (too large
/// with its context, say) is sent once more without the original value and headers; if
/// Kafka refuses that too, the lane holds until outboxd restarts.
pub fn dead_letter(
    s: Arc<Shared>,
    job: Job,
    handler: Option<usize>,
    class: ErrorClass,
    error: String,
    stop: CancellationToken,
) -> Running {
    Box::pin(async move {
        let failure = Failure {
            handler: handler.map_or("-", |slot| s.handlers[slot].name.as_str()),
            attempts: job.calls,
            class,
            message: &error,
        };
        let step = produce_dead_letter(&s, job.message(), &failure, &stop).await;
        (job, step)
    })
}

async fn produce_dead_letter(
    s: &Shared,
    m: &Received,
    failure: &Failure<'_>,
    stop: &CancellationToken,
) -> Step {
    let gate = &s.dead_letter_gate;
    let mut retry = crate::backoff::exponential();
    let mut stripped: Option<String> = None;
    loop {
        let admission = tokio::select! {
            biased;
            _ = stop.cancelled() => return Step::Stopped,
            admission = gate.enter() => admission,
        };
        let sent = s.dead_letters.send(m, failure, stripped.as_deref()).await;
        let error = match &sent {
            Err(e) if !crate::kafka::is_refusal(e) => Some(e.to_string()),
            // Kafka answered.
            _ => None,
        };
        let result = match &error {
            Some(error) => outage::Result::Failed(error, None),
            None => outage::Result::Answered,
        };
        gate.record(&admission, 0, result);
        drop(admission);
        match sent {
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
                return Step::Final;
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
                    "Kafka refuses even the stripped dead letter: this message's lane stops here until outboxd restarts; the message stays on its topic, uncommitted"
                );
                held(s, m, stop).await;
                return Step::Stopped;
            }
            Err(_) => {
                let error = error.unwrap_or_default();
                if gate.enabled() {
                    // The gate holds this dead letter, and every other, until a probe
                    // gets through.
                    tracing::debug!(
                        topic = m.topic(), partition = m.partition(), offset = m.offset(),
                        %error, "cannot produce the dead letter; it waits for Kafka"
                    );
                    continue;
                }
                let pause = retry.next().unwrap_or_default();
                tracing::error!(
                    topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    %error, ?pause,
                    "cannot produce the dead letter; the message's lane waits and retries"
                );
                tokio::select! {
                    _ = stop.cancelled() => return Step::Stopped,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Holds `job` (an unrouted message under `consumer.unrouted = "fail"`) until shutdown.
pub fn hold(s: Arc<Shared>, job: Job, stop: CancellationToken) -> Running {
    Box::pin(async move {
        let m = job.message();
        tracing::error!(
            topic = m.topic(), partition = m.partition(), offset = m.offset(),
            event_type = job.event.event_type().unwrap_or_default(),
            "no route matches and consumer.unrouted = \"fail\": this message's lane stops here until outboxd restarts with a route for it"
        );
        held(&s, m, &stop).await;
        (job, Step::Stopped)
    })
}

/// Waits for `stop` with the stopped gauge of `m`'s partition at 1 meanwhile. `m`'s
/// offset does not move: after a restart it is handled again.
async fn held(s: &Shared, m: &Received, stop: &CancellationToken) {
    let gauge = s
        .metrics
        .consumer_partition_stopped
        .with_label_values(&[m.topic(), &m.partition().to_string()]);
    gauge.inc();
    stop.cancelled().await;
    gauge.dec();
}

/// Logs and counts an unrouted message skipped under `consumer.unrouted = "skip"`.
pub fn skipped(s: &Shared, event: &Event) {
    let m = &event.message;
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
}
