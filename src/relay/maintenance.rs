//! Periodic upkeep of one table: backlog gauges, retention purge in mark mode, and cleanup
//! of attempt counters of rows that are gone. Failures are logged and retried next tick.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::runtime::TableRuntime;
use super::store::StoreError;

/// Runs every `maintenance_interval` until `stop`.
pub async fn run(rt: Arc<TableRuntime>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(rt.config.maintenance_interval);
    let mut reported = 0;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let published = rt.published.load(Ordering::Relaxed);
        if published > reported {
            tracing::info!(
                published = published - reported,
                interval = ?rt.config.maintenance_interval,
                "relay progress"
            );
            reported = published;
        }
        if let Err(e) = once(&rt).await {
            tracing::warn!(error = %e, "relay maintenance failed; retrying next interval");
        }
    }
}

async fn once(rt: &TableRuntime) -> Result<(), StoreError> {
    let table = rt.config.table.as_str();
    let (pending, oldest) = rt.store.stats().await?;
    rt.metrics
        .relay_backlog_rows
        .with_label_values(&[table])
        .set(pending);
    rt.metrics
        .relay_oldest_pending_seconds
        .with_label_values(&[table])
        .set(oldest.unwrap_or(0.0));
    let purged = rt.store.purge(rt.config.retention.as_secs_f64()).await?;
    if purged > 0 {
        tracing::info!(purged, "purged published rows past retention");
    }
    rt.store.cleanup_attempts().await?;
    Ok(())
}
