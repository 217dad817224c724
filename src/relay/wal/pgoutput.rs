//! The `pgoutput` messages WAL capture reads: a relation's description and an insert's
//! tuple, decoded from the bytes of an XLogData message (protocol version 1, text values).
//! Begin, Commit and logical decoding messages arrive decoded by the replication client;
//! every other message (update, delete, truncate, type, origin) is of no use here.

use std::fmt;

/// A table as the stream describes it, before the first insert after a change of its
/// definition (and once per session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID, which inserts refer to.
    pub id: u32,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its columns, in tuple order.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Its name.
    pub name: String,
    /// The OID of its type.
    pub type_oid: u32,
}

/// One value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (updates only; an insert carries every value).
    Unchanged,
    /// The value's text form.
    Text(&'a [u8]),
}

/// A decoded message.
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A relation's description.
    Relation(Relation),
    /// A row inserted into relation `relation`.
    Insert {
        /// The relation's OID.
        relation: u32,
        /// Its values, in column order.
        values: Vec<Value<'a>>,
    },
    /// Anything else.
    Other,
}

/// A message that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput message `{tag}` does not decode: {what}")]
pub struct DecodeError {
    /// The message's tag.
    tag: Tag,
    /// What was wrong.
    what: &'static str,
}

/// A message tag, shown as its letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

/// Decodes `data`, one XLogData message's bytes.
pub fn decode(data: &[u8]) -> Result<Change<'_>, DecodeError> {
    let Some((&tag, rest)) = data.split_first() else {
        return Err(DecodeError {
            tag: Tag(b'?'),
            what: "empty message",
        });
    };
    let mut r = Reader {
        rest,
        tag: Tag(tag),
    };
    match tag {
        b'R' => r.relation().map(Change::Relation),
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.fail("no new tuple"));
            }
            Ok(Change::Insert {
                relation,
                values: r.tuple()?,
            })
        }
        _ => Ok(Change::Other),
    }
}

struct Reader<'a> {
    rest: &'a [u8],
    tag: Tag,
}

impl<'a> Reader<'a> {
    fn fail(&self, what: &'static str) -> DecodeError {
        DecodeError {
            tag: self.tag,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.fail("message ends early"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.fail("a name without its terminating zero"))?;
        let text = self.take(end)?;
        self.take(1)?;
        Ok(String::from_utf8_lossy(text).into_owned())
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32()?;
        let schema = self.string()?;
        let name = self.string()?;
        let _replica_identity = self.u8()?;
        let n = self.u16()?;
        let mut columns = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let _flags = self.u8()?;
            let name = self.string()?;
            let type_oid = self.u32()?;
            let _modifier = self.u32()?;
            columns.push(RelationColumn { name, type_oid });
        }
        Ok(Relation {
            id,
            schema,
            name,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<Vec<Value<'a>>, DecodeError> {
        let n = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.take(len)?)
                }
                _ => return Err(self.fail("a value of unknown kind")),
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    #[test]
    fn a_relation_and_an_insert_decode_as_sent() {
        let mut r = vec![b'R'];
        r.extend_from_slice(&16_385u32.to_be_bytes());
        cstr(&mut r, "public");
        cstr(&mut r, "events");
        r.push(b'd');
        r.extend_from_slice(&2u16.to_be_bytes());
        for (name, oid) in [("id", 20u32), ("data", 3802)] {
            r.push(1);
            cstr(&mut r, name);
            r.extend_from_slice(&oid.to_be_bytes());
            r.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        let Change::Relation(rel) = decode(&r).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (rel.id, rel.schema.as_str(), rel.name.as_str()),
            (16_385, "public", "events")
        );
        assert_eq!(
            rel.columns[1],
            RelationColumn {
                name: "data".into(),
                type_oid: 3802
            }
        );

        let mut i = vec![b'I'];
        i.extend_from_slice(&16_385u32.to_be_bytes());
        i.push(b'N');
        i.extend_from_slice(&3u16.to_be_bytes());
        i.push(b't');
        i.extend_from_slice(&2u32.to_be_bytes());
        i.extend_from_slice(b"42");
        i.push(b'n');
        i.push(b'u');
        assert_eq!(
            decode(&i).unwrap(),
            Change::Insert {
                relation: 16_385,
                values: vec![Value::Text(b"42"), Value::Null, Value::Unchanged],
            }
        );
    }

    #[test]
    fn a_cut_message_is_an_error_not_a_panic() {
        let mut i = vec![b'I'];
        i.extend_from_slice(&1u32.to_be_bytes());
        i.push(b'N');
        i.extend_from_slice(&1u16.to_be_bytes());
        i.push(b't');
        i.extend_from_slice(&10u32.to_be_bytes());
        i.extend_from_slice(b"short");
        let e = decode(&i).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pgoutput message `I` does not decode: message ends early"
        );
        assert!(decode(b"").is_err());
        assert_eq!(decode(b"U\0\0").unwrap(), Change::Other);
    }
}
