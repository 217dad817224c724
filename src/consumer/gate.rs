//! A handler's gate: what every call of it passes. `enter` waits for an admission (at
//! once, without a lock, while the handler is up; while it is down, in line for the one
//! probe; while it ramps up, in line for a slot), `record` tells the [`Detector`] how a
//! call ended and says whether the call counts against its message's retry budget. Logs
//! and metrics tell operators when a handler goes down and comes back.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::outage::{Detector, Entry, Pass, Result, Transition, Verdict};
use crate::config::OutagePolicy;

impl Meters {
    /// The meters of `handler` (`-` for the dead-letter producer) in `metrics`.
    pub fn of(metrics: &crate::metrics::Metrics, handler: &str) -> Self {
        Meters {
            down: metrics.consumer_handler_down.with_label_values(&[handler]),
            outages: metrics
                .consumer_handler_outages_total
                .with_label_values(&[handler]),
            probes: metrics
                .consumer_probe_calls_total
                .with_label_values(&[handler]),
        }
    }
}

/// What the gate reports to operators.
pub struct Meters {
    /// `outboxd_consumer_handler_down{handler}`
    pub down: IntGauge,
    /// `outboxd_consumer_handler_outages_total{handler}`
    pub outages: IntCounter,
    /// `outboxd_consumer_probe_calls_total{handler}`
    pub probes: IntCounter,
}

/// One handler's gate, shared by every partition's deliveries.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    /// What the log lines name: `handler web`, `dead-letter producer`.
    name: String,
    /// Mirrors `Detector::is_up` so that a call of a handler that is up passes without a
    /// lock.
    up: AtomicBool,
    /// Mirrors `policy.enabled`.
    enabled: AtomicBool,
    /// Up with no failure remembered: a success changes nothing.
    quiet: AtomicBool,
    detector: Mutex<Detector>,
    changed: Notify,
    meters: Meters,
}

/// A call let through the gate. Dropping it (the call ended, or was cut short) frees its
/// place.
pub struct Admission {
    pass: Pass,
    epoch: u64,
    /// Held only by calls whose end the detector must hear of.
    gate: Option<Arc<Inner>>,
}

impl Admission {
    /// How it got through.
    pub fn pass(&self) -> Pass {
        self.pass
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(inner) = self.gate.take() {
            inner.lock().left(self.pass, self.epoch);
            inner.changed.notify_waiters();
        }
    }
}

