//! The reconnect/retry backoff shared by relay lanes, LISTEN, dead-letter produce and
//! start-up: exponential from 100 ms doubling to 30 s, with jitter, never giving up.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A fresh backoff sequence.
pub fn exponential() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
