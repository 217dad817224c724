//! Signals to a cancellation token: the first SIGTERM/SIGINT starts a drain, a second one
//! exits at once (open transactions roll back, rows stay in the outbox). SIGHUP is logged
//! and ignored until configuration reload exists, so it never kills the daemon.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

/// Installs the handlers; the returned token is cancelled on the first SIGTERM/SIGINT.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => tracing::warn!(
                    "SIGHUP received; configuration reload is not supported yet, ignoring"
                ),
                _ if cancel.is_cancelled() => {
                    tracing::error!("second stop signal: exiting without draining; open transactions roll back and their rows stay in the outbox");
                    std::process::exit(1);
                }
                _ => {
                    tracing::info!(signal, "stop signal received; draining");
                    cancel.cancel();
                }
            }
        }
    });
    Ok(token)
}
