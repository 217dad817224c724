//! Leaving the group at shutdown, then closing the client, so that librdkafka's close
//! never meets a rebalance in flight.
//!
//! librdkafka's close, when it overlaps a rebalance, can wait forever for an answer to
//! the assignment call it asked for, or abort the process on an assertion (seen on the
//! mock cluster as a stop right after another member left). So the consumer first
//! unsubscribes, serving rebalances as usual (librdkafka postpones the unsubscribe until
//! a rebalance in flight completes), until it holds no partition and has left the group;
//! only then is the client dropped, which closes it, on a thread of its own, for a
//! bounded time. (A static member, and the `consumer` group protocol, are closed at
//! once: see [`Within::leave_first`].)

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
    /// Leave before closing. Not for a static member (`group.instance.id`), whose close
    /// keeps it in the group so that a restart within `session.timeout.ms` moves no
    /// partition, nor under `group.protocol = "consumer"`, where librdkafka keeps the
    /// member id after leaving: their clients are closed at once.
    pub leave_first: bool,
}

impl Within {
    /// Whether a consumer with these librdkafka properties leaves before closing.
    pub fn leaves_first(group_instance_id: Option<&str>, group_protocol: Option<&str>) -> bool {
        group_instance_id.is_none_or(str::is_empty)
            && !group_protocol.is_some_and(|p| p.eq_ignore_ascii_case("consumer"))
    }
}

/// Leaves the group, then drops `consumer` on a thread of its own and waits for that, by
/// the deadlines of `within` counted from `stopped`. Offsets must have been committed
/// before: messages handled since the last commit are handled again by the next owner.
pub async fn close(consumer: Arc<StreamConsumer<Context>>, stopped: Instant, within: &Within) {
    consumer.context().leave();
    if within.leave_first {
        leave(&consumer, stopped + within.leave_by).await;
    }
    consumer.context().release_queues();
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    let dropper = std::thread::Builder::new()
        .name("consumer close".into())
        .spawn(move || {
            // The close happens where the last holder lets go: wait to be it (a worker's
            // read of its commit metadata may still hold the consumer for a while).
            let mut consumer = consumer;
            loop {
                match Arc::try_unwrap(consumer) {
                    Ok(last) => {
                        drop(last);
                        break;
                    }
                    Err(shared) => consumer = shared,
                }
                std::thread::sleep(CHECK);
            }
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

/// Unsubscribes and serves rebalances until the member has left, or `by`.
async fn leave(consumer: &StreamConsumer<Context>, by: Instant) {
    consumer.unsubscribe();
    let left = tokio::time::timeout_at(by, async {
        while !has_left(consumer) {
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
        tracing::info!("consumer left the group");
    } else {
        tracing::warn!(
            "the consumer did not leave the group in time (a rebalance still in flight); closing it anyway"
        );
    }
}

/// Whether the member holds no partition and is out of the group: librdkafka forgets
/// the member id when it sends its leave.
fn has_left(consumer: &StreamConsumer<Context>) -> bool {
    consumer.assignment().is_ok_and(|a| a.count() == 0) && member_id(consumer).is_empty()
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

#[cfg(test)]
mod tests {
    use super::Within;

    #[test]
    fn static_members_and_the_consumer_protocol_close_without_leaving() {
        assert!(Within::leaves_first(None, None));
        assert!(Within::leaves_first(Some(""), Some("classic")));
        assert!(!Within::leaves_first(Some("replica-1"), None));
        assert!(!Within::leaves_first(None, Some("consumer")));
        assert!(!Within::leaves_first(None, Some("CONSUMER")));
    }
}
