//! Tuples of the stream as outbox rows: which value of a relation's tuple is which column
//! of the table's mapping, and the text forms PostgreSQL sends turned into what a message
//! needs (a `bytea` payload's hex into bytes, a time into Unix seconds).

use super::pgoutput::{Relation, Value};
use crate::config::TableConfig;
use crate::relay::store::{ClaimedRow, Columns, EPOCH_MILLIS_ABOVE};

/// Type OIDs whose text form needs more than a copy.
const BYTEA: u32 = 17;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMBERS: [u32; 6] = [20, 21, 23, 700, 701, 1700];

/// A relation's tuple positions of the mapped columns.
#[derive(Debug, Clone)]
pub struct RowReader {
    id: usize,
    key: usize,
    payload: (usize, u32),
    headers: Option<usize>,
    event_id: Option<usize>,
    event_type: Option<usize>,
    aggregate_type: Option<usize>,
    created_at: Option<(usize, u32)>,
    topic: Option<usize>,
    header_columns: Vec<(String, usize, u32)>,
    names: Vec<(String, u32)>,
}

/// A relation that lacks a mapped column.
#[derive(Debug, Clone, thiserror::Error)]
#[error("table `{schema}.{table}` has no column `{column}` (relay.tables.{key})")]
pub struct MissingColumn {
    schema: String,
    table: String,
    column: String,
    key: &'static str,
}

impl RowReader {
    /// The reader of `relation`'s tuples under mapping `t`.
    pub fn new(relation: &Relation, t: &TableConfig) -> Result<Self, MissingColumn> {
        let find = |name: &str, key: &'static str| {
            relation
                .columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| MissingColumn {
                    schema: relation.schema.clone(),
                    table: relation.name.clone(),
                    column: name.to_owned(),
                    key,
                })
        };
        let typed = |i: usize| (i, relation.columns[i].type_oid);
        let optional = |c: Option<&crate::config::Column>, key| c.map(|c| find(c, key)).transpose();
        let mut header_columns = Vec::new();
        for (header, column) in &t.header_columns {
            let i = find(column, "header_columns")?;
            header_columns.push((header.clone(), i, relation.columns[i].type_oid));
        }
        Ok(RowReader {
            id: find(&t.id_column, "id_column")?,
            key: find(&t.key_column, "key_column")?,
            payload: typed(find(&t.payload_column, "payload_column")?),
            headers: optional(t.headers_column.as_ref(), "headers_column")?,
            event_id: optional(t.event_id_column.as_ref(), "event_id_column")?,
            event_type: optional(t.event_type_column.as_ref(), "event_type_column")?,
            aggregate_type: optional(t.aggregate_type_column.as_ref(), "aggregate_type_column")?,
            created_at: optional(t.created_at_column.as_ref(), "created_at_column")?.map(typed),
            topic: optional(t.topic_column.as_ref(), "topic_column")?,
            header_columns,
            names: relation
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_oid))
                .collect(),
        })
    }

    /// `values` as a row. A value that cannot be read (not UTF-8, a payload's hex that does
    /// not decode, a time that does not parse) makes the row a dead row with the reason.
    pub fn read(&self, values: &[Value<'_>]) -> ClaimedRow {
        let mut problem: Option<String> = None;
        let mut text = |i: usize, what: &str| -> Option<&str> {
            match values.get(i).copied().unwrap_or(Value::Null) {
                Value::Text(bytes) => match std::str::from_utf8(bytes) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        problem.get_or_insert_with(|| format!("{what} cannot be read: {e}"));
                        None
                    }
                },
                Value::Null | Value::Unchanged => None,
            }
        };
        let id = text(self.id, "id_column").unwrap_or_default();
        let key = text(self.key, "key_column");
        let headers = self.headers.and_then(|i| text(i, "headers_column"));
        let event_id = self.event_id.and_then(|i| text(i, "event_id_column"));
        let event_type = self.event_type.and_then(|i| text(i, "event_type_column"));
        let aggregate_type = self
            .aggregate_type
            .and_then(|i| text(i, "aggregate_type_column"));
        let topic = self.topic.and_then(|i| text(i, "topic_column"));
        let created = self
            .created_at
            .and_then(|(i, oid)| text(i, "created_at_column").map(|t| (t, oid)));
        let header_texts: Vec<_> = self
            .header_columns
            .iter()
            .map(|(name, i, oid)| (name, text(*i, "header_columns"), *oid))
            .collect();
        // A JSON array of the values, in `header_columns` order (as the claims give it).
        let header_columns = (!self.header_columns.is_empty()).then(|| {
            let values: Vec<serde_json::Value> = header_texts
                .into_iter()
                .map(|(_, value, oid)| match (value, oid) {
                    (None, _) => serde_json::Value::Null,
                    (Some(v), JSON | JSONB) => serde_json::from_str(v)
                        .unwrap_or_else(|_| serde_json::Value::String(v.to_owned())),
                    (Some(v), _) => serde_json::Value::String(v.to_owned()),
                })
                .collect();
            serde_json::Value::Array(values).to_string()
        });
        let created_at = match created {
            None => None,
            Some((t, oid)) => match created_seconds(t, oid) {
                Some(s) => Some(s),
                None => {
                    problem.get_or_insert_with(|| {
                        format!("created_at_column cannot be read: `{t}` is neither a time nor a number")
                    });
                    None
                }
            },
        };
        let (payload_at, payload_oid) = self.payload;
        let payload = match values.get(payload_at).copied().unwrap_or(Value::Null) {
            Value::Text(bytes) if payload_oid == BYTEA => match unhex(bytes) {
                Some(b) => Some(b),
                None => {
                    problem.get_or_insert_with(|| {
                        "payload_column cannot be read: not bytea's hex form".to_owned()
                    });
                    None
                }
            },
            Value::Text(bytes) => Some(bytes.to_vec()),
            Value::Null | Value::Unchanged => None,
        };
        let mut row = ClaimedRow::new(&Columns {
            id,
            key,
            payload: None,
            headers,
            event_id,
            event_type,
            aggregate_type,
            created_at,
            topic,
            header_columns: header_columns.as_deref(),
        });
        row.payload = payload;
        row.unreadable = problem;
        row
    }

    /// The whole tuple as a JSON object of column name to value (text, or the JSON itself
    /// for `json`/`jsonb` columns), kept with a dead row.
    pub fn row_data(&self, values: &[Value<'_>]) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        for ((name, oid), value) in self.names.iter().zip(values) {
            let json = match value {
                Value::Null | Value::Unchanged => serde_json::Value::Null,
                Value::Text(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    match *oid {
                        JSON | JSONB => serde_json::from_str(&text)
                            .unwrap_or_else(|_| serde_json::Value::String(text.into_owned())),
                        _ => serde_json::Value::String(text.into_owned()),
                    }
                }
            };
            object.insert(name.clone(), json);
        }
        serde_json::Value::Object(object)
    }
}

