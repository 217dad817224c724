//! One partition's worker: reads the partition's messages into a bounded window, delivers
//! each lane's messages one at a time (lanes side by side, up to `max_in_flight` calls in
//! all), retries with the handler's policy, dead-letters what fails for good, and
//! publishes the offset to commit (the lowest one without a final outcome) with the map of
//! what is final above it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prometheus::{IntCounter, IntGauge};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commits::Generation;
use super::delivery::{self, Job, Local, Running, Shared, Step};
use super::gate::Admission;
use super::input::Input;
use super::lanes::{Lanes, Laning};
use super::offsets::{Prior, Tracker};
use super::outage::Pass;
use super::retry::{Next, Retrier};
use crate::config::Unrouted;
use crate::handlers::{ErrorClass, Received};

/// Messages a worker takes from its queue at a time (fewer when fewer are waiting or the
/// window has less room): one wake-up per batch instead of one per message.
const BATCH: usize = 64;

/// Calls a worker makes on the spot in one turn of its loop (a handler that answers at
/// once); further ones that turn run as futures, polled in the turns after it.
const AT_ONCE_PER_TURN: usize = 256;

/// The offset to commit is published at most this often (and whenever the worker has
/// nothing else to do); it bounds what a rebalance makes the next owner handle again
/// beyond the messages in flight, together with the commit interval.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// How a worker shows that it is not stuck inside one turn of its loop: the count goes up
/// by one as a turn begins (odd) and as the worker waits again (even). Two plain stores
/// a turn; the dispatcher reads it each second.
#[derive(Debug, Default)]
pub struct Turns(AtomicU64);

impl Turns {
    /// Since the value `last` read before: a turn ended or began, or the worker waits.
    /// Updates `last`.
    pub fn moving(&self, last: &mut u64) -> bool {
        let now = self.0.load(AtomicOrdering::Relaxed);
        let moving = now != *last || now.is_multiple_of(2);
        *last = now;
        moving
    }
}

/// Which partition a worker serves, and which assignment of it.
pub struct Assignment {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The assignment's entry in the commit table.
    pub generation: Generation,
}

/// Runs the worker of a partition until `stop` (after the calls in flight). Starts only
/// once `previous` (a retired worker of the same partition) has finished.
pub async fn run(
    shared: Arc<Shared>,
    at: Assignment,
    mut input: Input,
    stop: CancellationToken,
    previous: Option<oneshot::Receiver<()>>,
    turns: Arc<Turns>,
) {
    if let Some(previous) = previous {
        // Resolves when the previous worker ended, however it ended (its sender is
        // dropped then, a panic included).
        let _ = previous.await;
    }
    let restored = {
        let (consumer, topic) = (shared.consumer.clone(), at.topic.clone());
        let partition = at.partition;
        let restored = tokio::task::spawn_blocking(move || {
            super::commits::restore(consumer.as_ref(), &topic, partition)
        })
        .await;
        restored.unwrap_or_else(|e| {
            tracing::error!(
                topic = %at.topic, partition = at.partition, error = %e,
                "reading the partition's commit metadata failed; going on from the committed offset alone (messages final above it are handled again)"
            );
            Default::default()
        })
    };
    let mut w = Worker::new(shared, at, Tracker::new(restored), stop.clone());
    let mut batch = Vec::with_capacity(BATCH);
    let mut turn: u64 = 0;
    loop {
        turns.0.store(2 * turn, AtomicOrdering::Relaxed);
        let stopping = stop.is_cancelled();
        if stopping && w.running.is_empty() {
            break;
        }
        let room = if stopping { 0 } else { w.room() };
        // Asked as each message is taken: a reload may turn a `log` line on meanwhile.
        let headers = || reads_headers(&w.local, &w.s, &w.tracker);
        let woke = tokio::select! {
            biased;
            _ = stop.cancelled(), if !stopping => None,
            Some(stepped) = w.running.next(), if !w.running.is_empty() => Some(stepped),
            _ = input.next_batch(&mut batch, room, &headers), if room > 0 => None,
            _ = tokio::time::sleep_until(w.publish_due), if w.dirty => None,
        };
        turns.0.store(2 * turn + 1, AtomicOrdering::Relaxed);
        w.at_once_left = AT_ONCE_PER_TURN;
        if let Some((job, step)) = woke {
            w.stepped(job, step);
        }
        for m in batch.drain(..) {
            w.admit(m);
        }
        while let Some((job, step)) = w.ready.pop_front() {
            w.stepped(job, step);
        }
        w.publish_if_due();
        turn += 1;
    }
    w.publish();
}

