//! Lanes: the messages of one lane (a key, a partition, or each message alone, as
//! `consumer.ordering` says) are delivered one at a time in offset order, lanes side by
//! side. A lane exists while one of its messages is in delivery; later ones wait in it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use rdkafka::message::Message;

use crate::config::Ordering;
use crate::handlers::Received;

/// A lane's identity. Keys are hashed to it; two keys that share a hash share a lane
/// (they are then delivered one after the other, which keeps each key's order).
pub type LaneId = u64;

/// Maps a message to its lane.
pub struct Laning {
    ordering: Ordering,
    hasher: std::hash::RandomState,
}

impl Laning {
    /// Lanes for `ordering`.
    pub fn new(ordering: Ordering) -> Self {
        Laning {
            ordering,
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The lane of `m`. Messages without a key share one lane in key mode.
    pub fn lane(&self, m: &Received) -> LaneId {
        match self.ordering {
            Ordering::Key => self.hasher.hash_one(m.key()),
            Ordering::Partition => 0,
            Ordering::None => m.offset() as u64,
        }
    }
}

/// The lanes in delivery, with the messages waiting behind each one's head.
pub struct Lanes<T> {
    waiting: HashMap<LaneId, VecDeque<T>, BuildHasherDefault<Spread>>,
}

/// How `Lanes` hashes a lane id: ids are hashes of keys already (or offsets, or 0), so one
/// multiplication spreads them over the table instead of a second SipHash, which cost more
/// than the rest of a `log` call.
#[derive(Default)]
pub struct Spread(u64);

impl Hasher for Spread {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        // The table picks buckets by the low bits, which a product takes from the low bits
        // alone: rotated, offsets a fixed stride apart spread too.
        self.0.rotate_left(26)
    }
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            waiting: HashMap::default(),
        }
    }
}

impl<T> Lanes<T> {
    /// True when `lane` has a message in delivery.
    #[cfg(test)]
    pub fn busy(&self, lane: LaneId) -> bool {
        self.waiting.contains_key(&lane)
    }

    /// A message for `lane`: returned to be delivered now if the lane was free (it is
    /// busy from now on), else queued behind the one in delivery.
    pub fn admit(&mut self, lane: LaneId, item: T) -> Option<T> {
        match self.waiting.get_mut(&lane) {
            Some(queue) => {
                queue.push_back(item);
                None
            }
            None => {
                self.waiting.insert(lane, VecDeque::new());
                Some(item)
            }
        }
    }

    /// `lane`'s message in delivery is final: its next one to deliver, if any (else the
    /// lane is free).
    pub fn next(&mut self, lane: LaneId) -> Option<T> {
        let queue = self.waiting.get_mut(&lane)?;
        let next = queue.pop_front();
        if next.is_none() {
            self.waiting.remove(&lane);
        }
        next
    }

    /// Lanes with a message in delivery.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when no lane is busy.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_delivers_one_message_at_a_time_in_order() {
        let mut lanes = Lanes::default();
        assert_eq!(lanes.admit(1, "a1"), Some("a1"));
        assert_eq!(lanes.admit(1, "a2"), None, "a1 is in delivery");
        assert_eq!(lanes.admit(2, "b1"), Some("b1"), "another lane goes on");
        assert_eq!(lanes.admit(1, "a3"), None);
        assert_eq!(lanes.next(1), Some("a2"));
        assert_eq!(lanes.next(1), Some("a3"));
        assert!(lanes.busy(1));
        assert_eq!(lanes.next(1), None);
        assert!(!lanes.busy(1), "free once its last message is final");
        assert_eq!(lanes.len(), 1);
        assert_eq!(lanes.next(2), None);
        assert!(lanes.is_empty());
        assert_eq!(
            lanes.admit(1, "a4"),
            Some("a4"),
            "a free lane delivers at once"
        );
    }

    fn message(key: Option<&str>, offset: i64) -> Received {
        Received::new(
            "t".into(),
            0,
            offset,
            rdkafka::Timestamp::NotAvailable,
            key.map(str::as_bytes),
            None,
            None,
        )
    }

    #[test]
    fn orderings_map_messages_to_lanes() {
        let key = Laning::new(Ordering::Key);
        let (a1, a2, b) = (
            message(Some("a"), 1),
            message(Some("a"), 2),
            message(Some("b"), 3),
        );
        assert_eq!(key.lane(&a1), key.lane(&a2));
        assert_ne!(key.lane(&a1), key.lane(&b));
        let (n1, n2) = (message(None, 4), message(None, 5));
        assert_eq!(
            key.lane(&n1),
            key.lane(&n2),
            "keyless messages share a lane"
        );
        assert_ne!(
            key.lane(&n1),
            key.lane(&message(Some(""), 6)),
            "an empty key is a key"
        );
        let partition = Laning::new(Ordering::Partition);
        assert_eq!(partition.lane(&a1), partition.lane(&b));
        let none = Laning::new(Ordering::None);
        assert_ne!(none.lane(&a1), none.lane(&a2));
    }
}
