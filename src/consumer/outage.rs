//! Outage detection per handler, the decisions without I/O and with the time passed in:
//! tells a downstream that is down for everyone from a message that fails on its own. A
//! run of retryable failures with no success between them, from enough different keys
//! within a window, makes the handler down; while down only one probe call runs at a time,
//! the probes backing off; the first success (a probe's, or that of any call still
//! running) brings it back, its calls ramped up from one to `max_in_flight` (slow start:
//! each success admits one more). `gate` puts it in front of a handler's calls.
//!
//! One key failing, or a few, keeps the detector up while the other keys succeed: that is
//! poison, and the message's own retries and the dead letter deal with it.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::OutagePolicy;

/// The most failures remembered (validation keeps `failures` within it).
const REMEMBERED: usize = 1024;

/// What a finished call tells the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result<'a> {
    /// The downstream answered: the call succeeded, or failed for good (a 4xx, a
    /// constraint), which is the message's fault, not the downstream's.
    Answered,
    /// A retryable failure (timeout, connection refused, 5xx, 429, a retryable exit code or
    /// SQL error), with its text and the `Retry-After` it asked for, if any.
    Failed(&'a str, Option<Duration>),
}

/// Whether a failed call uses up one of its message's attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It does: the handler is up (the message may be poison).
    Counted,
    /// It does not: the handler is down, or this failure made it so. The message waits at
    /// the gate again, its budget as it was.
    Outage,
}

/// How a call got through the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The handler is up (or detection is off).
    Open,
    /// One of the calls a recovering handler lets through; counted while it runs.
    Ramp,
    /// The one probe of a handler that is down.
    Probe,
}

/// What the gate said to a waiting message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Go on.
    Admitted(Pass),
    /// Wait for a change, or until this instant (a probe is due) at the latest.
    Wait(Option<Instant>),
}

/// A change of state worth telling operators.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// The handler went down on this evidence.
    Down {
        /// Failed calls in the run that decided it.
        calls: usize,
        /// Different keys among them.
        keys: usize,
        /// The last failure's text.
        error: String,
    },
    /// The handler is back.
    Up {
        /// How long it was down.
        down_for: Duration,
        /// Messages that waited at the gate meanwhile.
        waited: u64,
        /// Probe calls made.
        probes: u64,
    },
}

#[derive(Debug)]
enum Phase {
    Up,
    Down {
        since: Instant,
        next_probe: Instant,
        interval: Duration,
        probing: bool,
        waited: u64,
        probes: u64,
    },
    /// Back, with at most `limit` calls at once until the limit reaches `max_in_flight`.
    Ramping {
        limit: usize,
    },
}

/// One handler's outage state, without I/O.
#[derive(Debug)]
pub struct Detector {
    policy: OutagePolicy,
    max_in_flight: usize,
    phase: Phase,
    /// The current run of failures (time, key), oldest first.
    failures: VecDeque<(Instant, u64)>,
    /// Calls let through while ramping, still running.
    ramp_running: usize,
    /// Counts the outages and ramps: a probe or ramp call that ends after its outage or
    /// ramp did changes nothing of the next one.
    epoch: u64,
    /// Messages waiting at the gate, by ticket (the oldest gets the next probe or ramp
    /// slot, so probes go round the waiting messages).
    waiting: BTreeSet<u64>,
    next_ticket: u64,
}

impl Detector {
    /// A detector that is up.
    pub fn new(policy: OutagePolicy, max_in_flight: usize) -> Self {
        Detector {
            policy,
            max_in_flight: max_in_flight.max(1),
            phase: Phase::Up,
            failures: VecDeque::new(),
            ramp_running: 0,
            epoch: 0,
            waiting: BTreeSet::new(),
            next_ticket: 0,
        }
    }

    /// Takes a new policy (a reload); turning detection off ends an outage.
    pub fn set_policy(&mut self, policy: OutagePolicy) -> Option<Transition> {
        self.policy = policy;
        if !self.policy.enabled && !matches!(self.phase, Phase::Up) {
            self.failures.clear();
            return self.resume(Instant::now(), true);
        }
        None
    }