/// True when the message taken next must bring its headers: something of the partition
/// may read them ([`Local::reads_headers`]), or the assignment's commit names messages in
/// retry (one of them may be dead-lettered at once, and a dead letter carries them).
fn reads_headers(local: &Local, s: &Shared, tracker: &Tracker) -> bool {
    tracker.restores_calls() || local.reads_headers(s)
}

/// One partition's state.
struct Worker {
    s: Arc<Shared>,
    local: Arc<Local>,
    at: Assignment,
    stop: CancellationToken,
    laning: Laning,
    tracker: Tracker,
    lanes: Lanes<Job>,
    running: FuturesUnordered<Running>,
    /// Steps that ended on the spot (calls of a handler that answers at once), taken in
    /// turn by the loop: a lane's next message starts from there, not from inside the
    /// step before it.
    ready: VecDeque<(Job, Step)>,
    /// Calls the current turn may still make on the spot; the rest go as futures, so that
    /// one turn stays short whatever the window holds.
    at_once_left: usize,
    /// Key, value and header bytes of the messages waiting or in delivery (see `Job::size`).
    bytes: usize,
    /// Messages in backoff (each holds its lane).
    in_retry: usize,
    /// The tracker changed since the last publication.
    dirty: bool,
    publish_due: Instant,
    pending_gauge: IntGauge,
    retry_gauge: IntGauge,
    already_final: IntCounter,
}

impl Worker {
    fn new(s: Arc<Shared>, at: Assignment, tracker: Tracker, stop: CancellationToken) -> Self {
        let labels = [at.topic.as_str(), &at.partition.to_string()];
        let m = &s.metrics;
        Worker {
            local: Arc::new(Local::new(&s, &at.topic)),
            laning: Laning::new(s.window.ordering),
            pending_gauge: m.consumer_pending.with_label_values(&labels),
            retry_gauge: m.consumer_keys_in_retry.with_label_values(&labels),
            already_final: m
                .consumer_already_final_total
                .with_label_values(&[&at.topic]),
            s,
            at,
            stop,
            tracker,
            lanes: Lanes::default(),
            running: FuturesUnordered::new(),
            ready: VecDeque::new(),
            at_once_left: AT_ONCE_PER_TURN,
            bytes: 0,
            in_retry: 0,
            dirty: false,
            publish_due: Instant::now(),
        }
    }

    /// How many more messages the window takes now.
    fn room(&self) -> usize {
        let w = &self.s.window;
        if self.bytes >= w.max_bytes && !self.lanes.is_empty() {
            return 0;
        }
        w.max_pending
            .saturating_sub(self.tracker.pending())
            .min(BATCH)
    }

    /// A fetched message: skipped if an earlier owner finished it, else delivered now or
    /// queued behind its lane's message in delivery.
    fn admit(&mut self, m: Received) {
        self.dirty = true;
        let calls = match self.tracker.fetched(m.offset()) {
            Prior::Final => {
                self.already_final.inc();
                return;
            }
            Prior::Fresh => 0,
            Prior::Calls(n) => n,
        };
        let lane = self.laning.lane(&m);
        let job = Job::new(m, lane, calls);
        self.bytes += job.size;
        if let Some(job) = self.lanes.admit(lane, job) {
            self.start(job);
        }
    }

