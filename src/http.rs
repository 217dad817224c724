//! The operations endpoint: `/metrics`, `/healthz` (every loop lives and makes progress,
//! else 503 naming the loops that died or stalled) and `/readyz`
//! (database and Kafka reachable, else 503 with a short reason that holds no secret; the
//! full error goes to the log). Probes run one at a time: requests that arrive while one
//! runs share its result, so a flood of probes costs one round trip each way at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
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
    /// The last probe: when it finished, and the problems it found.
    pub last_probe: Mutex<Option<(Instant, Vec<String>)>>,
    /// The loops whose heartbeats `/healthz` reads.
    pub liveness: Arc<crate::systemd::Liveness>,
}

/// A loop silent this long fails `/healthz` (the shipped unit's `WatchdogSec`).
const HEALTH_SILENCE: Duration = Duration::from_secs(120);

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
        .route("/healthz", get(healthz))
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

/// 200 while every loop lives and makes progress; else 503 naming the loops that died or
/// stalled.
async fn healthz(State(state): State<Arc<HttpState>>) -> (StatusCode, String) {
    let unwell = state.liveness.unwell(HEALTH_SILENCE);
    if unwell.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, unwell.to_string())
    }
}

async fn readyz(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let asked = Instant::now();
    let mut last = state.last_probe.lock().await;
    let problems = match &*last {
        // A probe that finished while this request waited for it answers it too.
        Some((finished, problems)) if *finished >= asked => problems.clone(),
        _ => {
            let problems = probe(&state).await;
            *last = Some((Instant::now(), problems.clone()));
            problems
        }
    };
    drop(last);
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", problems.join("\n")),
        )
    }
}

/// Asks the database for `SELECT 1` and Kafka for metadata; one short line per problem.
async fn probe(state: &HttpState) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(database) = &state.database {
        match tokio::time::timeout(PROBE_TIMEOUT, database.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: the database probe failed");
                problems.push(format!("database: {}", database_reason(&e)));
            }
            Err(_) => problems.push(format!("database: no answer within {PROBE_TIMEOUT:?}")),
        }
    }
    let producer = state.producer.get();
    let kafka =
        tokio::task::spawn_blocking(move || crate::kafka::answers(&producer, PROBE_TIMEOUT)).await;
    match kafka {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the Kafka probe failed");
            let code = e
                .rdkafka_error_code()
                .map_or_else(|| "error".to_owned(), |c| format!("{c:?}"));
            problems.push(format!("kafka: no metadata answer ({code})"));
        }
        Err(_) => problems.push("kafka: the probe did not finish".into()),
    }
    problems
}

/// What kind of failure a database error is, in words that hold no server text.
fn database_reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => format!("cannot connect ({:?})", io.kind()),
        sqlx::Error::Tls(_) => "TLS handshake failed".into(),
        sqlx::Error::PoolTimedOut => "no connection within database.connect_timeout".into(),
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("error {code}"),
            None => "error".into(),
        },
        _ => "failed (the log has the error)".into(),
    }
}
