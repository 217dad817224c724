//! One partition's offsets: which fetched messages have a final outcome, the offset to
//! commit (the lowest one without), and the commit metadata that carries the rest across
//! a restart or a rebalance: the final offsets above it, and the attempt counts of
//! messages in retry.
//!
//! Metadata format: `ox1.` and then URL-safe base64 (no padding) of varints: the
//! committed offset it belongs to, a form tag and the final offsets above it (tag 0:
//! runs as pairs of gap and length; tag 1: a bitmap from the committed offset), then the
//! number of messages in retry and, for each, its distance from the committed offset and
//! its calls so far. The shorter form is written; a map longer than the broker's limit
//! is left out (the commit then holds the offset alone).

use std::collections::VecDeque;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

const PREFIX: &str = "ox1.";

/// A fetched message's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not final yet; the calls made so far (recorded once it is in retry).
    Open { calls: u32 },
    /// Done, skipped or dead-lettered.
    Final,
}

/// What an earlier owner's commit says of an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prior {
    /// Nothing: handle it.
    Fresh,
    /// It had a final outcome: do not handle it again.
    Final,
    /// It was in retry after this many calls.
    Calls(u32),
}

/// What a commit of this partition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The next offset to read: the lowest one without a final outcome.
    pub offset: i64,
    /// The map of what is final above it; empty when there is nothing to say or it did
    /// not fit.
    pub metadata: String,
    /// The map was left out because it did not fit the limit.
    pub overflowed: bool,
}

/// Offsets an earlier commit recorded, read back when the partition is assigned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Runs of final offsets, `(first, length)`, ascending.
    finals: VecDeque<(i64, u64)>,
    /// Messages in retry, `(offset, calls)`, ascending.
    calls: VecDeque<(i64, u32)>,
}

impl Restored {
    /// Reads the metadata committed with `offset`; None when it is not outboxd's or
    /// belongs to another offset (after an offset reset, say).
    pub fn decode(offset: i64, metadata: &str) -> Option<Restored> {
        let bytes = URL_SAFE_NO_PAD
            .decode(metadata.strip_prefix(PREFIX)?)
            .ok()?;
        let mut r = Reader { bytes: &bytes };
        let base = i64::try_from(r.varint()?).ok()?;
        if base != offset {
            return None;
        }
        let mut finals = VecDeque::new();
        match r.varint()? {
            0 => {
                let mut at = base;
                for _ in 0..r.varint()? {
                    let start = at.checked_add(i64::try_from(r.varint()?).ok()?)?;
                    let len = r.varint()?;
                    at = start.checked_add(i64::try_from(len).ok()?)?;
                    finals.push_back((start, len));
                }
            }
            1 => {
                let bits = r.varint()?;
                let bitmap = r.take(usize::try_from(bits.div_ceil(8)).ok()?)?;
                for i in 0..bits {
                    if bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                        push_offset(&mut finals, base + i as i64);
                    }
                }
            }
            _ => return None,
        }
        let mut calls = VecDeque::new();
        for _ in 0..r.varint()? {
            let at = base.checked_add(i64::try_from(r.varint()?).ok()?)?;
            calls.push_back((at, u32::try_from(r.varint()?).ok()?));
        }
        r.bytes.is_empty().then_some(Restored { finals, calls })
    }

    /// What the commit says of `offset`; offsets must be asked in ascending order (what
    /// lies below is forgotten).
    pub fn take(&mut self, offset: i64) -> Prior {
        while self
            .finals
            .front()
            .is_some_and(|&(s, l)| s + l as i64 <= offset)
        {
            self.finals.pop_front();
        }
        while self.calls.front().is_some_and(|&(o, _)| o < offset) {
            self.calls.pop_front();
        }
        if self.finals.front().is_some_and(|&(s, _)| s <= offset) {
            return Prior::Final;
        }
        match self.calls.front() {
            Some(&(o, n)) if o == offset => Prior::Calls(n),
            _ => Prior::Fresh,
        }
    }

    fn is_empty(&self) -> bool {
        self.finals.is_empty() && self.calls.is_empty()
    }
}

/// One partition's fetched messages from the lowest one without a final outcome on.
#[derive(Debug, Default)]
pub struct Tracker {
    entries: VecDeque<(i64, State)>,
    /// The offset to commit when no entry is open: one past the last final one.
    next: Option<i64>,
    /// What the assignment's commit said of offsets not fetched yet.
    restored: Restored,
}

impl Tracker {
    /// A tracker that continues what `restored` recorded.
    pub fn new(restored: Restored) -> Self {
        Tracker {
            restored,
            ..Tracker::default()
        }
    }

    /// Records a fetched message (offsets ascending) and says what an earlier commit
    /// knew of it; a message already final is recorded as final.
    pub fn fetched(&mut self, offset: i64) -> Prior {
        let prior = if self.restored.is_empty() {
            Prior::Fresh
        } else {
            self.restored.take(offset)
        };
        match prior {
            Prior::Final => {
                if self.entries.is_empty() {
                    self.next = Some(offset + 1);
                } else {
                    self.entries.push_back((offset, State::Final));
                }
            }
            Prior::Fresh => self.entries.push_back((offset, State::Open { calls: 0 })),
            Prior::Calls(calls) => self.entries.push_back((offset, State::Open { calls })),
        }
        prior
    }

