//! The lane's decisions, free of I/O: what a batch's first claim leads to, when and how
//! much a lane may claim around a batch in flight, how a cycle of several batches ends,
//! and what the lane does after a cycle. The claim loop ([`super::lane`],
//! [`super::pipeline`]) does the I/O and asks these.

use std::time::Duration;

use backon::ExponentialBackoff;

use super::runtime::BatchEnd;
use super::store::ClaimedRow;

/// What a batch's first claim leads to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterClaim {
    /// No rows: commit the empty claim; the cycle ends so.
    Nothing(BatchEnd),
    /// Send the rows and conclude them, claiming around them if they are slow; the cycle
    /// ends so unless something else happens.
    Alone(BatchEnd),
    /// A full batch: send it while the other session claims the next one; the cycle ends
    /// so.
    Prefetch(BatchEnd),
}

/// Decides on a batch's first claim of `rows` rows. `prefetched`: the claim began in an
/// earlier claim's view of the outbox, so what was committed since waits for a fresh
/// claim, at once. `paired`: the lane has a second session to prefetch with. `stopping`:
/// the lane is stopped, and no next batch is prefetched.
pub(super) fn after_claim(
    rows: usize,
    batch_size: u32,
    prefetched: bool,
    paired: bool,
    stopping: bool,
) -> AfterClaim {
    let full = rows as u32 >= batch_size;
    if rows == 0 {
        return AfterClaim::Nothing(if prefetched {
            BatchEnd::More
        } else {
            BatchEnd::Empty
        });
    }
    let end = if full || prefetched {
        BatchEnd::More
    } else {
        BatchEnd::Partial
    };
    if full && paired && !stopping {
        AfterClaim::Prefetch(end)
    } else {
        AfterClaim::Alone(end)
    }
}

/// Whether a pair of sessions may claim around its batch in flight, and how much. The rows sent and
/// not yet committed never exceed `batch_size`, which bounds the duplicates a crash can
/// cause as with one batch at a time; after a failure, or once the rows come in faster
/// than batches go out, the lane goes back to whole batches.
#[derive(Debug)]
pub(super) struct Overlap {
    allowed: bool,
}

impl Overlap {
    /// Early claims are allowed until something says otherwise.
    pub(super) fn new() -> Self {
        Overlap { allowed: true }
    }

    /// How many rows an early claim beside `in_flight` rows may take; `None` when it
    /// may not claim.
    pub(super) fn limit(&self, batch_size: u32, in_flight: usize) -> Option<u32> {
        let limit = batch_size.saturating_sub(in_flight as u32);
        (self.allowed && limit > 0).then_some(limit)
    }

    /// A batch failed: nothing more is claimed early in this cycle.
    pub(super) fn failed(&mut self) {
        self.allowed = false;
    }

    /// An early claim took `rows` of its `limit`: when it filled it, rows come in faster
    /// than batches go out, and the next cycle claims a whole batch.
    pub(super) fn claimed(&mut self, rows: usize, limit: u32) {
        if rows as u32 >= limit {
            self.allowed = false;
        }
    }
}

/// The keys an early claim leaves out: every key of the batch in flight (a NULL key as
/// the empty one), so that two batches in flight never hold the same key and a row that
/// fails is never overtaken by a later row of its key.
pub(super) fn keys_in_flight(rows: &[ClaimedRow]) -> Vec<&str> {
    rows.iter().map(|r| r.key().unwrap_or("")).collect()
}

/// What happened beside a batch in flight once it concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Beside {
    /// No rows were committed meanwhile, or no early claim was allowed.
    Idle,
    /// Rows were committed, but the batch concluded before it was slow.
    Woken,
    /// The rows committed meanwhile were claimed around it (if there were any, they are
    /// the next batch in flight).
    Claimed,
}

/// How a cycle ends so far once a batch concluded, given its `end` until then and what
/// happened `beside` that batch. Rows committed meanwhile make it end in `More`, so the
/// lane claims again at once rather than at the next poll (an early claim left out the
/// keys in flight, or filled its limit).
pub(super) fn after_conclusion(end: BatchEnd, beside: Beside) -> BatchEnd {
    match beside {
        Beside::Idle => end,
        Beside::Woken | Beside::Claimed => worse(end, BatchEnd::More),
    }
}

/// The end of a cycle of several batches: a Kafka failure over a refusal over the rest,
/// and `More` over `Partial`.
pub(super) fn worse(a: BatchEnd, b: BatchEnd) -> BatchEnd {
    let rank = |e: &BatchEnd| match e {
        BatchEnd::KafkaFailed => 4,
        BatchEnd::Refused => 3,
        BatchEnd::More => 2,
        BatchEnd::Partial => 1,
        BatchEnd::Empty => 0,
    };
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}

/// What a lane does after a cycle.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Then {
    /// Claim again at once.
    Claim,
    /// Wait for rows (a wake-up), new settings or the poll interval.
    Wait,
    /// Wait this long (a stop cuts it short).
    BackOff(Duration),
}

/// The lane's two backoffs, one after Kafka failures and one after refusals; a cycle
/// that ends well resets both.
pub(super) struct Backoffs {
    kafka: ExponentialBackoff,
    refusal: ExponentialBackoff,
}

impl Backoffs {
    pub(super) fn new() -> Self {
        Backoffs {
            kafka: crate::backoff::exponential(),
            refusal: crate::backoff::exponential(),
        }
    }

