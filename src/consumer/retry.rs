//! Retry decisions: exponential backoff with full jitter (a uniformly random delay between
//! zero and the exponential bound), bounded by attempts and by elapsed time.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

use crate::config::RetryPolicy;

/// The retry state of one message.
pub struct Retrier {
    policy: RetryPolicy,
    bounds: ExponentialBackoff,
    started: Instant,
}

impl std::fmt::Debug for Retrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrier")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Sleep this long, then try again.
    RetryAfter(Duration),
    /// The policy is exhausted.
    GiveUp,
}

impl Retrier {
    /// After a message's first attempt failed, which took `first` (the retry clock counts
    /// from its start).
    #[cfg(test)]
    pub fn new(policy: &RetryPolicy, first: Duration) -> Self {
        Self::resumed(policy, first, 1)
    }

    /// Made only after a failure, so that a message handled at once pays nothing: after a
    /// failed attempt that took `last` and brought the calls made to `attempts`,
    /// counting those of an earlier process: the delays go on growing from where they
    /// were, and the retry clock counts from this process's first call.
    pub fn resumed(policy: &RetryPolicy, last: Duration, attempts: u32) -> Self {
        let now = Instant::now();
        let mut bounds = ExponentialBuilder::default()
            .with_min_delay(policy.initial)
            .with_factor(policy.multiplier as f32)
            .with_max_delay(policy.max_delay)
            .without_max_times()
            .build();
        for _ in 1..attempts.min(64) {
            bounds.next();
        }
        Retrier {
            bounds,
            policy: policy.clone(),
            started: now.checked_sub(last).unwrap_or(now),
        }
    }

    /// Leaves `d` out of the retry clock: time the message spent waiting while its
    /// handler was down does not use up `max_elapsed`.
    pub fn exclude(&mut self, d: Duration) {
        self.started += d;
    }

    /// After a retryable failure that brought the message's calls to `calls` (the job
    /// owns the count): the jittered delay before the next attempt (no less than `after`,
    /// what the downstream asked for, capped by `max_delay`), or give up when the attempts
    /// are used up or the delay would end past `max_elapsed`.
    pub fn next(&mut self, calls: u32, after: Option<Duration>) -> Next {
        if calls >= self.policy.max_attempts {
            return Next::GiveUp;
        }
        let bound = self.bounds.next().unwrap_or(self.policy.max_delay);
        let delay = bound.mul_f64(fastrand::f64());
        let delay = match after {
            Some(after) => delay.max(after.min(self.policy.max_delay)),
            None => delay,
        };
        if self.started.elapsed() + delay > self.policy.max_elapsed {
            return Next::GiveUp;
        }
        Next::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            max_attempts: 6,
            max_elapsed: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_stay_within_growing_bounds_and_attempts_are_limited() {
        let mut r = Retrier::new(&policy(), Duration::ZERO);
        let bounds = [100, 200, 400, 800, 1000];
        let mut calls = 1;
        for bound in bounds {
            match r.next(calls, None) {
                Next::RetryAfter(d) => {
                    assert!(d <= Duration::from_millis(bound), "{d:?} > {bound} ms")
                }
                Next::GiveUp => panic!("gave up early"),
            }
            calls += 1;
        }
        assert_eq!(calls, 6);
        assert_eq!(
            r.next(calls, None),
            Next::GiveUp,
            "max_attempts = 6 allows six calls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_delays_over_the_whole_range() {
        let p = RetryPolicy {
            max_attempts: 10_000,
            max_delay: Duration::from_millis(100),
            initial: Duration::from_millis(100),
            ..policy()
        };
        let mut r = Retrier::new(&p, Duration::ZERO);
        let delays: Vec<Duration> = (0..2000)
            .map(|calls| match r.next(calls, None) {
                Next::RetryAfter(d) => d,
                Next::GiveUp => panic!("gave up"),
            })
            .collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(
            delays.iter().any(|d| *d < Duration::from_millis(20)),
            "full jitter reaches low delays"
        );
        assert!(
            delays.iter().any(|d| *d > Duration::from_millis(80)),
            "and high ones"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_time_limits_retries() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(3),
            max_attempts: 1000,
            ..policy()
        };
        let first = Duration::from_secs(1);
        tokio::time::sleep(first).await;
        let mut r = Retrier::new(&p, first);
        let mut slept = first;
        let mut calls = 1;
        while let Next::RetryAfter(d) = r.next(calls, None) {
            tokio::time::sleep(d).await;
            slept += d;
            calls += 1;
        }
        assert!(slept <= Duration::from_secs(3), "slept {slept:?}");
        assert!(calls > 3, "retried until the time was used up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_message_keeps_its_count_and_its_grown_delays() {
        let mut r = Retrier::resumed(&policy(), Duration::ZERO, 4);
        match r.next(4, None) {
            Next::RetryAfter(d) => assert!(d <= Duration::from_millis(800), "{d:?}"),
            Next::GiveUp => panic!("two calls are left"),
        }
        assert!(matches!(r.next(5, None), Next::RetryAfter(_)));
        assert_eq!(r.next(6, None), Next::GiveUp, "six calls in all");
        let mut spent = Retrier::resumed(&policy(), Duration::ZERO, 6);
        assert_eq!(spent.next(6, None), Next::GiveUp);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_sets_the_least_delay_up_to_max_delay() {
        let mut r = Retrier::new(&policy(), Duration::ZERO);
        assert_eq!(
            r.next(1, Some(Duration::from_millis(700))),
            Next::RetryAfter(Duration::from_millis(700)),
            "the first bound is 100 ms; the downstream asked for 700"
        );
        assert_eq!(
            r.next(2, Some(Duration::from_secs(3600))),
            Next::RetryAfter(Duration::from_secs(1)),
            "capped by max_delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn time_excluded_does_not_use_up_max_elapsed() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(3),
            max_attempts: 1000,
            ..policy()
        };
        let mut r = Retrier::new(&p, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            r.next(1, None),
            Next::GiveUp,
            "a minute is past max_elapsed"
        );
        let mut r = Retrier::new(&p, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(60)).await;
        r.exclude(Duration::from_secs(60));
        assert!(
            matches!(r.next(1, None), Next::RetryAfter(_)),
            "a minute waiting for a downstream outage is not counted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_attempt_that_used_the_time_up_is_not_retried() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(3),
            ..policy()
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut r = Retrier::new(&p, Duration::from_secs(3));
        assert_eq!(r.next(1, None), Next::GiveUp);
    }
}
