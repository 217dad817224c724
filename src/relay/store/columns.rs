//! The table's columns against the mapping: which columns it requires, whether the table
//! has them, and what each backend's column types let the relay do with the time and mark
//! columns.

use crate::config::{Column, OnPublished, TableConfig};

use super::StoreError;

/// The columns the mapping of `t` requires, as `(config key, column)`.
pub fn required_columns(t: &TableConfig) -> Vec<(String, &str)> {
    let optional = [
        ("event_id_column", t.event_id_column.as_ref()),
        ("headers_column", t.headers_column.as_ref()),
        ("event_type_column", t.event_type_column.as_ref()),
        ("aggregate_type_column", t.aggregate_type_column.as_ref()),
        ("created_at_column", t.created_at_column.as_ref()),
        ("topic_column", t.topic_column.as_ref()),
        ("xid_column", t.xid_column.as_ref()),
        (
            "published_column",
            Some(&t.published_column).filter(|_| t.on_published == OnPublished::Mark),
        ),
    ];
    [
        ("id_column", &t.id_column),
        ("key_column", &t.key_column),
        ("payload_column", &t.payload_column),
        ("order_column", t.order_column()),
    ]
    .into_iter()
    .chain(optional.into_iter().filter_map(|(key, c)| Some((key, c?))))
    .map(|(key, c)| (key.to_owned(), c.as_str()))
    .chain(
        t.header_columns
            .iter()
            .map(|(header, c)| (format!("header_columns.{header}"), c.as_str())),
    )
    .collect()
}

/// Checks that every column the mapping names is among `columns` (the table's, in order);
/// an empty list means the table does not exist.
pub fn check_columns(t: &TableConfig, columns: &[String]) -> Result<(), StoreError> {
    if columns.is_empty() {
        return Err(StoreError::NoTable(t.table.clone()));
    }
    for (key, column) in required_columns(t) {
        if !columns.iter().any(|c| c == column) {
            return Err(StoreError::Schema(format!(
                "table `{}` has no column `{column}` (relay.tables.{key}); columns: {}",
                t.table,
                columns.join(", ")
            )));
        }
    }
    Ok(())
}

/// What a column's type lets outboxd do with it, as each backend reads its catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A date or time type.
    Time,
    /// A number (integer, floating, decimal).
    Number,
    /// A boolean.
    Boolean,
    /// Anything else.
    Other,
}

/// How `created_at_column` gives a row's creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatedAt {
    /// A time column.
    Time,
    /// Unix epoch seconds or milliseconds (see [`EPOCH_MILLIS_ABOVE`]).
    Epoch,
}

/// A number of epoch seconds above this is read as milliseconds: as seconds it would be
/// after the year 5000, as milliseconds it is after March 1973.
pub const EPOCH_MILLIS_ABOVE: f64 = 100_000_000_000.0;

/// SQL giving the Unix seconds of `expr`, a number of epoch seconds or milliseconds.
pub fn epoch_seconds_sql(expr: &str) -> String {
    format!(
        "(CASE WHEN {expr} > {EPOCH_MILLIS_ABOVE:.1} THEN {expr} / 1000.0 ELSE {expr} * 1.0 END)"
    )
}

/// How mark mode marks a published row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The current time into a time column; pending while NULL; purged after retention.
    Time,
    /// True into a boolean column; pending while false or NULL; never purged.
    Flag,
}

/// What the table's column types say about the time and mark columns the relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnUse {
    /// `created_at_column`, when mapped.
    pub created_at: Option<CreatedAt>,
    /// `published_column` in mark mode.
    pub mark: Option<Mark>,
}

/// Checks that the time and mark columns the relay uses have a type it can use:
/// `created_at_column` (a time or a number of epoch seconds or milliseconds, read for the
/// delay and age metrics) and, in mark mode, `published_column` (a time or a boolean).
/// `columns` are the table's `(name, type)` as the database names them and `kind`
/// classifies a type.
pub fn check_column_use(
    t: &TableConfig,
    columns: &[(String, String)],
    kind: impl Fn(&str) -> ColumnKind,
) -> Result<ColumnUse, StoreError> {
    let type_of = |name: &str| {
        columns
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, ty)| ty.as_str())
    };
    let unusable = |key: &str, column: &Column, ty: &str, needs: &str, alternative: &str| {
        StoreError::Schema(format!(
            "table `{}`: column `{column}` (relay.tables.{key}) is of type {ty}; it needs {needs}: change the column's type, {alternative}",
            t.table
        ))
    };
    let created_at =
        match &t.created_at_column {
            None => None,
            Some(c) => match type_of(c) {
                None => Some(CreatedAt::Time),
                Some(ty) => match kind(ty) {
                    ColumnKind::Time => Some(CreatedAt::Time),
                    ColumnKind::Number => Some(CreatedAt::Epoch),
                    ColumnKind::Boolean | ColumnKind::Other => return Err(unusable(
                        "created_at_column",
                        c,
                        ty,
                        "a time type or a number of Unix epoch seconds or milliseconds",
                        "or set created_at_column = \"\" to do without the delay and age metrics",
                    )),
                },
            },
        };
    let mark = match t.on_published {
        OnPublished::Mark => {
            let c = &t.published_column;
            match type_of(c).map(|ty| (ty, kind(ty))) {
                None | Some((_, ColumnKind::Time)) => Some(Mark::Time),
                Some((_, ColumnKind::Boolean)) => Some(Mark::Flag),
                Some((ty, _)) => {
                    return Err(unusable(
                        "published_column",
                        c,
                        ty,
                        "a time type (set to the current time) or a boolean (set to true)",
                        "or use on_published = \"delete\"",
                    ))
                }
            }
        }
        OnPublished::Delete | OnPublished::Cursor => None,
    };
    Ok(ColumnUse { created_at, mark })
}
