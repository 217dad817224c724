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
    header_columns: Option<Span>,
    /// Message value; NULL makes the row a dead row (or a tombstone, as configured).
    pub payload: Option<Vec<u8>>,
    /// Creation time as Unix seconds.
    pub created_at: Option<f64>,
    /// Why a column of this row could not be read (not UTF-8, an unexpected type): the row
    /// becomes a dead row with this reason.
    pub unreadable: Option<String>,
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
    /// The `header_columns` as a JSON object of header name to value.
    pub header_columns: Option<&'a str>,
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
            c.header_columns,
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
        let header_columns = c.header_columns.map(&mut put);
        ClaimedRow {
            text,
            id,
            key,
            headers,
            event_id,
            event_type,
            aggregate_type,
            topic,
            header_columns,
            payload: c.payload.map(<[u8]>::to_vec),
            created_at: c.created_at,
            unreadable: None,
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

    /// The `header_columns` as a JSON object of header name to value.
    pub fn header_columns(&self) -> Option<&str> {
        self.get(self.header_columns)
    }
}

/// Reads a claimed row's columns one by one. A column that cannot be decoded (not
/// UTF-8, an unexpected type) reads as NULL and the first such problem is kept, so that the
/// row becomes a dead row instead of failing its whole batch, and the rows after it flow.
pub struct Lenient<'r, R> {
    row: &'r R,
    problem: Option<String>,
}

impl<'r, R: sqlx::Row> Lenient<'r, R>
where
    usize: sqlx::ColumnIndex<R>,
{
    /// Reads `row`.
    pub fn new(row: &'r R) -> Self {
        Lenient { row, problem: None }
    }

    /// Column `index` (`what` names it in the reason), type-checked.
    pub fn get<T>(&mut self, index: usize, what: &str) -> T
    where
        T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database> + Default,
    {
        let read = self.row.try_get(index);
        self.keep(read, what)
    }

    /// Column `index`, decoded without checking the declared type (the statement casts it).
    pub fn get_unchecked<T>(&mut self, index: usize, what: &str) -> T
    where
        T: sqlx::Decode<'r, R::Database> + Default,
    {
        let read = self.row.try_get_unchecked(index);
        self.keep(read, what)
    }

    /// A text column; with `as_bytes`, one the database hands over as bytes (a binary
    /// column, which a cast to text would change without a word), checked for UTF-8 here.
    pub fn get_text(&mut self, index: usize, as_bytes: bool, what: &str) -> Option<&'r str>
    where
        Option<&'r str>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<&'r [u8]>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        if !as_bytes {
            return self.get(index, what);
        }
        let bytes: Option<&'r [u8]> = self.get(index, what);
        match bytes.map(std::str::from_utf8) {
            Some(Ok(text)) => Some(text),
            Some(Err(e)) => {
                let read = Err(sqlx::Error::Decode(Box::new(e)));
                self.keep::<Option<&str>>(read, what)
            }
            None => None,
        }
    }

    fn keep<T: Default>(&mut self, read: Result<T, sqlx::Error>, what: &str) -> T {
        read.unwrap_or_else(|e| {
            if self.problem.is_none() {
                self.problem = Some(format!("{what} cannot be read: {e}"));
            }
            T::default()
        })
    }

    /// `row` with the problem found, if any.
    pub fn finish(self, mut row: ClaimedRow) -> ClaimedRow {
        row.unreadable = self.problem;
        row
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
            header_columns: Some("{\"tenant\":\"a\"}"),
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
        assert_eq!(row.header_columns(), Some("{\"tenant\":\"a\"}"));
    }
}