    /// Records `offset`'s final outcome.
    pub fn finished(&mut self, offset: i64) {
        if let Some(i) = self.position(offset) {
            self.entries[i].1 = State::Final;
        }
        while let Some(&(o, State::Final)) = self.entries.front() {
            self.entries.pop_front();
            self.next = Some(o + 1);
        }
    }

    /// Records that `offset` is in retry after `calls` calls.
    pub fn retrying(&mut self, offset: i64, calls: u32) {
        if let Some(i) = self.position(offset) {
            self.entries[i].1 = State::Open { calls };
        }
    }

    /// True while the commit the tracker continues names messages in retry not fetched
    /// yet.
    pub fn restores_calls(&self) -> bool {
        !self.restored.calls.is_empty()
    }

    /// Messages fetched above the offset to commit (final or not).
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// What to commit now, with a map of at most `max_metadata` bytes; None before the
    /// first message.
    pub fn commit(&self, max_metadata: usize) -> Option<Commit> {
        let offset = self.entries.front().map(|e| e.0).or(self.next)?;
        let mut finals: Vec<(i64, u64)> = Vec::new();
        let mut calls: Vec<(i64, u32)> = Vec::new();
        for &(o, state) in &self.entries {
            match state {
                State::Final => match finals.last_mut() {
                    Some((s, l)) if *s + *l as i64 == o => *l += 1,
                    _ => finals.push((o, 1)),
                },
                State::Open { calls: n } if n > 0 => calls.push((o, n)),
                State::Open { .. } => {}
            }
        }
        // What the commit read at assignment said of offsets not fetched yet.
        let beyond = self.entries.back().map_or(offset - 1, |e| e.0);
        for &(s, l) in &self.restored.finals {
            let end = s + l as i64;
            if end > beyond + 1 {
                let s = s.max(beyond + 1);
                finals.push((s, (end - s) as u64));
            }
        }
        calls.extend(self.restored.calls.iter().filter(|c| c.0 > beyond));
        if finals.is_empty() && calls.is_empty() {
            return Some(Commit {
                offset,
                metadata: String::new(),
                overflowed: false,
            });
        }
        let metadata = encode(offset, &finals, &calls);
        let overflowed = metadata.len() > max_metadata;
        Some(Commit {
            offset,
            metadata: if overflowed { String::new() } else { metadata },
            overflowed,
        })
    }

    fn position(&self, offset: i64) -> Option<usize> {
        self.entries.binary_search_by_key(&offset, |e| e.0).ok()
    }
}

fn push_offset(runs: &mut VecDeque<(i64, u64)>, o: i64) {
    match runs.back_mut() {
        Some((s, l)) if *s + *l as i64 == o => *l += 1,
        _ => runs.push_back((o, 1)),
    }
}

fn encode(base: i64, finals: &[(i64, u64)], calls: &[(i64, u32)]) -> String {
    let mut runs = Vec::new();
    put(&mut runs, base as u64);
    put(&mut runs, 0);
    put(&mut runs, finals.len() as u64);
    let mut at = base;
    for &(s, l) in finals {
        put(&mut runs, (s - at) as u64);
        put(&mut runs, l);
        at = s + l as i64;
    }
    let mut body = runs;
    if let Some(&(s, l)) = finals.last() {
        let bits = (s + l as i64 - base) as u64;
        // A bitmap costs one byte per eight offsets whatever the pattern; runs cost a few
        // bytes per run: the bitmap wins when final and open offsets alternate.
        if bits.div_ceil(8) + 12 < body.len() as u64 {
            let mut bitmap = Vec::new();
            put(&mut bitmap, base as u64);
            put(&mut bitmap, 1);
            put(&mut bitmap, bits);
            let start = bitmap.len();
            bitmap.resize(start + bits.div_ceil(8) as usize, 0);
            for &(s, l) in finals {
                for o in s..s + l as i64 {
                    let i = (o - base) as usize;
                    bitmap[start + i / 8] |= 1 << (i % 8);
                }
            }
            body = bitmap;
        }
    }
    put(&mut body, calls.len() as u64);
    for &(o, n) in calls {
        put(&mut body, (o - base) as u64);
        put(&mut body, u64::from(n));
    }
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(body))
}

