//! The operations endpoint: `/metrics`, `/healthz` (the process answers) and `/readyz`
//! (database and Kafka reachable, else 503 with the reason).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use rdkafka::producer::Producer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::kafka::ProducerSlot;
use crate::metrics::Metrics;

/// How long a readiness probe waits for the database and for Kafka.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the handlers read.
pub struct HttpState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// The database, when configured.
    pub database: Option<crate::db::Database>,
    /// The producer, whose client answers metadata requests.
    pub producer: Arc<ProducerSlot>,
}

/// Binds `listen` and serves until `stop`; returns the bound address and the server task.
pub async fn serve(
    listen: SocketAddr,
    state: HttpState,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(state));
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http endpoint failed");
        }
    });
    Ok((addr, task))
}

async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Some(database) = &state.database {
        let probe = database.ping();
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("database: {e}")),
            Err(_) => problems.push("database: no answer within 2s".into()),
        }
    }
    let producer = state.producer.get();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, PROBE_TIMEOUT)
            .map(|_| ())
    })
    .await;
    match kafka {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("kafka: {e}")),
        Err(e) => problems.push(format!("kafka: probe failed: {e}")),
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", problems.join("\n")),
        )
    }
}
