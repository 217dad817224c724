//! A consumed message detached from librdkafka: its topic shared with the partition's other
//! messages, its key and value copied once, its headers read once into names that are
//! text and values, so that looking one up is a slice comparison (or not read at all
//! when nothing of its partition reads them). Implements rdkafka's [`Message`] and
//! [`Headers`], so code reads it as it would any message.

use std::sync::Arc;

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, Timestamp};

/// A consumed message, owned.
#[derive(Debug, Clone)]
pub struct Received {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    key: Option<Box<[u8]>>,
    payload: Option<Box<[u8]>>,
    headers: Option<ReceivedHeaders>,
    /// False when the headers were left in librdkafka: `headers` is then None whatever
    /// the message carried.
    headers_read: bool,
}

/// A received message's headers, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedHeaders {
    /// Every header's name, one after the other.
    names: String,
    /// Every header's value, one after the other.
    values: Vec<u8>,
    /// Each header: where its name ends in `names`, and where its value starts and ends in
    /// `values` (none for a header without a value).
    entries: Vec<(u32, Option<(u32, u32)>)>,
}

impl ReceivedHeaders {
    /// Adds a header. A name that is not UTF-8 is kept with its invalid bytes replaced.
    pub fn push(&mut self, name: &[u8], value: Option<&[u8]>) {
        self.names.push_str(&String::from_utf8_lossy(name));
        let value = value.map(|v| {
            let start = self.values.len();
            self.values.extend_from_slice(v);
            (to_u32(start), to_u32(self.values.len()))
        });
        self.entries.push((to_u32(self.names.len()), value));
    }

    /// The headers as a producer takes them.
    pub fn to_owned_headers(&self) -> OwnedHeaders {
        let mut owned = OwnedHeaders::new_with_capacity(self.count());
        for h in self.iter() {
            owned = owned.insert(h);
        }
        owned
    }

    /// The bytes of names and values, as the window's byte bound counts them.
    pub fn bytes(&self) -> usize {
        self.names.len() + self.values.len()
    }
}

/// Offsets within one message's headers (librdkafka bounds a message far below 4 GiB).
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).expect("a message's headers fit in 4 GiB")
}

impl Headers for ReceivedHeaders {
    fn count(&self) -> usize {
        self.entries.len()
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let &(end, value) = self.entries.get(idx)?;
        let start = match idx {
            0 => 0,
            _ => self.entries[idx - 1].0,
        };
        Some(Header {
            key: &self.names[start as usize..end as usize],
            value: value.map(|(a, b)| &self.values[a as usize..b as usize]),
        })
    }
}

impl Received {
    /// A message made of its parts.
    #[cfg(test)]
    pub fn new(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        timestamp: Timestamp,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<ReceivedHeaders>,
    ) -> Self {
        Received {
            topic,
            partition,
            offset,
            timestamp,
            key: key.map(Box::from),
            payload: payload.map(Box::from),
            headers,
            headers_read: true,
        }
    }

    /// Copies `m`, a message of `topic`, out of librdkafka, with its headers if
    /// `with_headers`. They are read with librdkafka's own accessor, so that a header
    /// name that is not UTF-8 becomes text with replacement characters instead of
    /// failing. Reading them is librdkafka parsing them (for the first time: it parses a
    /// message's headers only when asked), which costs more than the rest of a fast
    /// handler's call: a partition that nothing reads headers of leaves them.
    pub fn detach(m: &BorrowedMessage<'_>, topic: &Arc<str>, with_headers: bool) -> Self {
        debug_assert_eq!(m.topic(), &**topic);
        Received {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp(),
            key: m.key().map(Box::from),
            payload: m.payload().map(Box::from),
            headers: if with_headers {
                ReceivedHeaders::of(m)
            } else {
                None
            },
            headers_read: with_headers,
        }
    }

    /// False when the headers were left unread ([`Received::detach`]): the message may
    /// carry headers that [`Message::headers`] does not show.
    pub fn headers_read(&self) -> bool {
        self.headers_read
    }

    /// The headers' bytes, key and value: what the message holds besides its fixed part.
    pub fn bytes(&self) -> usize {
        self.headers.as_ref().map_or(0, ReceivedHeaders::bytes)
            + self.key.as_deref().map_or(0, <[u8]>::len)
            + self.payload.as_deref().map_or(0, <[u8]>::len)
    }
}

impl ReceivedHeaders {
    /// `m`'s headers, if it has any.
    pub fn of(m: &BorrowedMessage<'_>) -> Option<ReceivedHeaders> {
        let mut native = std::ptr::null_mut();
        // SAFETY: `m.ptr()` is a live message for as long as `m` is borrowed; librdkafka
        // returns headers owned by the message, read here before `m` can go.
        let found = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut native) };
        if found != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
            return None;
        }
        // SAFETY: `native` belongs to `m` (above); each name is a NUL-terminated string and
        // each value `size` bytes (or null), both owned by the header list, which outlives
        // the slices (they are copied before `m` can go).
        let header = |idx| unsafe {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0);
            let err = rdsys::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size);
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast(), size));
            Some((name, value))
        };
        // SAFETY: as above.
        let count = unsafe { rdsys::rd_kafka_header_cnt(native) };
        // Sized first, so that the copies allocate once each (a name that is not UTF-8 grows
        // as it is made text, and may allocate again).
        let (mut names, mut values) = (0, 0);
        for (name, value) in (0..count).map_while(header) {
            names += name.len();
            values += value.map_or(0, <[u8]>::len);
        }
        let mut headers = ReceivedHeaders {
            names: String::with_capacity(names),
            values: Vec::with_capacity(values),
            entries: Vec::with_capacity(count),
        };
        for (name, value) in (0..count).map_while(header) {
            headers.push(name, value);
        }
        Some(headers)
    }
}

impl Message for Received {
    type Headers = ReceivedHeaders;

    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        self.payload.as_deref_mut()
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    fn offset(&self) -> i64 {
        self.offset
    }

    fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    fn headers(&self) -> Option<&ReceivedHeaders> {
        self.headers.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_back_in_order_with_their_values() {
        let mut h = ReceivedHeaders::default();
        h.push(b"event-id", Some(b"e1"));
        h.push(b"empty", Some(b""));
        h.push(b"none", None);
        h.push(b"\xffbad", Some(b"v"));
        let read: Vec<_> = h.iter().map(|h| (h.key.to_owned(), h.value)).collect();
        assert_eq!(
            read,
            vec![
                ("event-id".to_owned(), Some(&b"e1"[..])),
                ("empty".to_owned(), Some(&b""[..])),
                ("none".to_owned(), None),
                ("\u{fffd}bad".to_owned(), Some(&b"v"[..])),
            ]
        );
        assert!(h.try_get(4).is_none());
        assert_eq!(h.bytes(), "event-idemptynone\u{fffd}bad".len() + 3);
    }
}
