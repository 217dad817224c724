//! `log`: logs the message at info and succeeds.

use rdkafka::message::Message;

use super::{Event, Outcome};

/// Logs and succeeds.
pub struct LogHandler;

impl LogHandler {
    /// Logs `event`: nothing to wait for.
    pub fn log(&self, event: &Event) -> Outcome {
        let m = &event.message;
        tracing::info!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            key = %event.key(),
            event_type = event.event_type().unwrap_or_default(),
            event_id = %event.event_id(),
            bytes = event.value().len(),
            "event"
        );
        Outcome::Done
    }
}