    /// What the lane does after a cycle that ended in `end`.
    pub(super) fn after(&mut self, end: BatchEnd) -> Then {
        let longest = Duration::from_secs(30);
        match end {
            BatchEnd::More => {
                *self = Backoffs::new();
                Then::Claim
            }
            BatchEnd::Empty | BatchEnd::Partial => {
                *self = Backoffs::new();
                Then::Wait
            }
            BatchEnd::KafkaFailed => Then::BackOff(self.kafka.next().unwrap_or(longest)),
            BatchEnd::Refused => Then::BackOff(self.refusal.next().unwrap_or(longest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::store::Columns;
    use BatchEnd::*;

    #[test]
    fn a_first_claim_prefetches_only_after_a_full_batch_and_not_once_stopped() {
        assert_eq!(
            after_claim(1_000, 1_000, false, true, false),
            AfterClaim::Prefetch(More)
        );
        assert_eq!(
            after_claim(1_000, 1_000, false, true, true),
            AfterClaim::Alone(More),
            "stopping: the batch goes out alone and the lane then stops"
        );
        assert_eq!(
            after_claim(1_000, 1_000, false, false, false),
            AfterClaim::Alone(More),
            "one session: nothing to prefetch with"
        );
        assert_eq!(
            after_claim(10, 1_000, false, true, false),
            AfterClaim::Alone(Partial)
        );
        assert_eq!(
            after_claim(10, 1_000, true, true, false),
            AfterClaim::Alone(More),
            "a short prefetched batch saw an old view: claim again at once"
        );
        assert_eq!(
            after_claim(0, 1_000, false, true, false),
            AfterClaim::Nothing(Empty)
        );
        assert_eq!(
            after_claim(0, 1_000, true, true, false),
            AfterClaim::Nothing(More)
        );
    }

    #[test]
    fn batches_in_flight_together_never_exceed_the_batch_size() {
        let overlap = Overlap::new();
        assert_eq!(overlap.limit(1_000, 10), Some(990));
        assert_eq!(
            overlap.limit(1_000, 1_000),
            None,
            "a full batch leaves no room"
        );
        assert_eq!(
            overlap.limit(1_000, 1_500),
            None,
            "a reload shrank the batch size"
        );
    }

    #[test]
    fn after_a_failure_or_a_filled_early_claim_the_lane_goes_back_to_whole_batches() {
        let mut overlap = Overlap::new();
        overlap.claimed(500, 990);
        assert_eq!(
            overlap.limit(1_000, 500),
            Some(500),
            "room left: go on overlapping"
        );
        overlap.claimed(500, 500);
        assert_eq!(overlap.limit(1_000, 10), None);
        let mut overlap = Overlap::new();
        overlap.failed();
        assert_eq!(
            overlap.limit(1_000, 10),
            None,
            "no row of a later batch overtakes a failed row while it is settled"
        );
    }

    #[test]
    fn an_early_claim_leaves_out_every_key_in_flight_a_null_key_as_the_empty_one() {
        let row = |id: &str, key: Option<&str>| {
            ClaimedRow::new(&Columns {
                id,
                key,
                payload: Some(b"{}"),
                ..Columns::default()
            })
        };
        let rows = [row("1", Some("a")), row("2", None), row("3", Some("b"))];
        assert_eq!(keys_in_flight(&rows), ["a", "", "b"]);
    }

    #[test]
    fn rows_committed_meanwhile_make_the_cycle_claim_again_at_once() {
        assert_eq!(after_conclusion(Partial, Beside::Idle), Partial);
        assert_eq!(after_conclusion(Empty, Beside::Idle), Empty);
        assert_eq!(after_conclusion(Partial, Beside::Woken), More);
        assert_eq!(after_conclusion(Partial, Beside::Claimed), More);
        assert_eq!(
            after_conclusion(KafkaFailed, Beside::Claimed),
            KafkaFailed,
            "a failure still backs the lane off once the batches in flight are done"
        );
    }

    #[test]
    fn a_cycle_of_several_batches_ends_as_its_worst_batch() {
        assert_eq!(worse(Partial, KafkaFailed), KafkaFailed);
        assert_eq!(worse(KafkaFailed, Refused), KafkaFailed);
        assert_eq!(worse(Refused, More), Refused);
        assert_eq!(
            worse(Partial, More),
            More,
            "more rows wait: claim again at once"
        );
        assert_eq!(worse(Empty, Partial), Partial);
        assert_eq!(worse(Empty, Empty), Empty);
    }

    #[test]
    fn failures_back_off_longer_each_time_until_a_cycle_ends_well() {
        let mut b = Backoffs::new();
        let pause = |t: Then| match t {
            Then::BackOff(d) => d,
            other => panic!("expected a backoff, got {other:?}"),
        };
        let first = pause(b.after(KafkaFailed));
        assert!(first <= Duration::from_millis(200), "{first:?}");
        for _ in 0..5 {
            pause(b.after(KafkaFailed));
        }
        let sixth = pause(b.after(KafkaFailed));
        assert!(sixth >= Duration::from_millis(3_200), "{sixth:?}");
        let refusal = pause(b.after(Refused));
        assert!(
            refusal <= Duration::from_millis(200),
            "refusals back off on their own: {refusal:?}"
        );
        assert_eq!(b.after(Partial), Then::Wait);
        assert_eq!(b.after(More), Then::Claim);
        let again = pause(b.after(KafkaFailed));
        assert!(again <= Duration::from_millis(200), "reset: {again:?}");
    }
}