    /// True while calls pass without waiting.
    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up)
    }

    /// The current outage or ramp, for [`Detector::left`] and [`Detector::record`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether detection is on.
    pub fn enabled(&self) -> bool {
        self.policy.enabled
    }

    /// Up with no failure remembered: a success changes nothing.
    pub fn quiet(&self) -> bool {
        self.is_up() && self.failures.is_empty()
    }

    /// True while the handler is down.
    pub fn is_down(&self) -> bool {
        matches!(self.phase, Phase::Down { .. })
    }

    /// A message starts waiting: its ticket.
    pub fn queue(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.insert(ticket);
        if let Phase::Down { waited, .. } = &mut self.phase {
            *waited += 1;
        }
        ticket
    }

    /// A waiting message gave up (its worker stops); true if it was the first in line.
    pub fn leave(&mut self, ticket: u64) -> bool {
        let first = self.waiting.first() == Some(&ticket);
        self.waiting.remove(&ticket);
        first
    }

    /// Whether the message holding `ticket` may call now.
    pub fn enter(&mut self, ticket: u64, now: Instant) -> Entry {
        let first = self.waiting.first() == Some(&ticket);
        let entry = match &mut self.phase {
            Phase::Up => Entry::Admitted(Pass::Open),
            Phase::Down {
                next_probe,
                probing,
                probes,
                ..
            } => {
                if *probing {
                    Entry::Wait(None)
                } else if now < *next_probe {
                    Entry::Wait(Some(*next_probe))
                } else if first {
                    *probing = true;
                    *probes += 1;
                    Entry::Admitted(Pass::Probe)
                } else {
                    // An older message takes the probe; this one hears of the outcome.
                    Entry::Wait(None)
                }
            }
            Phase::Ramping { limit } => {
                if self.ramp_running < *limit && first {
                    self.ramp_running += 1;
                    Entry::Admitted(Pass::Ramp)
                } else {
                    Entry::Wait(None)
                }
            }
        };
        if matches!(entry, Entry::Admitted(_)) {
            self.waiting.remove(&ticket);
        }
        entry
    }

    /// A call let through with `pass` in `epoch` ended (after [`Detector::record`], or
    /// cut short).
    pub fn left(&mut self, pass: Pass, epoch: u64) {
        if epoch != self.epoch {
            return;
        }
        match pass {
            Pass::Ramp => self.ramp_running = self.ramp_running.saturating_sub(1),
            Pass::Probe => {
                if let Phase::Down { probing, .. } = &mut self.phase {
                    *probing = false;
                }
            }
            Pass::Open => {}
        }
    }

    /// A call of message `key` let through with `pass` ended with `result`.
    pub fn record(
        &mut self,
        pass: Pass,
        epoch: u64,
        key: u64,
        result: Result<'_>,
        now: Instant,
    ) -> (Verdict, Option<Transition>) {
        if !self.policy.enabled {
            return (Verdict::Counted, None);
        }
        let (error, after) = match result {
            Result::Answered => {
                self.failures.clear();
                return (Verdict::Counted, self.resume(now, false));
            }
            Result::Failed(error, after) => (error, after),
        };
        let policy = &self.policy;
        match &mut self.phase {
            Phase::Down {
                next_probe,
                interval,
                probing,
                ..
            } => {
                if pass == Pass::Probe && epoch == self.epoch {
                    *probing = false;
                    *interval = (*interval * 2).min(policy.max_probe_interval);
                    *next_probe = now + (*interval).max(after.unwrap_or_default());
                }
                (Verdict::Outage, None)
            }
            Phase::Up | Phase::Ramping { .. } => {
                let horizon = now.checked_sub(policy.window);
                while let Some(&(at, _)) = self.failures.front() {
                    if horizon.is_some_and(|h| at < h) || self.failures.len() >= REMEMBERED {
                        self.failures.pop_front();
                    } else {
                        break;
                    }
                }
                self.failures.push_back((now, key));
                let calls = self.failures.len();
                if calls < (policy.failures as usize).min(REMEMBERED) {
                    return (Verdict::Counted, None);
                }
                let keys = self
                    .failures
                    .iter()
                    .map(|(_, k)| *k)
                    .collect::<HashSet<u64>>()
                    .len();
                if keys < policy.keys as usize {
                    return (Verdict::Counted, None);
                }
                let interval = policy.probe_interval;
                self.phase = Phase::Down {
                    since: now,
                    next_probe: now + interval.max(after.unwrap_or_default()),
                    interval,
                    probing: false,
                    waited: 0,
                    probes: 0,
                };
                self.ramp_running = 0;
                self.epoch += 1;
                self.failures.clear();
                let down = Transition::Down {
                    calls,
                    keys,
                    error: error.to_owned(),
                };
                (Verdict::Outage, Some(down))
            }
        }
    }

    /// A success: a down handler starts ramping up, a ramping one admits one more call.
    fn resume(&mut self, now: Instant, at_once: bool) -> Option<Transition> {
        match &mut self.phase {
            Phase::Up => None,
            Phase::Ramping { limit } => {
                *limit += 1;
                if *limit >= self.max_in_flight || at_once {
                    self.phase = Phase::Up;
                }
                None
            }
            Phase::Down {
                since,
                waited,
                probes,
                ..
            } => {
                let up = Transition::Up {
                    down_for: now.saturating_duration_since(*since),
                    waited: *waited,
                    probes: *probes,
                };
                self.phase = if at_once || self.max_in_flight <= 1 {
                    Phase::Up
                } else {
                    Phase::Ramping { limit: 1 }
                };
                self.ramp_running = 0;
                self.epoch += 1;
                Some(up)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutagePolicy {
        OutagePolicy::default()
    }

    fn failed() -> Result<'static> {
        Result::Failed("HTTP 503", None)
    }

    #[tokio::test(start_paused = true)]
    async fn one_poison_key_never_opens_it() {
        let mut d = Detector::new(policy(), 16);
        for _ in 0..1000 {
            let (verdict, t) = d.record(Pass::Open, d.epoch(), 7, failed(), Instant::now());
            assert_eq!(verdict, Verdict::Counted);
            assert_eq!(t, None);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!(d.is_up());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_many_keys_in_a_row_open_it() {
        let mut d = Detector::new(policy(), 16);
        for key in 0..9 {
            let (verdict, _) = d.record(Pass::Open, d.epoch(), key % 3, failed(), Instant::now());
            assert_eq!(verdict, Verdict::Counted, "failure {key} counts");
        }
        let (verdict, t) = d.record(Pass::Open, d.epoch(), 9, failed(), Instant::now());
        assert_eq!(verdict, Verdict::Outage, "the tenth failure opens it");
        assert_eq!(
            t,
            Some(Transition::Down {
                calls: 10,
                keys: 4,
                error: "HTTP 503".into()
            })
        );
        assert!(d.is_down());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_starts_the_run_again() {
        let mut d = Detector::new(policy(), 16);
        for round in 0..100 {
            for key in 0..9 {
                d.record(Pass::Open, d.epoch(), key, failed(), Instant::now());
            }
            let (verdict, _) = d.record(
                Pass::Open,
                d.epoch(),
                100 + round,
                Result::Answered,
                Instant::now(),
            );
            assert_eq!(verdict, Verdict::Counted);
        }
        assert!(d.is_up(), "nine failures between successes never open it");
    }

    #[tokio::test(start_paused = true)]
    async fn too_few_keys_keep_it_up() {
        let mut d = Detector::new(policy(), 16);
        for i in 0..500 {
            d.record(Pass::Open, d.epoch(), i % 2, failed(), Instant::now());
        }
        assert!(d.is_up(), "two poison keys are not an outage (keys = 3)");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_are_forgotten() {
        let mut d = Detector::new(policy(), 16);
        for key in 0..50 {
            d.record(Pass::Open, d.epoch(), key, failed(), Instant::now());
            // One failure every 4 s: never ten within 30 s.
            tokio::time::advance(Duration::from_secs(4)).await;
            assert!(d.is_up(), "after failure {key}");
        }
    }

    fn open(d: &mut Detector) {
        for key in 0..10 {
            d.record(Pass::Open, d.epoch(), key, failed(), Instant::now());
        }
        assert!(d.is_down());
    }

    #[tokio::test(start_paused = true)]
    async fn while_down_one_probe_at_a_time_goes_to_the_oldest_waiter_on_a_backed_off_schedule() {
        let mut d = Detector::new(policy(), 16);
        open(&mut d);
        let (a, b, c) = (d.queue(), d.queue(), d.queue());
        let t0 = Instant::now();
        assert_eq!(
            d.enter(a, t0),
            Entry::Wait(Some(t0 + Duration::from_secs(1))),
            "the first probe is due after probe_interval"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(d.enter(b, Instant::now()), Entry::Wait(None), "a is older");
        assert_eq!(d.enter(a, Instant::now()), Entry::Admitted(Pass::Probe));
        assert_eq!(
            d.enter(c, Instant::now()),
            Entry::Wait(None),
            "one probe at a time"
        );
        let (verdict, t) = d.record(Pass::Probe, d.epoch(), 0, failed(), Instant::now());
        assert_eq!(
            (verdict, t),
            (Verdict::Outage, None),
            "a probe costs no attempt"
        );
        d.left(Pass::Probe, d.epoch());
        let a = d.queue();
        // The schedule doubles: 2 s, 4 s, ... up to 30 s.
        let mut intervals = Vec::new();
        let mut order = Vec::new();
        let mut line = VecDeque::from([b, c, a]);
        for _ in 0..8 {
            let started = Instant::now();
            let next = line.pop_front().unwrap();
            let due = match d.enter(next, started) {
                Entry::Wait(Some(due)) => due,
                other => panic!("{other:?}"),
            };
            tokio::time::advance(due - started).await;
            assert_eq!(d.enter(next, Instant::now()), Entry::Admitted(Pass::Probe));
            intervals.push((due - started).as_secs());
            order.push(next);
            d.record(Pass::Probe, d.epoch(), next, failed(), Instant::now());
            d.left(Pass::Probe, d.epoch());
            line.push_back(d.queue());
        }
        assert_eq!(intervals, [2, 4, 8, 16, 30, 30, 30, 30]);
        assert_eq!(
            &order[..3],
            &[b, c, a],
            "probes go round the waiting messages"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_ending_after_its_outage_does_not_free_the_next_outages_probe() {
        let mut d = Detector::new(policy(), 16);
        open(&mut d);
        let old = d.queue();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(d.enter(old, Instant::now()), Entry::Admitted(Pass::Probe));
        let stale = d.epoch();
        // A call from before the outage succeeds: back; then the handler fails again.
        d.record(Pass::Open, 0, 0, Result::Answered, Instant::now());
        open(&mut d);
        let (p2, p3) = (d.queue(), d.queue());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(d.enter(p2, Instant::now()), Entry::Admitted(Pass::Probe));
        // The first outage's probe ends now.
        d.record(Pass::Probe, stale, 0, failed(), Instant::now());
        d.left(Pass::Probe, stale);
        assert_eq!(
            d.enter(p3, Instant::now()),
            Entry::Wait(None),
            "still one probe at a time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_delays_the_next_probe() {
        let mut d = Detector::new(policy(), 16);
        for key in 0..9 {
            d.record(Pass::Open, d.epoch(), key, failed(), Instant::now());
        }
        let now = Instant::now();
        d.record(
            Pass::Open,
            d.epoch(),
            9,
            Result::Failed("HTTP 503", Some(Duration::from_secs(20))),
            now,
        );
        let t = d.queue();
        assert_eq!(
            d.enter(t, now),
            Entry::Wait(Some(now + Duration::from_secs(20)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_ramps_calls_up_to_max_in_flight() {
        let mut d = Detector::new(policy(), 4);
        open(&mut d);
        let tickets: Vec<u64> = (0..6).map(|_| d.queue()).collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            d.enter(tickets[0], Instant::now()),
            Entry::Admitted(Pass::Probe)
        );
        let (verdict, t) = d.record(Pass::Probe, d.epoch(), 0, Result::Answered, Instant::now());
        assert_eq!(verdict, Verdict::Counted);
        assert!(matches!(
            t,
            Some(Transition::Up {
                waited: 6,
                probes: 1,
                ..
            })
        ));
        d.left(Pass::Probe, d.epoch());
        assert!(!d.is_down() && !d.is_up(), "ramping");
        assert_eq!(
            d.enter(tickets[1], Instant::now()),
            Entry::Admitted(Pass::Ramp)
        );
        assert_eq!(
            d.enter(tickets[2], Instant::now()),
            Entry::Wait(None),
            "one call at a time at first"
        );
        d.record(Pass::Ramp, d.epoch(), 1, Result::Answered, Instant::now());
        d.left(Pass::Ramp, d.epoch());
        assert_eq!(
            d.enter(tickets[2], Instant::now()),
            Entry::Admitted(Pass::Ramp)
        );
        assert_eq!(
            d.enter(tickets[3], Instant::now()),
            Entry::Admitted(Pass::Ramp),
            "two now"
        );
        assert_eq!(d.enter(tickets[4], Instant::now()), Entry::Wait(None));
        d.record(Pass::Ramp, d.epoch(), 2, Result::Answered, Instant::now());
        d.record(Pass::Ramp, d.epoch(), 3, Result::Answered, Instant::now());
        assert!(d.is_up(), "the limit reached max_in_flight");
        assert_eq!(
            d.enter(tickets[4], Instant::now()),
            Entry::Admitted(Pass::Open)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn turned_off_it_counts_every_failure_and_ends_an_outage() {
        let mut d = Detector::new(policy(), 16);
        open(&mut d);
        let t = d.set_policy(OutagePolicy {
            enabled: false,
            ..policy()
        });
        assert!(matches!(t, Some(Transition::Up { .. })));
        assert!(d.is_up());
        for key in 0..100 {
            assert_eq!(
                d.record(Pass::Open, d.epoch(), key, failed(), Instant::now())
                    .0,
                Verdict::Counted
            );
        }
    }
}
