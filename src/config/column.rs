//! Column names of a table mapping. A [`Column`] always names a column; an optional one is
//! an `Option<Column>`, which the file turns off with an empty string (see [`optional`]).

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The name of a column, never empty. Whether it is a plain identifier is checked with
/// the rest of the configuration, so that every problem is reported at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Column(String);

/// An empty string given where a column name is needed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an empty string names no column")]
pub struct EmptyColumn;

impl Column {
    /// `name` as a column name.
    pub fn new(name: impl Into<String>) -> Result<Self, EmptyColumn> {
        let name = name.into();
        if name.is_empty() {
            Err(EmptyColumn)
        } else {
            Ok(Column(name))
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Column {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Column {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Column {
    type Error = EmptyColumn;

    fn try_from(name: String) -> Result<Self, EmptyColumn> {
        Column::new(name)
    }
}

impl std::str::FromStr for Column {
    type Err = EmptyColumn;

    fn from_str(s: &str) -> Result<Self, EmptyColumn> {
        Column::new(s)
    }
}

impl Serialize for Column {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Column {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Column::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "column::optional")]`: an optional name (a column, a channel) that the
/// file turns off with `""`, and that is written back as `""` when off.
pub mod optional {
    use std::fmt::Display;

    use super::*;

    /// `None` as `""`.
    pub fn serialize<T: AsRef<str>, S: Serializer>(c: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_ref().map_or("", AsRef::as_ref))
    }

    /// `""` as `None`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: TryFrom<String>,
        T::Error: Display,
        D: Deserializer<'de>,
    {
        let name = String::deserialize(d)?;
        if name.is_empty() {
            return Ok(None);
        }
        T::try_from(name)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Mapping {
        key: Column,
        #[serde(with = "optional")]
        event_id: Option<Column>,
    }

    #[test]
    fn an_empty_string_turns_an_optional_column_off_and_is_written_back() {
        let m: Mapping = toml::from_str("key = \"k\"\nevent_id = \"\"").unwrap();
        assert_eq!(m.key.as_str(), "k");
        assert_eq!(m.event_id, None);
        assert_eq!(
            toml::to_string(&m).unwrap(),
            "key = \"k\"\nevent_id = \"\"\n"
        );
        let m: Mapping = toml::from_str("key = \"k\"\nevent_id = \"id\"").unwrap();
        assert_eq!(m.event_id.as_deref(), Some("id"));
    }

    #[test]
    fn a_required_column_cannot_be_empty() {
        let e = toml::from_str::<Mapping>("key = \"\"\nevent_id = \"\"").unwrap_err();
        assert!(
            e.to_string().contains("an empty string names no column"),
            "{e}"
        );
    }
}
