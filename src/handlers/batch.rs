//! Group commit for handlers that apply several events at once: calls that arrive while
//! the handler's batches run wait together, and the next batch takes them all (up to its
//! size), so a busy handler runs few large batches and an idle one answers each call at
//! once. Up to a handler's limit of batches run at a time (each a transaction, or a
//! request, of its own): [`CONCURRENT`], or one where the database has one writer.
//!
//! Calls in flight at the same time are the heads of different key lanes (a lane has one
//! call at a time, and its next starts only once the batch with its last one answered),
//! so no batch, and no two batches running side by side, hold two messages of one key. A
//! batch runs in a task of its own, so a call that stops waiting (the consumer stopping)
//! does not cut a batch short for the others; a batch task that panics leaves its calls
//! (and, when no other task runs, those queued) without an outcome, which they take as a
//! retryable failure that outage detection does not count: it is no downstream's.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use super::Outcome;

/// Batch tasks of one handler running at once, where the downstream takes several: the
/// read-model benchmark's rate rose from 2.8 to 4.5-4.9 times one transaction per event
/// going from one to four (BENCHMARKS.md).
pub const CONCURRENT: usize = 4;

/// Applies a batch: one outcome per item, in order.
pub trait Apply<T>: Send + Sync + 'static {
    /// Applies `items` and says what became of each.
    fn apply(&self, items: Vec<T>) -> impl std::future::Future<Output = Vec<Outcome>> + Send;
}

/// The queue of one handler's calls and the task that runs their batches.
pub struct Batcher<T, A> {
    inner: Arc<Inner<T, A>>,
}

struct Inner<T, A> {
    apply: A,
    size: usize,
    linger: Duration,
    /// Batch tasks that may run at once.
    concurrent: usize,
    state: Mutex<State<T>>,
    /// The queue reached `size` (ends a linger early).
    full: Notify,
}

struct State<T> {
    queue: Vec<(T, oneshot::Sender<Outcome>)>,
    /// Batch tasks running (each takes whatever queues up before it ends).
    running: usize,
}

impl<T: Send + 'static, A: Apply<T>> Batcher<T, A> {
    /// Batches of at most `size` items, the first of which waits up to `linger` for more;
    /// at most `concurrent` at once.
    pub fn new(apply: A, size: usize, linger: Duration, concurrent: usize) -> Self {
        Batcher {
            inner: Arc::new(Inner {
                apply,
                size: size.max(1),
                linger,
                concurrent: concurrent.max(1),
                state: Mutex::new(State {
                    queue: Vec::new(),
                    running: 0,
                }),
                full: Notify::new(),
            }),
        }
    }

    /// Applies `item` in the next batch and returns its outcome.
    pub async fn submit(&self, item: T) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.inner.lock();
            state.queue.push((item, tx));
            if state.queue.len() >= self.inner.size {
                self.inner.full.notify_one();
            }
            let start = state.running < self.inner.concurrent;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            tokio::spawn(run(self.inner.clone()));
        }
        rx.await.unwrap_or_else(|_| {
            let error = "the batch this call was in ended without an outcome".to_owned();
            Outcome::RetryShared(error, None)
        })
    }
}

impl<T, A> Inner<T, A> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while the lock is held leaves the queue consistent (pushes and drains).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs batches until the queue is empty.
async fn run<T: Send + 'static, A: Apply<T>>(inner: Arc<Inner<T, A>>) {
    // On a panic the queued calls are answered (by dropping their senders) and the next
    // call starts a new task.
    let mut guard = Ending {
        inner: &inner,
        ended: false,
    };
    loop {
        if !inner.linger.is_zero() && inner.lock().queue.len() < inner.size {
            let _ = tokio::time::timeout(inner.linger, inner.full.notified()).await;
        }
        let batch = {
            let mut state = inner.lock();
            if state.queue.is_empty() {
                state.running -= 1;
                guard.ended = true;
                break;
            }
            let n = state.queue.len().min(inner.size);
            state.queue.drain(..n).collect::<Vec<_>>()
        };
        let (items, answers): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
        let outcomes = inner.apply.apply(items).await;
        for (answer, outcome) in answers.into_iter().zip(outcomes) {
            // The caller may have stopped waiting; the outcome is then not needed.
            let _ = answer.send(outcome);
        }
    }
}

/// Clears the queue and the running flag of a batch task that did not end normally.
struct Ending<'a, T, A> {
    inner: &'a Inner<T, A>,
    ended: bool,
}

impl<T, A> Drop for Ending<'_, T, A> {
    fn drop(&mut self) {
        if !self.ended {
            let mut state = self.inner.lock();
            state.running -= 1;
            // The other tasks take the queued calls; with none left, they are answered.
            if state.running == 0 {
                state.queue.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each batch's items; item 99 panics.
    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<Vec<u32>>>>);

    impl Apply<u32> for Recorder {
        async fn apply(&self, items: Vec<u32>) -> Vec<Outcome> {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(!items.contains(&99), "a batch task panics");
            self.0.lock().unwrap().push(items.clone());
            items.iter().map(|_| Outcome::Done).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_arrive_while_batches_run_go_together_in_the_next() {
        let recorder = Recorder::default();
        let batcher = Arc::new(Batcher::new(
            recorder.clone(),
            4,
            Duration::ZERO,
            CONCURRENT,
        ));
        // Eleven calls queued before any batch task ran: four, four, three.
        let calls: Vec<_> = (0..11)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Outcome::Done);
        }
        let batches = recorder.0.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9, 10]]
        );
        // Calls one at a time, each while the ones before it run: a batch task each, up
        // to CONCURRENT; then a call waits for the next batch of a running task.
        let mut calls = Vec::new();
        for i in (20..20 + CONCURRENT as u32).chain(40..43) {
            let b = batcher.clone();
            calls.push(tokio::spawn(async move { b.submit(i).await }));
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        for call in calls {
            assert_eq!(call.await.unwrap(), Outcome::Done);
        }
        let batches = recorder.0.lock().unwrap().clone();
        let singles: Vec<Vec<u32>> = (20..20 + CONCURRENT as u32).map(|i| vec![i]).collect();
        assert_eq!(batches[3..3 + CONCURRENT], singles[..]);
        assert_eq!(batches[3 + CONCURRENT..], [vec![40, 41, 42]]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_call_lingers_for_more() {
        let recorder = Recorder::default();
        let batcher = Arc::new(Batcher::new(
            recorder.clone(),
            3,
            Duration::from_millis(5),
            CONCURRENT,
        ));
        let first = {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(1).await })
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        let second = {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(2).await })
        };
        assert_eq!(first.await.unwrap(), Outcome::Done);
        assert_eq!(second.await.unwrap(), Outcome::Done);
        assert_eq!(recorder.0.lock().unwrap().clone(), vec![vec![1, 2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_panics_answers_its_calls_and_the_next_call_goes_on() {
        let recorder = Recorder::default();
        let batcher = Arc::new(Batcher::new(
            recorder.clone(),
            4,
            Duration::ZERO,
            CONCURRENT,
        ));
        let outcome = batcher.submit(99).await;
        assert!(
            matches!(&outcome, Outcome::RetryShared(e, None) if e.contains("without an outcome")),
            "{outcome:?}"
        );
        assert_eq!(batcher.submit(5).await, Outcome::Done);
        assert_eq!(recorder.0.lock().unwrap().clone(), vec![vec![5]]);
    }
}
