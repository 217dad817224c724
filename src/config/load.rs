//! Loading: built-in defaults < the TOML file < `OUTBOXD_*` environment variables, then
//! secrets from `*_file` keys, then validation. Every error names the key and the source.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;

use super::rules::ENV_PREFIX;
use super::rules::{Problem, Problems};
use super::{validate, Config};

/// Why a configuration could not be used. Every variant maps to exit code 78 (EX_CONFIG).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("configuration file {0} not found")]
    NotFound(PathBuf),
    /// The file or the environment does not fit the schema (unknown key, wrong type, bad
    /// duration, TOML syntax).
    #[error("configuration error in {file}:\n{problems}")]
    Schema {
        /// The configuration file.
        file: PathBuf,
        /// One line per problem, each naming the key.
        problems: String,
    },
    /// The values fit the schema but are not usable together.
    #[error("invalid configuration in {file}:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The configuration file.
        file: PathBuf,
        /// One entry per problem, with the key it is about.
        problems: Vec<Problem>,
    },
}

/// Loads, resolves secrets and validates the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::NotFound(path.to_owned()));
    }
    let figment = Figment::new().merge(Toml::file_exact(path)).merge(
        Env::prefixed(ENV_PREFIX)
            .filter(|key| !is_event_variable(key.as_str()))
            .split("__"),
    );
    let mut config: Config = figment.extract().map_err(|err| ConfigError::Schema {
        file: path.to_owned(),
        problems: describe(err),
    })?;
    let mut problems = Problems::default();
    resolve_secret_files(&mut config, &mut problems);
    validate::validate(&config, &mut problems);
    let problems = problems.into_vec();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            file: path.to_owned(),
            problems,
        })
    }
}

/// Whether `key` (without the prefix) is one of the variables a `command` handler sets
/// for its child: an `outboxd` run by a handler inherits them and must not read them.
fn is_event_variable(key: &str) -> bool {
    super::event_vars::ALL
        .iter()
        .any(|var| var[ENV_PREFIX.len()..].eq_ignore_ascii_case(key))
}

/// One line per figment error: what is wrong, the key, and where the value came from.
fn describe(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let key = e
                .path
                .iter()
                .filter(|p| p.as_str() != "default")
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" (from {} {src})", m.name),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            let key = if key.is_empty() {
                "top level".to_owned()
            } else {
                format!("key `{key}`")
            };
            format!("  - {key}: {}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn resolve_secret_files(config: &mut Config, problems: &mut Problems) {
    let db = &mut config.database;
    match (&db.url, &db.url_file) {
        (Some(_), Some(_)) => problems.add(
            "database.url_file",
            "set together with database.url; keep one",
        ),
        (None, Some(file)) => match std::fs::read_to_string(file) {
            Ok(url) => db.url = Some(url.trim().to_owned()),
            Err(e) => problems.add(
                "database.url_file",
                format!("cannot read {}: {e}", file.display()),
            ),
        },
        _ => {}
    }
}
