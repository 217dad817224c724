//! LISTEN wake-up: one dedicated connection per table listens on its channel and wakes the
//! table's lanes. Notifications sent while it is disconnected are lost, so every
//! (re)connect wakes the lanes too, and lanes still poll as a fallback.

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Listens on `channel` until `stop`, waking lanes through `wake`.
pub async fn listen(
    opts: PgConnectOptions,
    channel: String,
    wake: watch::Sender<()>,
    stop: CancellationToken,
) {
    let mut retry = crate::backoff::exponential();
    while !stop.is_cancelled() {
        let mut listener = match connect(&opts, &channel).await {
            Ok(l) => {
                retry = crate::backoff::exponential();
                l
            }
            Err(e) => {
                let pause = retry.next().unwrap_or_default();
                tracing::warn!(%channel, error = %e, ?pause, "LISTEN connection failed; lanes keep polling");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        tracing::debug!(%channel, "listening for notifications");
        wake.send_replace(());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => { wake.send_replace(()); }
                    // The connection was lost and re-established: notifications may be lost.
                    Ok(None) => { wake.send_replace(()); }
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "LISTEN connection broke; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(opts: &PgConnectOptions, channel: &str) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
