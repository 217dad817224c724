//! Leaving the group at shutdown, then closing the client, so that librdkafka's close
//! never meets a rebalance in flight.
//!
//! librdkafka's close, when it overlaps a rebalance, can wait forever for an answer to
//! the assignment call it asked for, or abort the process on an assertion (seen on the
//! mock cluster as a stop right after another member left). So the consumer first
//! unsubscribes, serving rebalances as usual (librdkafka postpones the unsubscribe until
//! a rebalance in flight completes), until it holds no partition and has left the group;
//! only then is the client dropped, which closes it, on a thread of its own, for a
//! bounded time.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::time::Instant;

use super::context::Context;

/// How often leaving is checked while rebalances are served.
const CHECK: Duration = Duration::from_millis(20);

/// The deadlines of leaving and closing, from the stop.
pub struct Within {
    /// By when the member has left, or stops waiting for a rebalance in flight to end.
    pub leave_by: Duration,
    /// By when the client has closed, or is left to close while the process ends.
    pub close_by: Duration,
    /// The member has a `group.instance.id`, so it never sends a leave.
    pub static_member: bool,
}

/// Leaves the group, then drops `consumer` on a thread of its own and waits for that, by
/// the deadlines of `within` counted from `stopped`. Offsets must have been committed
/// before: messages handled since the last commit are handled again by the next owner.
pub async fn close(consumer: Arc<StreamConsumer<Context>>, stopped: Instant, within: &Within) {
    consumer.context().leave();
    consumer.unsubscribe();
    let left = tokio::time::timeout_at(stopped + within.leave_by, async {
        while !has_left(&consumer, within.static_member) {
            // Serves the rebalance the unsubscribe waits for, and its revoke; a message
            // of a partition assigned meanwhile is not handled (the next owner reads it).
            tokio::select! {
                _ = consumer.recv() => {}
                _ = tokio::time::sleep(CHECK) => {}
            }
        }
    })
    .await
    .is_ok();
    if left {
        tracing::info!(took = ?stopped.elapsed(), "consumer left the group");
    } else {
        tracing::warn!(
            "the consumer did not leave the group in time (a rebalance still in flight); closing it anyway"
        );
    }
    consumer.context().release_queues();
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    let dropper = std::thread::Builder::new()
        .name("consumer close".into())
        .spawn(move || {
            drop(consumer);
            let _ = closed.send(());
        });
    if let Err(e) = dropper {
        tracing::warn!(error = %e, "no thread to close the consumer on");
        return;
    }
    if tokio::time::timeout_at(stopped + within.close_by, on_close)
        .await
        .is_err()
    {
        tracing::warn!("the Kafka consumer did not close in time; if the process ends first, the group notices this member gone only after session.timeout.ms");
    }
}

/// Whether the member holds no partition and is out of the group: librdkafka forgets
/// the member id when it leaves. A static member (`group.instance.id`) never sends a
/// leave; holding nothing is all it can do.
fn has_left(consumer: &StreamConsumer<Context>, static_member: bool) -> bool {
    let holds_nothing = consumer.assignment().is_ok_and(|a| a.count() == 0);
    holds_nothing && (static_member || member_id(consumer).is_empty())
}

/// The member id librdkafka holds for the group ("" before joining and after leaving).
fn member_id(consumer: &StreamConsumer<Context>) -> String {
    let client = consumer.client().native_ptr();
    // SAFETY: the client is alive while `consumer` is borrowed; librdkafka returns a copy
    // (or NULL without a group), which is freed with its own allocator below.
    unsafe {
        let id = rdkafka::bindings::rd_kafka_memberid(client);
        if id.is_null() {
            return String::new();
        }
        let owned = std::ffi::CStr::from_ptr(id).to_string_lossy().into_owned();
        rdkafka::bindings::rd_kafka_mem_free(client, id.cast());
        owned
    }
}
