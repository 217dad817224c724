//! Signals: the first SIGTERM/SIGINT cancels the returned token (a drain), a second one
//! exits at once (open transactions roll back, rows stay in the outbox); each SIGHUP is
//! passed on as a reload request.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the signal handlers feed.
pub struct SignalEvents {
    /// Cancelled on the first SIGTERM/SIGINT.
    pub stop: CancellationToken,
    /// One item per SIGHUP.
    pub reload: mpsc::UnboundedReceiver<()>,
}

/// Installs the handlers.
pub fn install() -> std::io::Result<SignalEvents> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let stop = CancellationToken::new();
    let (reload_tx, reload) = mpsc::unbounded_channel();
    let cancel = stop.clone();
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => {
                    let _ = reload_tx.send(());
                }
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
    Ok(SignalEvents { stop, reload })
}