    /// Starts a job's delivery: its handler call, or what its route (or its lack of one)
    /// says.
    fn start(&mut self, job: Job) {
        let Some(slot) = self.local.routes.route(|| job.event.event_type()) else {
            match self.s.unrouted {
                Unrouted::Skip => {
                    delivery::skipped(&self.s, &job.event);
                    // Through the loop, not from here: a lane of skipped messages would
                    // otherwise recurse as deep as it is long.
                    self.ready.push_back((job, Step::Final));
                }
                Unrouted::DeadLetter => {
                    let error = "no route matches this message".to_owned();
                    self.dead_letter(job, None, ErrorClass::Unrouted, error);
                }
                Unrouted::Fail => {
                    let f = delivery::hold(self.s.clone(), job, self.stop.clone());
                    self.running.push(f);
                }
            }
            return;
        };
        let max_attempts = self.s.handlers[slot].policy.borrow().max_attempts;
        if job.calls >= max_attempts {
            // An earlier process made every call the policy allows and stopped before the
            // dead letter.
            let error = format!("{} calls were made before a restart", job.calls);
            return self.dead_letter(job, Some(slot), ErrorClass::RetryableExhausted, error);
        }
        self.call(job, slot, None);
    }

    fn call(&mut self, mut job: Job, slot: usize, admitted: Option<Admission>) {
        // On the spot only while the worker goes on (a call that has not begun when stop
        // comes does not begin: the future checks) and within the turn's share.
        if admitted.is_none() && self.at_once_left > 0 && !self.stop.is_cancelled() {
            if let Some(step) = delivery::call_now(&self.s, &self.local, &mut job, slot) {
                self.at_once_left -= 1;
                return self.ready.push_back((job, step));
            }
        }
        let f = delivery::call(
            self.s.clone(),
            self.local.clone(),
            job,
            slot,
            admitted,
            self.stop.clone(),
        );
        self.running.push(f);
    }

    /// `job` waits at its handler's gate before its next call.
    fn wait_at_gate(&mut self, job: Job, slot: usize) {
        let f = delivery::admit(self.s.clone(), job, slot, self.stop.clone());
        self.running.push(f);
    }

    fn dead_letter(&mut self, job: Job, slot: Option<usize>, class: ErrorClass, error: String) {
        let f = delivery::dead_letter(self.s.clone(), job, slot, class, error, self.stop.clone());
        self.running.push(f);
    }

