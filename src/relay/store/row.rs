//! A claimed outbox row: its columns as the message needs them, in two allocations.

/// A claimed outbox row, every column already cast to what the message needs.
///
/// The text columns share one buffer: a row costs two allocations (text and payload)
/// instead of one per column. A lane allocates a batch's rows together and frees them
/// together, the pattern the system allocator handles worst (in a 50,000-row drain,
/// allocating, decoding and freeing rows column by column took about a fifth of the
/// relay's instructions; see BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    text: String,
    id: Span,
    key: Option<Span>,
    headers: Option<Span>,
    event_id: Option<Span>,
    event_type: Option<Span>,
    aggregate_type: Option<Span>,
    topic: Option<Span>,
    /// Message value; NULL makes the row a dead row.
    pub payload: Option<Vec<u8>>,
    /// Creation time as Unix seconds.
    pub created_at: Option<f64>,
}

/// Where a text column lies in [`ClaimedRow`]'s buffer.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// A claimed row's columns as the database answered them, borrowed from its answer.
#[derive(Debug, Default, Clone, Copy)]
pub struct Columns<'a> {
    /// The id column as text.
    pub id: &'a str,
    /// Message key; NULL makes the row a dead row.
    pub key: Option<&'a str>,
    /// Message value; NULL makes the row a dead row.
    pub payload: Option<&'a [u8]>,
    /// The headers JSON object as text.
    pub headers: Option<&'a str>,
    /// The `event-id` header (falls back to `id`).
    pub event_id: Option<&'a str>,
    /// The `event-type` header.
    pub event_type: Option<&'a str>,
    /// The `aggregate-type` header.
    pub aggregate_type: Option<&'a str>,
    /// Creation time as Unix seconds.
    pub created_at: Option<f64>,
    /// The topic, when it comes from `topic_column`.
    pub topic: Option<&'a str>,
}

impl ClaimedRow {
    /// Copies `c` into a row of its own.
    pub fn new(c: &Columns<'_>) -> Self {
        let texts = [
            Some(c.id),
            c.key,
            c.headers,
            c.event_id,
            c.event_type,
            c.aggregate_type,
            c.topic,
        ];
        let mut text = String::with_capacity(texts.iter().flatten().map(|t| t.len()).sum());
        let mut put = |t: &str| {
            let start = text.len();
            text.push_str(t);
            Span {
                start,
                end: text.len(),
            }
        };
        let id = put(c.id);
        let key = c.key.map(&mut put);
        let headers = c.headers.map(&mut put);
        let event_id = c.event_id.map(&mut put);
        let event_type = c.event_type.map(&mut put);
        let aggregate_type = c.aggregate_type.map(&mut put);
        let topic = c.topic.map(&mut put);
        ClaimedRow {
            text,
            id,
            key,
            headers,
            event_id,
            event_type,
            aggregate_type,
            topic,
            payload: c.payload.map(<[u8]>::to_vec),
            created_at: c.created_at,
        }
    }

    fn get(&self, span: Option<Span>) -> Option<&str> {
        span.map(|s| &self.text[s.start..s.end])
    }

    /// The id column as text.
    pub fn id(&self) -> &str {
        &self.text[self.id.start..self.id.end]
    }

    /// Message key; NULL makes the row a dead row.
    pub fn key(&self) -> Option<&str> {
        self.get(self.key)
    }

    /// The headers JSON object as text.
    pub fn headers(&self) -> Option<&str> {
        self.get(self.headers)
    }

    /// The `event-id` header (falls back to `id`).
    pub fn event_id(&self) -> Option<&str> {
        self.get(self.event_id)
    }

    /// The `event-type` header.
    pub fn event_type(&self) -> Option<&str> {
        self.get(self.event_type)
    }

    /// The `aggregate-type` header.
    pub fn aggregate_type(&self) -> Option<&str> {
        self.get(self.aggregate_type)
    }

    /// The topic, when it comes from `topic_column`.
    pub fn topic(&self) -> Option<&str> {
        self.get(self.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gives_back_its_columns_nulls_and_empty_texts_alike() {
        let row = ClaimedRow::new(&Columns {
            id: "42",
            key: Some(""),
            payload: Some(&[0xff, 0]),
            headers: None,
            event_id: Some("e-ü"),
            event_type: None,
            aggregate_type: Some("order"),
            created_at: Some(1.5),
            topic: Some("t"),
        });
        assert_eq!(row.id(), "42");
        assert_eq!(row.key(), Some(""));
        assert_eq!(row.payload.as_deref(), Some(&[0xff, 0][..]));
        assert_eq!(row.headers(), None);
        assert_eq!(row.event_id(), Some("e-ü"));
        assert_eq!(row.event_type(), None);
        assert_eq!(row.aggregate_type(), Some("order"));
        assert_eq!(row.created_at, Some(1.5));
        assert_eq!(row.topic(), Some("t"));
    }
}
