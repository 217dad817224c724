//! `log`: logs the message at info and succeeds.

use rdkafka::message::Message;

use super::{Event, Outcome};

/// Logs and succeeds.
pub struct LogHandler;

impl LogHandler {
    /// True while the log filter lets this handler's line through. The filter is asked
    /// for this module at info, as for the line itself; the line is logged outside any
    /// span, so a filter directive that names a span cannot tell the two apart.
    pub fn logs(&self) -> bool {
        tracing::enabled!(tracing::Level::INFO)
    }

    /// Logs `event`: nothing to wait for.
    pub fn log(&self, event: &Event) -> Outcome {
        let m = &event.message;
        if !m.headers_read() {
            // Taken while the line was off (see `logs`): its type and id were not read.
            tracing::info!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                key = %event.key(),
                headers_read = false,
                bytes = event.value().len(),
                "event"
            );
            return Outcome::Done;
        }
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
