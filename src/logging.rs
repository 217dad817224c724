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

/// Logs every panic at error with its place (thread, file and line), through the same
/// log as everything else, before the task or thread that panicked unwinds.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            panic = %crate::secrets::scrub(&message),
            place,
            thread = thread.name().unwrap_or("-"),
            "panicked"
        );
    }));
}