    /// A step ended: decides the job's next step.
    fn stepped(&mut self, mut job: Job, step: Step) {
        let slot = self.local.routes.route(|| job.event.event_type());
        match step {
            Step::Final => self.finished(job),
            Step::Stopped => self.stopped(job),
            Step::DeadLetter(class, error) => self.dead_letter(job, slot, class, error),
            Step::Paused => {
                let slot = slot.expect("only a routed message is retried");
                self.wait_at_gate(job, slot);
            }
            Step::Admitted(admission, waited) => {
                // The call is counted as it begins: a crash during it (or during the ones
                // after it) does not give the message its calls back. A probe's is not: it
                // fails uncounted, or its success makes the message final. Time spent
                // waiting at the gate while the handler was down is not retry time.
                if admission.pass() != Pass::Probe {
                    self.tracker.retrying(job.message().offset(), job.calls + 1);
                    self.dirty = true;
                }
                if let Some(r) = job.retrier.as_mut() {
                    r.exclude(waited);
                }
                let slot = slot.expect("only a routed message is retried");
                self.call(job, slot, Some(admission));
            }
            Step::Outage(excluded) => {
                // The handler is down: the call is not counted (its record as begun is
                // taken back) and the message waits at the gate with its budget as it was.
                self.tracker.retrying(job.message().offset(), job.calls);
                self.dirty = true;
                if let Some(r) = job.retrier.as_mut() {
                    r.exclude(excluded);
                }
                let slot = slot.expect("only a routed message is called");
                self.wait_at_gate(job, slot);
            }
            Step::Retry(failed) => {
                let slot = slot.expect("only a routed message is called");
                let h = &self.s.handlers[slot];
                let next = {
                    let policy = h.policy.borrow();
                    if job.retrier.is_none() {
                        self.in_retry += 1;
                    }
                    let retrier = match &mut job.retrier {
                        Some(r) => {
                            r.exclude(failed.waited);
                            r
                        }
                        // Its clock starts with this call, after the wait.
                        None => job.retrier.insert(Box::new(Retrier::resumed(
                            &policy,
                            failed.took,
                            job.calls,
                        ))),
                    };
                    retrier.next(job.calls, failed.after)
                };
                let error = failed.error;
                match next {
                    Next::GiveUp => {
                        self.dead_letter(job, Some(slot), ErrorClass::RetryableExhausted, error)
                    }
                    Next::RetryAfter(pause) => {
                        let m = job.message();
                        tracing::warn!(
                            topic = m.topic(), partition = m.partition(), offset = m.offset(),
                            handler = %h.name, attempt = job.calls, ?pause, %error,
                            "handler failed; retrying"
                        );
                        self.s
                            .metrics
                            .consumer_retries_total
                            .with_label_values(&[&h.name])
                            .inc();
                        let offset = m.offset();
                        self.tracker.retrying(offset, job.calls);
                        self.dirty = true;
                        self.running
                            .push(delivery::pause(job, pause, self.stop.clone()));
                    }
                }
            }
        }
    }

    /// The job's outcome is final: its offset may be committed, and its lane's next
    /// message starts (unless the worker is stopping).
    fn finished(&mut self, job: Job) {
        self.tracker.finished(job.message().offset());
        self.dirty = true;
        self.release(&job);
        if let Some(next) = self.lanes.next(job.lane) {
            if self.stop.is_cancelled() {
                return;
            }
            self.start(next);
        }
    }

    /// The job stopped without a final outcome (the worker is stopping): its offset stays
    /// open, with its calls so far recorded.
    fn stopped(&mut self, job: Job) {
        // A call recorded as begun may have stopped before it began (waiting for a
        // permit): the record keeps only the calls made.
        self.tracker.retrying(job.message().offset(), job.calls);
        self.dirty = true;
        self.release(&job);
    }

    fn release(&mut self, job: &Job) {
        self.bytes -= job.size;
        if job.retrier.is_some() {
            self.in_retry -= 1;
        }
    }

    fn publish_if_due(&mut self) {
        if self.dirty && Instant::now() >= self.publish_due {
            self.publish();
        }
    }

    /// Hands the offset to commit to the commit table.
    fn publish(&mut self) {
        self.dirty = false;
        self.publish_due = Instant::now() + PUBLISH_EVERY;
        self.pending_gauge.set(self.tracker.pending() as i64);
        self.retry_gauge.set(self.in_retry as i64);
        if let Some(c) = self.tracker.commit(self.s.window.max_metadata) {
            let commits = &self.s.consumer.context().commits;
            commits.publish(&self.at.topic, self.at.partition, self.at.generation, c);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.pending_gauge.set(0);
        self.retry_gauge.set(0);
    }
}

#[cfg(test)]
mod tests {
    //! The worker's decisions after each step, on the worker's real parts: a consumer
    //! client and a producer on librdkafka's in-process mock cluster, a `command` handler
    //! and the real gate. Steps are handed to `stepped` as a call would end; what it
    //! decided shows in the offset map it publishes (read back as a new owner would) and
    //! in the next step its future resolves to.

    use std::sync::Arc;
    use std::time::Duration;

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::StreamConsumer;
    use rdkafka::mocking::MockCluster;
    use tokio::sync::{watch, Semaphore};