/// Unix seconds of a created-at value: a time (ISO text, as the replication session's
/// `DateStyle = ISO` writes it) or a number of epoch seconds or milliseconds.
fn created_seconds(text: &str, oid: u32) -> Option<f64> {
    match oid {
        TIMESTAMP | TIMESTAMPTZ => iso_seconds(text),
        o if NUMBERS.contains(&o) => {
            let n: f64 = text.parse().ok()?;
            Some(if n > EPOCH_MILLIS_ABOVE {
                n / 1000.0
            } else {
                n
            })
        }
        _ => None,
    }
}

/// Unix seconds of `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]]` (no offset: UTC; `T`
/// for the space and `Z` for the offset as in RFC 3339).
fn iso_seconds(text: &str) -> Option<f64> {
    let text = text.strip_suffix('Z').unwrap_or(text);
    let (date, rest) = text.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let zone_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(zone_at);
    let mut t = time.splitn(3, ':');
    let hour: f64 = t.next()?.parse().ok()?;
    let minute: f64 = t.next()?.parse().ok()?;
    let second: f64 = t.next()?.parse().ok()?;
    let offset = if zone.is_empty() {
        0.0
    } else {
        let sign = if zone.starts_with('-') { -1.0 } else { 1.0 };
        let mut parts = zone[1..].split(':');
        let mut offset = 0.0;
        for scale in [3600.0, 60.0, 1.0] {
            if let Some(p) = parts.next() {
                offset += scale * p.parse::<f64>().ok()?;
            }
        }
        sign * offset
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !(1..=9999).contains(&year) {
        return None;
    }
    let days = days_from_civil(year, month, day) as f64;
    Some(days * 86_400.0 + hour * 3600.0 + minute * 60.0 + second - offset)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Bytes of bytea's hex text form (`\x0a1b...`).
fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A logical decoding message as a row of mapping `t`: `content` is a JSON object whose
/// fields are named like the mapped columns; a string field is taken as it is, any other
/// value as its JSON text. Without the id column's field, the message's position `lsn`
/// (as PostgreSQL writes one, `16/B374D848`) is the id. Returns the row and the content
/// as kept with a dead row.
pub fn message_row(t: &TableConfig, content: &[u8], lsn: u64) -> (ClaimedRow, serde_json::Value) {
    let position = format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff);
    let object = match serde_json::from_slice::<serde_json::Value>(content) {
        Ok(serde_json::Value::Object(object)) => object,
        other => {
            let why = match other {
                Ok(_) => "it is JSON but not an object".to_owned(),
                Err(e) => e.to_string(),
            };
            let mut row = ClaimedRow::new(&Columns {
                id: &position,
                ..Columns::default()
            });
            row.unreadable = Some(format!("the message's content is not a JSON object: {why}"));
            let kept = serde_json::Value::String(String::from_utf8_lossy(content).into_owned());
            return (row, kept);
        }
    };
    let mut names: Vec<&str> = t.mapped_columns();
    names.extend(
        [
            Some(&t.payload_column),
            t.headers_column.as_ref(),
            t.created_at_column.as_ref(),
            t.topic_column.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|c| c.as_str()),
    );
    names.extend(t.header_columns.values().map(|c| c.as_str()));
    names.sort_unstable();
    names.dedup();
    let texts: Vec<Option<String>> = names
        .iter()
        .map(|name| match object.get(*name) {
            None | Some(serde_json::Value::Null) if *name == t.id_column.as_str() => {
                Some(position.clone())
            }
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        })
        .collect();
    let relation = Relation {
        id: 0,
        schema: String::new(),
        name: "message".into(),
        columns: names
            .iter()
            .map(|name| {
                let created = t.created_at_column.as_deref() == Some(*name);
                let type_oid = match object.get(*name) {
                    Some(serde_json::Value::Number(_)) if created => 1700,
                    Some(serde_json::Value::String(_)) if created => TIMESTAMPTZ,
                    Some(serde_json::Value::String(_)) => 25,
                    _ => JSONB,
                };
                super::pgoutput::RelationColumn {
                    name: (*name).to_owned(),
                    type_oid,
                }
            })
            .collect(),
    };
    let values: Vec<Value<'_>> = texts
        .iter()
        .map(|v| {
            v.as_deref()
                .map_or(Value::Null, |s| Value::Text(s.as_bytes()))
        })
        .collect();
    let reader =
        RowReader::new(&relation, t).expect("every mapped column is a column of the message");
    (reader.read(&values), serde_json::Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::RelationColumn;
    use super::*;

    fn relation(columns: &[(&str, u32)]) -> Relation {
        Relation {
            id: 1,
            schema: "public".into(),
            name: "outbox".into(),
            columns: columns
                .iter()
                .map(|(n, o)| RelationColumn {
                    name: (*n).into(),
                    type_oid: *o,
                })
                .collect(),
        }
    }

    #[test]
    fn a_message_reads_its_fields_as_the_mapped_columns() {
        let t = TableConfig::default();
        let content = br#"{"aggregate_id": "o-1", "aggregate_type": "order", "event_type": "Placed",
            "payload": {"total": 5}, "headers": {"tenant": "a"}, "created_at": "2026-12-06T13:07:44.5Z"}"#;
        let (row, kept) = message_row(&t, content, 0x1_0000_00A0);
        assert_eq!(row.id(), "1/A0", "no id field: the position");
        assert_eq!(row.key(), Some("o-1"));
        assert_eq!(row.event_type(), Some("Placed"));
        assert_eq!(row.payload.as_deref(), Some(&br#"{"total":5}"#[..]));
        assert_eq!(row.headers(), Some(r#"{"tenant":"a"}"#));
        assert_eq!(row.created_at, Some(1_796_562_464.5));
        assert!(row.unreadable.is_none());
        assert_eq!(kept["aggregate_id"], "o-1");

        let (text_payload, _) = message_row(
            &t,
            br#"{"aggregate_id": "k", "payload": "plain", "event_id": 7}"#,
            1,
        );
        assert_eq!(text_payload.payload.as_deref(), Some(&b"plain"[..]));
        assert_eq!(text_payload.event_id(), Some("7"));

        let (bad, kept) = message_row(&t, b"[1]", 2);
        assert_eq!(bad.id(), "0/2");
        assert!(bad.unreadable.unwrap().contains("not an object"));
        assert_eq!(kept, "[1]");
    }

    #[test]
    fn times_read_as_unix_seconds_in_any_offset() {
        assert_eq!(iso_seconds("1970-01-01 00:00:00+00"), Some(0.0));
        assert_eq!(
            iso_seconds("2026-12-06 13:07:44.5+00"),
            Some(1_796_562_464.5)
        );
        assert_eq!(
            iso_seconds("2026-12-06 14:37:44.5+01:30"),
            Some(1_796_562_464.5)
        );
        assert_eq!(iso_seconds("2026-12-06 13:07:44.5"), Some(1_796_562_464.5));
        assert_eq!(iso_seconds("1969-12-31 23:00:00-01"), Some(0.0));
        assert_eq!(iso_seconds("infinity"), None);
        assert_eq!(iso_seconds("9223372036854775807-01-01 00:00:00"), None);
        assert_eq!(created_seconds("1796562464500", 20), Some(1_796_562_464.5));
        assert_eq!(created_seconds("1796562464.5", 1700), Some(1_796_562_464.5));
    }

    #[test]
    fn a_tuple_becomes_the_row_the_mapping_names() {
        let t = TableConfig {
            header_columns: [(
                "tenant".to_owned(),
                crate::config::Column::new("tenant").unwrap(),
            )]
            .into(),
            ..TableConfig::default()
        };
        let rel = relation(&[
            ("id", 20),
            ("event_id", 2950),
            ("aggregate_type", 25),
            ("aggregate_id", 25),
            ("event_type", 25),
            ("payload", 3802),
            ("headers", 3802),
            ("created_at", TIMESTAMPTZ),
            ("tenant", 25),
        ]);
        let reader = RowReader::new(&rel, &t).unwrap();
        let values = [
            Value::Text(b"7"),
            Value::Text(b"e-1"),
            Value::Text(b"order"),
            Value::Text(b"o-1"),
            Value::Text(b"Placed"),
            Value::Text(br#"{"a": 1}"#),
            Value::Text(b"{}"),
            Value::Text(b"1970-01-01 00:00:01+00"),
            Value::Null,
        ];
        let row = reader.read(&values);
        assert_eq!(row.id(), "7");
        assert_eq!(row.key(), Some("o-1"));
        assert_eq!(row.event_id(), Some("e-1"));
        assert_eq!(row.payload.as_deref(), Some(&br#"{"a": 1}"#[..]));
        assert_eq!(row.created_at, Some(1.0));
        assert_eq!(row.header_columns(), Some("[null]"));
        assert!(row.unreadable.is_none());
        assert_eq!(reader.row_data(&values)["payload"]["a"], 1);
    }

    #[test]
    fn a_bytea_payload_is_sent_as_its_bytes_and_bad_values_make_a_dead_row() {
        let t = TableConfig {
            headers_column: None,
            event_id_column: None,
            event_type_column: None,
            aggregate_type_column: None,
            created_at_column: None,
            ..TableConfig::default()
        };
        let rel = relation(&[("id", 20), ("aggregate_id", 25), ("payload", BYTEA)]);
        let reader = RowReader::new(&rel, &t).unwrap();
        let row = reader.read(&[
            Value::Text(b"1"),
            Value::Text(b"k"),
            Value::Text(b"\\x00ff"),
        ]);
        assert_eq!(row.payload.as_deref(), Some(&[0u8, 0xff][..]));
        let bad = reader.read(&[
            Value::Text(b"2"),
            Value::Text(&[0xff]),
            Value::Text(b"\\x0"),
        ]);
        assert!(bad
            .unreadable
            .unwrap()
            .starts_with("key_column cannot be read"));

        let missing = RowReader::new(&relation(&[("id", 20)]), &t).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "table `public.outbox` has no column `aggregate_id` (relay.tables.key_column)"
        );
    }
}