/// A waiting message's place in line, given back if it stops waiting.
struct Ticket<'a> {
    inner: &'a Inner,
    number: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.inner.lock().leave(self.number) {
            // The next in line may be the one to go now.
            self.inner.changed.notify_waiters();
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Detector> {
        // A panic while holding the lock leaves a consistent detector (every change is
        // one assignment), so a poisoned lock is taken as it is.
        self.detector.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync(&self, d: &Detector) {
        self.up.store(d.is_up(), AtomicOrdering::Release);
        self.quiet.store(d.quiet(), AtomicOrdering::Release);
        self.enabled.store(d.enabled(), AtomicOrdering::Release);
        self.meters.down.set(i64::from(d.is_down()));
    }

    fn tell(&self, transition: Option<Transition>) {
        match transition {
            None => {}
            Some(Transition::Down { calls, keys, error }) => {
                self.meters.outages.inc();
                tracing::error!(
                    target = %self.name, calls, keys, last_error = %error,
                    "downstream down: its last calls failed across many keys; no call starts for it but one probe at a time, and its messages wait with their retry budgets kept"
                );
            }
            Some(Transition::Up {
                down_for,
                waited,
                probes,
            }) => {
                tracing::warn!(
                    target = %self.name, ?down_for, waited, probes,
                    "downstream back: calls ramp up again, the waiting messages go on in order"
                );
            }
        }
    }
}

impl Gate {
    /// A gate for `name` under `policy`, `max_in_flight` being where a ramp ends.
    pub fn new(name: String, policy: OutagePolicy, max_in_flight: usize, meters: Meters) -> Self {
        let detector = Detector::new(policy, max_in_flight);
        let inner = Arc::new(Inner {
            name,
            up: AtomicBool::new(true),
            quiet: AtomicBool::new(true),
            enabled: AtomicBool::new(detector.enabled()),
            detector: Mutex::new(detector),
            changed: Notify::new(),
            meters,
        });
        inner.meters.down.set(0);
        Gate { inner }
    }

    /// Takes a new policy (a reload); turning detection off ends an outage at once.
    pub fn set_policy(&self, policy: OutagePolicy) {
        let transition = {
            let mut d = self.inner.lock();
            let t = d.set_policy(policy);
            self.inner.sync(&d);
            t
        };
        self.inner.tell(transition);
        self.inner.changed.notify_waiters();
    }

    /// False when detection is off: a failure is left to the caller's own backoff.
    pub fn enabled(&self) -> bool {
        self.inner.enabled.load(AtomicOrdering::Acquire)
    }

    /// True while calls pass without waiting.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(AtomicOrdering::Acquire)
    }

    /// False when `admission` let its call through while the handler was up, and it is
    /// not any more: the call should wait at the gate again.
    pub fn admits(&self, admission: &Admission) -> bool {
        admission.pass != Pass::Open || self.inner.up.load(AtomicOrdering::Acquire)
    }

    /// An admission at once while the handler is up: no future, no wait.
    pub fn pass_if_up(&self) -> Option<Admission> {
        self.inner
            .up
            .load(AtomicOrdering::Acquire)
            .then_some(Admission {
                pass: Pass::Open,
                epoch: 0,
                gate: None,
            })
    }

    /// Waits until a call may start. Cancel-safe: a waiter dropped gives its place back.
    pub async fn enter(&self) -> Admission {
        if let Some(open) = self.pass_if_up() {
            return open;
        }
        let inner = &*self.inner;
        let ticket = Ticket {
            inner,
            number: inner.lock().queue(),
        };
        loop {
            let changed = inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (entry, epoch) = {
                let mut d = inner.lock();
                (d.enter(ticket.number, Instant::now()), d.epoch())
            };
            match entry {
                Entry::Admitted(pass) => {
                    // Admitted: the ticket is spent, nothing to give back.
                    std::mem::forget(ticket);
                    match pass {
                        Pass::Probe => inner.meters.probes.inc(),
                        // The next in line may take another slot of the ramp.
                        Pass::Ramp => inner.changed.notify_waiters(),
                        Pass::Open => {}
                    }
                    let gate = (pass != Pass::Open).then(|| self.inner.clone());
                    return Admission { pass, epoch, gate };
                }
                Entry::Wait(None) => changed.await,
                Entry::Wait(Some(until)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(until) => {}
                    }
                }
            }
        }
    }

    /// A retryable failure of a call that failed together with others in one batch, the
    /// failure recorded once by one of them: a call that passed an open gate is not
    /// counted again, and is judged by the state that recording left (down: it waits at
    /// the gate, uncounted); a probe or ramp call is recorded as any failure is, its pass
    /// being its own.
    pub fn shared_failure(&self, admission: &Admission, key: u64, error: &str) -> Verdict {
        if admission.pass == Pass::Open {
            return if self.is_up() {
                Verdict::Counted
            } else {
                Verdict::Outage
            };
        }
        self.record(admission, key, Result::Failed(error, None))
    }

    /// Reports how the call let through by `admission` for message `key` ended; says
    /// whether it counts against the message's budget.
    pub fn record(&self, admission: &Admission, key: u64, result: Result<'_>) -> Verdict {
        if result == Result::Answered
            && admission.pass == Pass::Open
            && self.inner.quiet.load(AtomicOrdering::Acquire)
        {
            // The common case: a success while up, with no run of failures to forget.
            return Verdict::Counted;
        }
        let (verdict, transition, down) = {
            let mut d = self.inner.lock();
            let (verdict, transition) =
                d.record(admission.pass, admission.epoch, key, result, Instant::now());
            self.inner.sync(&d);
            (verdict, transition, d.is_down())
        };
        let changed = transition.is_some();
        self.inner.tell(transition);
        if changed || !down {
            // Back, or ramping further: waiters may go on.
            self.inner.changed.notify_waiters();
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> OutagePolicy {
        OutagePolicy::default()
    }

    fn failed() -> Result<'static> {
        Result::Failed("HTTP 503", None)
    }

    fn meters() -> Meters {
        Meters {
            down: IntGauge::new("d", "d").unwrap(),
            outages: IntCounter::new("o", "o").unwrap(),
            probes: IntCounter::new("p", "p").unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_holds_calls_while_down_and_lets_one_probe_through() {
        let gate = Gate::new("handler test".into(), policy(), 8, meters());
        for key in 0..10 {
            let a = gate.enter().await;
            gate.record(&a, key, failed());
        }
        assert_eq!(gate.inner.meters.down.get(), 1);
        let (admitted, mut passes) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..5 {
            let (g, admitted) = (gate.clone(), admitted.clone());
            tokio::spawn(async move { admitted.send(g.enter().await).unwrap() });
        }
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(
            passes.try_recv().is_err(),
            "no call before the probe is due"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        let probe = passes.try_recv().expect("the probe is due");
        assert_eq!(probe.pass(), Pass::Probe);
        assert!(passes.try_recv().is_err(), "one probe at a time");
        assert_eq!(gate.inner.meters.probes.get(), 1);
        // The probe fails: the next one is due 2 s later.
        assert_eq!(gate.record(&probe, 0, failed()), Verdict::Outage);
        drop(probe);
        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert!(passes.try_recv().is_err(), "the probes back off");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let probe = passes.try_recv().expect("the second probe");
        // It succeeds: the handler is back and the others pass as the ramp allows.
        assert_eq!(gate.record(&probe, 1, Result::Answered), Verdict::Counted);
        drop(probe);
        assert_eq!(gate.inner.meters.down.get(), 0);
        for _ in 0..3 {
            let a = tokio::time::timeout(Duration::from_secs(1), passes.recv())
                .await
                .expect("admitted after the recovery")
                .unwrap();
            assert_eq!(a.pass(), Pass::Ramp);
            gate.record(&a, 2, Result::Answered);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_fails_together_counts_once() {
        let gate = Gate::new("handler test".into(), policy(), 64, meters());
        // Nine batches of twenty calls on twenty keys each fail: nine failures.
        for batch in 0..9_u64 {
            let calls: Vec<Admission> = (0..20).map(|_| gate.pass_if_up().unwrap()).collect();
            for (i, a) in calls.iter().enumerate() {
                let key = batch * 20 + i as u64;
                let verdict = match i {
                    0 => gate.record(a, key, failed()),
                    _ => gate.shared_failure(a, key, "HTTP 503"),
                };
                assert_eq!(verdict, Verdict::Counted, "batch {batch}, call {i}");
            }
        }
        assert!(gate.is_up(), "nine failures are below the threshold of ten");
        // The tenth takes it down; the calls that failed with it wait, uncounted.
        let calls: Vec<Admission> = (0..3).map(|_| gate.pass_if_up().unwrap()).collect();
        assert_eq!(gate.record(&calls[0], 900, failed()), Verdict::Outage);
        assert_eq!(
            gate.shared_failure(&calls[1], 901, "HTTP 503"),
            Verdict::Outage
        );
        assert_eq!(gate.inner.meters.down.get(), 1);
    }
}