    use super::*;
    use crate::config::{
        DeadLetterDialect, HandlerConfig, Ordering, OutagePolicy, RetryPolicy, RouteConfig,
        Unrouted,
    };
    use crate::consumer::context::Context;
    use crate::consumer::dead_letter::DeadLetters;
    use crate::consumer::delivery::{Failed, NamedHandler, Window};
    use crate::consumer::gate::{Gate, Meters};
    use crate::consumer::offsets::Restored;
    use crate::consumer::outage::{self, Pass};
    use crate::consumer::routing::Router;
    use crate::handlers::{Handler, HandlerDeps};
    use crate::kafka::ProducerSlot;
    use crate::metrics::Metrics;

    const TOPIC: &str = "steps";

    struct Parts {
        // Kept alive for the clients.
        _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        worker: Worker,
    }

    fn parts(max_attempts: u32) -> Parts {
        parts_with(max_attempts, "kind = \"command\"\nprogram = \"/bin/true\"")
    }

    /// A worker whose one handler is `handler` (its TOML lines).
    fn parts_with(max_attempts: u32, handler: &str) -> Parts {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        cluster.create_topic(&format!("{TOPIC}.dlq"), 1, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let metrics = Arc::new(Metrics::new());
        let consumer: StreamConsumer<Context> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "steps")
            .create_with_context(Context::new(metrics.clone(), None))
            .unwrap();
        let consumer = Arc::new(consumer);
        consumer.context().attach(&consumer);
        let producer = Arc::new(
            ProducerSlot::new(crate::kafka::producer_config(
                &Default::default(),
                &bootstrap,
            ))
            .unwrap(),
        );
        let deps = HandlerDeps {
            database: None,
            producer: producer.clone(),
            metrics: metrics.clone(),
        };
        let config: HandlerConfig = toml::from_str(handler).unwrap();
        let meters = |name: &str| Meters::of(&metrics, name);
        let quick = OutagePolicy {
            probe_interval: Duration::from_millis(10),
            ..OutagePolicy::default()
        };
        let handlers = vec![NamedHandler {
            name: "cmd".into(),
            handler: Handler::build("cmd", &config, &deps).unwrap(),
            policy: watch::Sender::new(RetryPolicy {
                max_attempts,
                initial: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
                ..RetryPolicy::default()
            }),
            gate: Gate::new("handler cmd".into(), quick.clone(), 4, meters("cmd")),
        }];
        let routes = [RouteConfig {
            topic: TOPIC.into(),
            event_type: None,
            handler: "cmd".into(),
        }];
        let router = Router::new(&routes, |name| (name == "cmd").then_some(0)).unwrap();
        let generation = consumer.context().commits.open(TOPIC, 0);
        let shared = Arc::new(Shared {
            consumer,
            router,
            handlers,
            dead_letters: DeadLetters::new(
                producer,
                "{topic}.dlq",
                DeadLetterDialect::Outboxd,
                "steps",
            ),
            dead_letter_gate: Gate::new("dead letters".into(), quick, 4, meters("-")),
            unrouted: Unrouted::DeadLetter,
            permits: Semaphore::new(4),
            window: Window {
                ordering: Ordering::Key,
                max_pending: 100,
                max_bytes: 1 << 20,
                max_metadata: 4096,
            },
            metrics,
        });
        let at = Assignment {
            topic: TOPIC.into(),
            partition: 0,
            generation,
        };
        let worker = Worker::new(
            shared,
            at,
            Tracker::new(Restored::default()),
            CancellationToken::new(),
        );
        Parts {
            _cluster: cluster,
            worker,
        }
    }

    fn message(offset: i64) -> Received {
        Received::new(
            TOPIC.into(),
            0,
            offset,
            rdkafka::Timestamp::NotAvailable,
            Some(b"k"),
            Some(b"{}"),
            None,
        )
    }