/// LEB128: seven bits a byte, low bits first.
fn put(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first()?;
            self.bytes = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(offsets: std::ops::Range<i64>) -> Tracker {
        let mut t = Tracker::default();
        for o in offsets {
            t.fetched(o);
        }
        t
    }

    fn restore(c: &Commit) -> Tracker {
        Tracker::new(Restored::decode(c.offset, &c.metadata).expect("decodes"))
    }

    #[test]
    fn the_commit_is_the_lowest_offset_without_a_final_outcome() {
        let mut t = tracker(10..20);
        assert_eq!(t.commit(4096).unwrap().offset, 10);
        t.finished(11);
        t.finished(12);
        assert_eq!(t.commit(4096).unwrap().offset, 10, "10 is still open");
        t.finished(10);
        assert_eq!(t.commit(4096).unwrap().offset, 13);
        assert_eq!(t.pending(), 7);
        for o in 13..20 {
            t.finished(o);
        }
        let c = t.commit(4096).unwrap();
        assert_eq!((c.offset, c.metadata.as_str(), t.pending()), (20, "", 0));
        assert!(Tracker::default().commit(4096).is_none(), "nothing fetched");
    }

    #[test]
    fn final_offsets_above_the_commit_survive_a_restart() {
        let mut t = tracker(100..110);
        for o in [101, 102, 105, 109] {
            t.finished(o);
        }
        let c = t.commit(4096).unwrap();
        assert_eq!(c.offset, 100);
        assert!(c.metadata.starts_with("ox1."));
        let mut next = restore(&c);
        let priors: Vec<Prior> = (100..112).map(|o| next.fetched(o)).collect();
        use Prior::{Final as F, Fresh as N};
        assert_eq!(priors, [N, F, F, N, N, F, N, N, N, F, N, N]);
        assert_eq!(next.commit(4096).unwrap().offset, 100);
    }

    #[test]
    fn attempts_in_retry_survive_a_restart() {
        let mut t = tracker(0..5);
        t.finished(0);
        t.retrying(1, 3);
        t.finished(2);
        t.retrying(4, 7);
        let mut next = restore(&t.commit(4096).unwrap());
        assert_eq!(next.fetched(1), Prior::Calls(3));
        assert_eq!(next.fetched(2), Prior::Final);
        assert_eq!(next.fetched(3), Prior::Fresh);
        assert_eq!(next.fetched(4), Prior::Calls(7));
    }

    #[test]
    fn what_was_restored_but_not_fetched_yet_is_committed_again() {
        let mut t = tracker(0..6);
        for o in [2, 3, 5] {
            t.finished(o);
        }
        t.retrying(4, 2);
        let first = t.commit(4096).unwrap();
        // The next owner fetches only 0 and 1 before it commits.
        let mut next = restore(&first);
        next.fetched(0);
        next.fetched(1);
        let again = next.commit(4096).unwrap();
        assert_eq!(again.offset, 0);
        let mut third = restore(&again);
        let priors: Vec<Prior> = (0..6).map(|o| third.fetched(o)).collect();
        use Prior::{Calls as C, Final as F, Fresh as N};
        assert_eq!(priors, [N, N, F, F, C(2), F]);
    }

    #[test]
    fn alternating_outcomes_take_the_bitmap_and_still_fit() {
        let mut t = tracker(0..20_001);
        for o in (2..20_001).step_by(2) {
            t.finished(o);
        }
        let c = t.commit(4096).unwrap();
        assert!(!c.overflowed, "10,000 runs fit as a bitmap");
        assert!(c.metadata.len() < 3500, "{} bytes", c.metadata.len());
        let mut next = restore(&c);
        for o in 0..20_001 {
            let want = if o >= 2 && o % 2 == 0 {
                Prior::Final
            } else {
                Prior::Fresh
            };
            assert_eq!(next.fetched(o), want, "offset {o}");
        }
    }

    #[test]
    fn a_map_that_does_not_fit_leaves_the_offset_alone() {
        let mut t = tracker(0..100);
        for o in (1..100).step_by(2) {
            t.finished(o);
        }
        let c = t.commit(20).unwrap();
        assert_eq!((c.offset, c.metadata.as_str(), c.overflowed), (0, "", true));
        let fits = t.commit(4096).unwrap();
        assert!(!fits.overflowed && !fits.metadata.is_empty());
    }

    #[test]
    fn foreign_or_stale_metadata_is_ignored() {
        let mut t = tracker(5..8);
        t.finished(6);
        let c = t.commit(4096).unwrap();
        assert!(Restored::decode(c.offset, &c.metadata).is_some());
        assert_eq!(Restored::decode(0, &c.metadata), None, "offset was reset");
        assert_eq!(Restored::decode(5, "some other tool's note"), None);
        assert_eq!(Restored::decode(5, "ox1.!!"), None);
        let mut cut = c.metadata.clone();
        cut.pop();
        assert_eq!(Restored::decode(5, &cut), None, "truncated");
    }

    #[test]
    fn finals_restored_at_the_front_advance_the_offset_at_once() {
        let mut t = tracker(0..4);
        t.finished(1);
        t.finished(2);
        let mut next = restore(&t.commit(4096).unwrap());
        next.fetched(0);
        next.finished(0);
        assert_eq!(next.fetched(1), Prior::Final);
        assert_eq!(next.fetched(2), Prior::Final);
        assert_eq!(next.commit(4096).unwrap().offset, 3);
        assert_eq!(next.pending(), 0);
    }
}
