//! Topic rules: templates such as `"events.{event_type}"` (parsed once, rendered per row)
//! and what a Kafka topic name may hold. A leaf: configuration checks and the relay both
//! use it.

/// A parsed template: literal text and column placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

/// Why a template cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{` without `}`.
    #[error("template `{0}` has an unclosed `{{`")]
    Unclosed(String),
    /// `{name}` names no column of the mapping.
    #[error("template `{template}` names column `{column}`, which is not part of the column mapping (known: {known})")]
    UnknownColumn {
        /// The template.
        template: String,
        /// The unknown name.
        column: String,
        /// The names it may use.
        known: String,
    },
    /// Literal text that can never be part of a Kafka topic name.
    #[error("template `{0}` contains characters Kafka does not allow in topic names (allowed: letters, digits, '.', '_', '-')")]
    BadLiteral(String),
    /// An empty template.
    #[error("template is empty")]
    Empty,
}

impl TopicTemplate {
    /// Parses `template`, accepting placeholders only for `columns`.
    pub fn parse(template: &str, columns: &[&str]) -> Result<Self, TemplateError> {
        if template.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| TemplateError::Unclosed(template.to_owned()))?;
            let column = &rest[open + 1..open + close];
            if !columns.contains(&column) {
                return Err(TemplateError::UnknownColumn {
                    template: template.to_owned(),
                    column: column.to_owned(),
                    known: columns.join(", "),
                });
            }
            parts.push(Part::Column(column.to_owned()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let literal_ok = parts.iter().all(|p| match p {
            Part::Literal(s) => s.chars().all(is_topic_char),
            Part::Column(_) => true,
        });
        if !literal_ok {
            return Err(TemplateError::BadLiteral(template.to_owned()));
        }
        Ok(TopicTemplate { parts })
    }

    /// The literal text the template starts with, if it starts with one.
    pub fn literal_prefix(&self) -> Option<&str> {
        match self.parts.first() {
            Some(Part::Literal(s)) => Some(s),
            _ => None,
        }
    }

    /// The columns the template reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template into `out`, looking column values up with `value`. Returns the
    /// name of the first column whose value is missing (NULL).
    pub fn render_into<'a>(
        &self,
        out: &mut String,
        value: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(), &str> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Column(c) => out.push_str(value(c).ok_or(c.as_str())?),
            }
        }
        Ok(())
    }
}

/// A character Kafka accepts in a topic name.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A name Kafka does not accept as a topic.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TopicNameError {
    /// An empty name.
    #[error("topic name is empty")]
    Empty,
    /// A name longer than Kafka's 249 characters.
    #[error("topic name is longer than 249 characters: `{0}`")]
    TooLong(String),
    /// A name with characters Kafka does not allow, or `.` or `..`.
    #[error("`{0}` is not a valid Kafka topic name")]
    Invalid(String),
}

/// Checks a rendered topic name against Kafka's rules.
pub fn check_topic(topic: &str) -> Result<(), TopicNameError> {
    if topic.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if topic.len() > 249 {
        return Err(TopicNameError::TooLong(topic.to_owned()));
    }
    if topic == "." || topic == ".." || !topic.chars().all(is_topic_char) {
        return Err(TopicNameError::Invalid(topic.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_columns_and_literals() {
        let t = TopicTemplate::parse("events.{event_type}.v1", &["event_type", "id"]).unwrap();
        let mut out = String::new();
        t.render_into(&mut out, |c| (c == "event_type").then_some("Deposit"))
            .unwrap();
        assert_eq!(out, "events.Deposit.v1");
        assert_eq!(t.render_into(&mut out, |_| None), Err("event_type"));
    }

    #[test]
    fn rejects_unknown_columns_and_bad_text() {
        assert!(matches!(
            TopicTemplate::parse("events.{nope}", &["event_type"]),
            Err(TemplateError::UnknownColumn { .. })
        ));
        assert!(matches!(
            TopicTemplate::parse("events.{event_type", &["event_type"]),
            Err(TemplateError::Unclosed(_))
        ));
        assert!(matches!(
            TopicTemplate::parse("events/{event_type}", &["event_type"]),
            Err(TemplateError::BadLiteral(_))
        ));
        assert!(check_topic("events.a b").is_err());
        assert!(check_topic("events.ok-1_x").is_ok());
    }
}
