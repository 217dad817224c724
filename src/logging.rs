//! Logging to stderr as the configuration says, with a filter SIGHUP can change.

use std::io::IsTerminal;

use crate::config::{LogConfig, LogFormat};

/// Logs to stderr as configured (validation already checked the filter); returns the
/// function a reload uses to change the filter. PostgreSQL's NOTICE messages (relayed by
/// sqlx at info) are quieted unless the filter names sqlx.
pub fn init(log: &LogConfig) -> Option<crate::reload::LogReload> {
    use tracing_subscriber::prelude::*;
    let filter = |level: &str| {
        let level = if level.contains("sqlx") {
            level.to_owned()
        } else {
            format!("{level},sqlx::postgres::notice=warn")
        };
        tracing_subscriber::EnvFilter::try_new(level)
    };
    let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(
        filter(&log.level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(crate::secrets::ScrubbedStderr);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let installed = match log.format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    installed.ok()?;
    Some(Box::new(move |level: &str| {
        handle.reload(filter(level)?)?;
        Ok(())
    }))
}
