//! The offsets the consumer commits: each partition's worker publishes what it would
//! commit ([`Commit`]: the lowest offset without a final outcome and the map of what is
//! final above it), and this table commits what changed every [`INTERVAL`], on revoke and
//! at shutdown. A partition's entry lives from its assignment to its revocation, so a
//! worker that still finishes a call after losing its partition never commits over the
//! next owner.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::{Commit, Restored};

/// How often changed offsets are committed.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// Identifies one assignment of a partition to this member.
pub type Generation = u64;

struct Entry {
    generation: Generation,
    commit: Option<Commit>,
    dirty: bool,
}

/// Every assigned partition's offsets to commit.
#[derive(Default)]
pub struct Commits {
    entries: Mutex<HashMap<(String, i32), Entry>>,
    generations: std::sync::atomic::AtomicU64,
}

impl Commits {
    /// Opens the entry of a newly assigned partition; its worker publishes with the
    /// generation returned.
    pub fn open(&self, topic: &str, partition: i32) -> Generation {
        let generation = 1 + self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Entry {
            generation,
            commit: None,
            dirty: false,
        };
        self.lock().insert((topic.to_owned(), partition), entry);
        generation
    }

    /// Records what the worker of `generation` would commit now; ignored once the
    /// partition was revoked from it.
    pub fn publish(&self, topic: &str, partition: i32, generation: Generation, commit: Commit) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(&(topic.to_owned(), partition)) else {
            return;
        };
        if e.generation == generation && e.commit.as_ref() != Some(&commit) {
            e.commit = Some(commit);
            e.dirty = true;
        }
    }

    /// Closes the entries of revoked partitions, returning what to commit for them.
    pub fn close(&self, revoked: &TopicPartitionList) -> TopicPartitionList {
        let mut entries = self.lock();
        let mut tpl = TopicPartitionList::new();
        for e in revoked.elements() {
            if let Some(entry) = entries.remove(&(e.topic().to_owned(), e.partition())) {
                add(&mut tpl, e.topic(), e.partition(), entry.commit.as_ref());
            }
        }
        tpl
    }

    /// What changed since the last call (everything with `all`), marked as sent, and the
    /// topics whose map was left out for its size.
    pub fn take(&self, all: bool) -> (TopicPartitionList, Vec<String>) {
        let mut tpl = TopicPartitionList::new();
        let mut overflowed = Vec::new();
        for ((topic, partition), e) in self.lock().iter_mut() {
            if e.dirty || all {
                e.dirty = false;
                if let Some(c) = &e.commit {
                    add(&mut tpl, topic, *partition, Some(c));
                    if c.overflowed {
                        overflowed.push(topic.clone());
                    }
                }
            }
        }
        (tpl, overflowed)
    }

    /// A commit failed: its partitions are committed again at the next interval.
    pub fn failed(&self, offsets: &TopicPartitionList) {
        let mut entries = self.lock();
        for e in offsets.elements() {
            if let Some(entry) = entries.get_mut(&(e.topic().to_owned(), e.partition())) {
                entry.dirty = true;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Entry>> {
        self.entries.lock().expect("commits lock poisoned")
    }
}

fn add(tpl: &mut TopicPartitionList, topic: &str, partition: i32, commit: Option<&Commit>) {
    let Some(c) = commit else { return };
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(c.offset))
        .is_ok()
        && !c.metadata.is_empty()
    {
        if let Some(mut e) = tpl.find_partition(topic, partition) {
            e.set_metadata(&c.metadata);
        }
    }
}

/// Commits `tpl` unless it is empty.
pub fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    tpl: &TopicPartitionList,
    mode: CommitMode,
) -> KafkaResult<()> {
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.commit(tpl, mode)
}

/// What the group last committed for `topic`/`partition`: read when the partition is
/// assigned, so that messages an earlier owner finished are not handled again and
/// attempts go on counting. Anything unreadable counts as nothing (more duplicates,
/// never a loss).
pub fn restore<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> Restored {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(topic, partition, error = %e, "cannot read the committed offset's metadata; messages finished after it are handled again");
            return Restored::default();
        }
    };
    let Some((Offset::Offset(offset), metadata)) =
        crate::kafka::offset_and_metadata(&committed, topic, partition)
    else {
        return Restored::default();
    };
    if metadata.is_empty() {
        return Restored::default();
    }
    match std::str::from_utf8(&metadata)
        .ok()
        .and_then(|m| Restored::decode(offset, m))
    {
        Some(r) => r,
        None => {
            tracing::info!(
                topic,
                partition,
                offset,
                "the committed offset's metadata is not outboxd's; ignored"
            );
            Restored::default()
        }
    }
}