    /// `offset` fetched into `w`'s window, with `recorded` calls in its offset map, as a
    /// job (whose calls the test sets).
    fn fetched(w: &mut Worker, offset: i64, recorded: u32) -> Job {
        w.tracker.fetched(offset);
        if recorded > 0 {
            w.tracker.retrying(offset, recorded);
        }
        let m = message(offset);
        let lane = w.laning.lane(&m);
        let job = Job::new(m, lane, 0);
        w.bytes += job.size;
        job
    }

    /// The calls a new owner would read for `offset` from what `w` publishes now.
    fn published_calls(w: &Worker, offset: i64) -> Option<u32> {
        let commit = w.tracker.commit(4096)?;
        let mut restored = Restored::decode(commit.offset, &commit.metadata).unwrap_or_default();
        match restored.take(offset) {
            crate::consumer::offsets::Prior::Calls(n) => Some(n),
            _ => None,
        }
    }

    fn failed() -> Failed {
        Failed {
            error: "exit code 75".into(),
            took: Duration::from_millis(1),
            waited: Duration::ZERO,
            after: None,
        }
    }

    /// The step the only future running resolves to.
    async fn next_step(w: &mut Worker) -> (Job, Step) {
        assert_eq!(w.running.len(), 1, "one step running");
        tokio::time::timeout(Duration::from_secs(30), w.running.next())
            .await
            .expect("the step ends")
            .expect("a step")
    }

    #[tokio::test]
    async fn a_log_partition_reads_headers_only_while_its_line_is_on_or_a_retry_is_restored() {
        use tracing::level_filters::LevelFilter;
        let at = |level: LevelFilter, w: &Worker| {
            let subscriber = tracing_subscriber::fmt().with_max_level(level).finish();
            tracing::subscriber::with_default(subscriber, || {
                reads_headers(&w.local, &w.s, &w.tracker)
            })
        };
        let commanded = parts(3);
        assert!(
            at(LevelFilter::WARN, &commanded.worker),
            "a command reads them"
        );
        let mut logged = parts_with(3, "kind = \"log\"");
        let w = &mut logged.worker;
        assert!(!at(LevelFilter::WARN, w), "nothing reads them");
        assert!(at(LevelFilter::INFO, w), "the log line names type and id");
        // A commit that names a message in retry: it may be dead-lettered as it arrives.
        w.tracker.fetched(7);
        w.tracker.retrying(7, 2);
        let commit = w.tracker.commit(4096).unwrap();
        w.tracker = Tracker::new(Restored::decode(commit.offset, &commit.metadata).unwrap());
        assert!(
            at(LevelFilter::WARN, w),
            "a restored retry may be dead-lettered"
        );
        w.tracker.fetched(7);
        w.tracker.fetched(8);
        assert!(!at(LevelFilter::WARN, w), "past the restored retry");
    }

