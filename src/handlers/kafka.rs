//! `kafka`: forwards key, value and headers to another topic and awaits Kafka's ack.

use std::sync::Arc;

use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;

use super::{ErrorClass, Event, Handle, Outcome};
use crate::config::KafkaHandlerConfig;
use crate::kafka::ProducerSlot;

/// Forwards to `topic`.
pub struct KafkaHandler {
    topic: String,
    producer: Arc<ProducerSlot>,
}

impl KafkaHandler {
    /// A forwarder to the configured topic.
    pub fn new(c: &KafkaHandlerConfig, producer: Arc<ProducerSlot>) -> Self {
        KafkaHandler {
            topic: c.topic.clone(),
            producer,
        }
    }
}

impl Handle for KafkaHandler {
    async fn handle(&self, event: &Event, _attempt: u32) -> Outcome {
        let m = &event.message;
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(value) = m.payload() {
            record = record.payload(value);
        }
        if let Some(headers) = m.headers() {
            record = record.headers(headers.to_owned_headers());
        }
        let producer = self.producer.get();
        let sent = match producer.send_result(record) {
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => return Outcome::Done,
                Ok(Err((e, _))) => e,
                Err(_) => return Outcome::Retry("producer dropped the message".into()),
            },
            Err((e, _)) => e,
        };
        self.producer.renew_if_fatal(&producer);
        if crate::kafka::is_refusal(&sent) {
            Outcome::DeadLetter(
                ErrorClass::Permanent,
                format!("kafka refused it for {}: {sent}", self.topic),
            )
        } else {
            Outcome::Retry(format!("producing to {}: {sent}", self.topic))
        }
    }
}
