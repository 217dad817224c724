//! An error and its sources as one line of text, for the exit message and for logs.

use std::error::Error;

/// `error`'s text followed by each of its sources', separated by `: `. A source whose
/// text the level above already ends with (an error that shows its source in its own
/// text) is not repeated.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("handlers.web")]
        Plain(#[source] Inner),
        #[error("database: {0}")]
        Shown(#[from] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[test]
    fn sources_follow_once() {
        assert_eq!(
            describe(&Outer::Plain(Inner)),
            "handlers.web: connection refused"
        );
        assert_eq!(
            describe(&Outer::Shown(Inner)),
            "database: connection refused"
        );
    }
}
