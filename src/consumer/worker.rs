//! One partition's worker: reads the partition's messages into a bounded window, delivers
//! each lane's messages one at a time (lanes side by side, up to `max_in_flight` calls in
//! all), retries with the handler's policy, dead-letters what fails for good, and
//! publishes the offset to commit (the lowest one without a final outcome) with the map of
//! what is final above it.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prometheus::{IntCounter, IntGauge};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commits::Generation;
use super::delivery::{self, Job, Local, Running, Shared, Step};
use super::input::Input;
use super::lanes::{Lanes, Laning};
use super::offsets::{Prior, Tracker};
use super::outage::{Admission, Pass};
use super::retry::{Next, Retrier};
use crate::config::Unrouted;
use crate::handlers::ErrorClass;
use crate::systemd::Heartbeat;

/// Messages a worker takes from its queue at a time (fewer when fewer are waiting or the
/// window has less room): one wake-up per batch instead of one per message.
const BATCH: usize = 64;

/// The offset to commit is published at most this often (and whenever the worker has
/// nothing else to do); it bounds what a rebalance makes the next owner handle again
/// beyond the messages in flight, together with the commit interval.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// Turns of a busy worker's loop between two heartbeats.
const BEAT_EVERY: u32 = 1024;

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
    heartbeat: Heartbeat,
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
    // The loop beats while idle (the tick, polled when nothing else is ready) and while
    // busy (every BEAT_EVERY turns), so the watchdog sees a worker stuck in one turn.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut turns: u32 = 0;
    loop {
        turns = turns.wrapping_add(1);
        if turns.is_multiple_of(BEAT_EVERY) {
            heartbeat.beat();
        }
        let stopping = stop.is_cancelled();
        if stopping && w.running.is_empty() {
            break;
        }
        let room = if stopping { 0 } else { w.room() };
        tokio::select! {
            biased;
            _ = stop.cancelled(), if !stopping => {}
            Some((job, step)) = w.running.next(), if !w.running.is_empty() => {
                w.stepped(job, step);
            }
            _ = input.next_batch(&mut batch, room), if room > 0 => {
                for m in batch.drain(..) {
                    w.admit(m);
                }
            }
            _ = tokio::time::sleep_until(w.publish_due), if w.dirty => {}
            _ = tick.tick() => heartbeat.beat(),
        }
        w.publish_if_due();
    }
    w.publish();
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
    /// Key and value bytes of the messages waiting or in delivery.
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
    fn admit(&mut self, m: OwnedMessage) {
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
        let Some(slot) = self.local.routes.route(job.event.event_type()) else {
            match self.s.unrouted {
                Unrouted::Skip => {
                    delivery::skipped(&self.s, &job.event);
                    self.finished(job);
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

    fn call(&mut self, job: Job, slot: usize, admitted: Option<Admission>) {
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
        let slot = self.local.routes.route(job.event.event_type());
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
                        None => {
                            job.retrier
                                .insert(Retrier::resumed(&policy, failed.took, job.calls))
                        }
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