    #[test]
    fn turns_move_unless_one_turn_does_not_end() {
        let turns = Turns::default();
        let mut seen = 0;
        assert!(turns.moving(&mut seen), "waiting before the first turn");
        turns.0.store(1, AtomicOrdering::Relaxed);
        assert!(turns.moving(&mut seen), "a turn began");
        assert!(
            !turns.moving(&mut seen),
            "the same turn, still running: stuck"
        );
        turns.0.store(2, AtomicOrdering::Relaxed);
        assert!(turns.moving(&mut seen), "the turn ended");
        assert!(
            turns.moving(&mut seen),
            "waiting for work is not being stuck"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_that_answers_at_once_is_called_in_the_turn_up_to_its_share() {
        let Parts {
            mut worker,
            _cluster,
        } = parts_with(3, "kind = \"log\"");
        let w = &mut worker;
        // One key: each message starts when the one before it is final, as the loop
        // takes the steps that ended on the spot.
        let n = AT_ONCE_PER_TURN as i64 + 10;
        for offset in 0..n {
            w.admit(message(offset));
        }
        while let Some((job, step)) = w.ready.pop_front() {
            w.stepped(job, step);
        }
        assert_eq!(
            w.tracker.pending(),
            10,
            "the turn's share of calls was made on the spot"
        );
        assert_eq!(w.running.len(), 1, "the next call runs as a future");
        let (job, step) = next_step(w).await;
        assert!(matches!(step, Step::Final));
        assert_eq!(job.message().offset(), AT_ONCE_PER_TURN as i64);
        // Once stop has come, no call begins on the spot: the future sees the stop.
        w.stop.cancel();
        w.at_once_left = AT_ONCE_PER_TURN;
        let job = fetched(w, n, 0);
        w.call(job, 0, None);
        assert!(w.ready.is_empty(), "nothing called on the spot");
        let (_, step) = tokio::time::timeout(Duration::from_secs(30), w.running.next())
            .await
            .expect("the step ends")
            .expect("a step");
        assert!(matches!(step, Step::Stopped));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_counted_failure_is_recorded_and_paused_then_admitted_and_recorded_as_begun() {
        let Parts {
            mut worker,
            _cluster,
        } = parts(3);
        let w = &mut worker;
        let mut job = fetched(w, 0, 0);
        job.calls = 1;
        w.stepped(job, Step::Retry(failed()));
        assert_eq!(published_calls(w, 0), Some(1), "the call is recorded");
        assert_eq!(w.in_retry, 1);
        let (job, step) = next_step(w).await;
        assert!(matches!(step, Step::Paused), "a backoff pause");
        w.stepped(job, step);
        let (job, step) = next_step(w).await;
        let Step::Admitted(admission, _) = &step else {
            panic!("the gate is up: admitted at once");
        };
        assert_eq!(admission.pass(), Pass::Open);
        w.stepped(job, step);
        assert_eq!(
            published_calls(w, 0),
            Some(2),
            "the second call is recorded as it begins"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_counted_failure_dead_letters_the_message() {
        let Parts {
            mut worker,
            _cluster,
        } = parts(3);
        let w = &mut worker;
        let mut job = fetched(w, 0, 2);
        job.calls = 3;
        w.stepped(job, Step::Retry(failed()));
        let (job, step) = next_step(w).await;
        assert!(
            matches!(step, Step::Final),
            "dead-lettered and acknowledged"
        );
        w.stepped(job, step);
        let commit = w.tracker.commit(4096).unwrap();
        assert_eq!(commit.offset, 1, "final: the offset moves past it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_failure_takes_back_the_call_recorded_as_begun() {
        let Parts {
            mut worker,
            _cluster,
        } = parts(3);
        let w = &mut worker;
        // The message was in retry after 1 call; its second call was recorded as begun.
        let mut job = fetched(w, 0, 2);
        job.calls = 1;
        w.stepped(job, Step::Outage(Duration::from_secs(5)));
        assert_eq!(
            published_calls(w, 0),
            Some(1),
            "the call the outage failed is not counted"
        );
        let (_, step) = next_step(w).await;
        assert!(
            matches!(step, Step::Admitted(..)),
            "it waits at the gate again (up here, so it passes at once)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_is_not_recorded_as_begun() {
        let Parts {
            mut worker,
            _cluster,
        } = parts(3);
        let w = &mut worker;
        let gate = w.s.handlers[0].gate.clone();
        for key in 0..10 {
            let a = gate.enter().await;
            gate.record(&a, key, outage::Result::Failed("HTTP 503", None));
        }
        let mut job = fetched(w, 0, 1);
        job.calls = 1;
        w.stepped(job, Step::Paused);
        let (job, step) = next_step(w).await;
        let Step::Admitted(admission, _) = &step else {
            panic!("the probe is let through");
        };
        assert_eq!(admission.pass(), Pass::Probe);
        w.stepped(job, step);
        assert_eq!(
            published_calls(w, 0),
            Some(1),
            "a probe's failure is never counted, so its call is not recorded as begun"
        );
    }
}
