//! `http`: POSTs the value with CloudEvents binary-mode headers on a shared keep-alive
//! client, or, with `batch_size` above 1, the events that arrive together as one batch of
//! structured events (`http_batch`). 2xx done; 408, 429, 5xx, timeouts and connection
//! errors retry (after at least what a 429's or 503's `Retry-After` asks); other statuses
//! dead-letter.

use std::sync::{Arc, OnceLock};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::Message;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::watch;

use prometheus::{Histogram, IntCounter};
use serde_json::Value;

use super::batch::{Apply, Batcher, CONCURRENT};
use super::http_batch::{send_all, structured, BATCH_CONTENT_TYPE, PASSED_THROUGH};
use super::{ErrorClass, Event, Handle, Outcome, SetupError};
use crate::config::HttpHandlerConfig;
use crate::metrics::Metrics;

/// One endpoint.
pub struct HttpHandler {
    endpoint: Arc<Endpoint>,
    /// With `batch_size` above 1: every call goes through it, a retry as a batch of its own.
    batcher: Option<Batcher<Value, Arc<Endpoint>>>,
}

/// Where and how requests go.
struct Endpoint {
    /// The shared client.
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL as error texts show it: without credentials, query or fragment.
    shown: String,
    /// Statuses retried on top of 408, 429 and 5xx.
    retry_statuses: Vec<u16>,
    /// Headers and timeout; a reload replaces them.
    settings: watch::Sender<Arc<Settings>>,
    batch_size: Histogram,
    splits: IntCounter,
}

/// The reloadable part of an http handler.
struct Settings {
    headers: HeaderMap,
    timeout: Duration,
}

fn settings(c: &HttpHandlerConfig) -> Result<Settings, SetupError> {
    let mut headers = HeaderMap::new();
    for (name, value) in &c.headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|source| SetupError::HeaderName {
                name: name.clone(),
                source,
            })?;
        let value = HeaderValue::from_str(value).map_err(|source| SetupError::HeaderValue {
            name: name.to_string(),
            source,
        })?;
        headers.insert(name, value);
    }
    Ok(Settings {
        headers,
        timeout: c.timeout,
    })
}

/// The client every http handler shares: one connection pool per endpoint, and one copy of
/// the system's root certificates, which each client loads when it is built (about 0.8 MiB
/// and 0.04 s of CPU per handler here). Timeouts and headers are set per request.
static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();

fn shared_client() -> Result<reqwest::Client, SetupError> {
    if let Some(client) = CLIENT.get() {
        return Ok(client.clone());
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(SetupError::Client)?;
    Ok(CLIENT.get_or_init(|| client).clone())
}

impl HttpHandler {
    /// A handler for the configured endpoint (validated URL and header names).
    pub fn new(name: &str, c: &HttpHandlerConfig, metrics: &Metrics) -> Result<Self, SetupError> {
        let url = reqwest::Url::parse(&c.url).map_err(SetupError::Url)?;
        let settings = watch::Sender::new(Arc::new(settings(c)?));
        let endpoint = Arc::new(Endpoint {
            client: shared_client()?,
            shown: shown(&url),
            retry_statuses: c.retry_statuses.clone(),
            url,
            settings,
            batch_size: metrics.consumer_batch_size.with_label_values(&[name]),
            splits: metrics
                .consumer_batch_splits_total
                .with_label_values(&[name]),
        });
        let batcher = (c.batch_size > 1)
            .then(|| Batcher::new(endpoint.clone(), c.batch_size, c.batch_linger, CONCURRENT));
        Ok(HttpHandler { endpoint, batcher })
    }

    /// Takes new headers and timeout (a reload).
    pub fn reconfigure(&self, c: &HttpHandlerConfig) -> Result<(), SetupError> {
        self.endpoint.settings.send_replace(Arc::new(settings(c)?));
        Ok(())
    }
}

impl Handle for HttpHandler {
    async fn handle(&self, event: &Event, attempt: u32) -> Outcome {
        match &self.batcher {
            // A retry goes alone: a message that keeps failing takes no other with it.
            Some(batcher) if attempt <= 1 => batcher.submit(structured(event)).await,
            Some(_) => self.endpoint.send_alone(structured(event)).await,
            None => self.endpoint.send(event).await,
        }
    }
}

impl Apply<Value> for Arc<Endpoint> {
    async fn apply(&self, events: Vec<Value>) -> Vec<Outcome> {
        self.batch_size.observe(events.len() as f64);
        send_all(&events, &|batch| self.post_batch(batch), &self.splits).await
    }
}

impl Endpoint {
    /// One event, as a batch of its own.
    async fn send_alone(&self, event: Value) -> Outcome {
        self.batch_size.observe(1.0);
        let events = [event];
        let mut outcomes = send_all(&events, &|batch| self.post_batch(batch), &self.splits).await;
        outcomes.pop().unwrap_or(Outcome::Done)
    }

    /// POSTs `events` as one batch of structured events; the request's outcome.
    fn post_batch(&self, events: &[Value]) -> impl std::future::Future<Output = Outcome> + '_ {
        // Encoded before the future, which then borrows only the endpoint.
        let body = serde_json::to_vec(events);
        self.post_body(body)
    }

    async fn post_body(&self, body: serde_json::Result<Vec<u8>>) -> Outcome {
        let settings = self.settings.borrow().clone();
        let body = match body {
            Ok(body) => body,
            Err(e) => return Outcome::Retry(format!("encoding the batch: {e}")),
        };
        let response = self
            .client
            .post(self.url.clone())
            .timeout(settings.timeout)
            .headers(settings.headers.clone())
            .header(CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .body(body)
            .send()
            .await;
        self.answer(response, settings.timeout).await
    }

    /// POSTs `event`'s value in binary mode.
    async fn send(&self, event: &Event) -> Outcome {
        let m = &event.message;
        let settings = self.settings.borrow().clone();
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(settings.timeout)
            .headers(settings.headers.clone())
            .header(
                CONTENT_TYPE,
                event.header("content-type").unwrap_or("application/json"),
            )
            .header("ce-specversion", "1.0")
            .header("ce-id", event.event_id().as_ref())
            .header("ce-type", event.event_type().unwrap_or(m.topic()))
            .header("ce-source", m.topic());
        if let Some(ms) = m.timestamp().to_millis().filter(|ms| *ms >= 0) {
            let at = UNIX_EPOCH + Duration::from_millis(ms as u64);
            request = request.header("ce-time", humantime::format_rfc3339_millis(at).to_string());
        }
        for name in PASSED_THROUGH {
            if let Some(value) = event.header(name) {
                request = request.header(*name, value);
            }
        }
        let response = request.body(event.value().to_vec()).send().await;
        self.answer(response, settings.timeout).await
    }

    /// The outcome of a request from its response.
    async fn answer(
        &self,
        response: reqwest::Result<reqwest::Response>,
        timeout: Duration,
    ) -> Outcome {
        match response {
            Ok(r) => {
                let status = r.status();
                let after = retry_after(&r, SystemTime::now());
                drain(r).await;
                match (classify(status, &self.retry_statuses), after) {
                    (Outcome::Retry(error), Some(after)) => Outcome::RetryAfter(error, after),
                    (outcome, _) => outcome,
                }
            }
            Err(e) if e.is_builder() => Outcome::DeadLetter(
                ErrorClass::Permanent,
                format!("cannot build the request to {}: {}", self.shown, chain(e)),
            ),
            Err(e) if e.is_timeout() => {
                Outcome::Retry(format!("no answer within {timeout:?} from {}", self.shown))
            }
            Err(e) => Outcome::Retry(format!("POST {} failed: {}", self.shown, chain(e))),
        }
    }
}

/// `url` without what may hold a secret: user name, password, query and fragment.
fn shown(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    // Fails only for URLs without a host, which validation refused.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// The error and its causes, `a: b: c`, without the URL reqwest puts in its own text
/// (which holds the query). hyper's chain names the reason, such as "Connection refused".
fn chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// The most of a response body read (and discarded) so that its connection can carry the
/// next request; a longer body closes the connection instead.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Reads the rest of the response body. The status has decided the outcome already, so a
/// body that fails or runs past the timeout only costs the connection: hyper keeps a
/// connection for the next request only when its last response was read to the end, and
/// closes it otherwise.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while read <= DRAIN_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => return,
        }
    }
}

/// The wait a 429 or 503 answer asks for in `Retry-After`: seconds, or an HTTP date
/// (a date in the past asks for none). Other statuses' `Retry-After` is not read.
fn retry_after(response: &reqwest::Response, now: SystemTime) -> Option<Duration> {
    let status = response.status().as_u16();
    if status != 429 && status != 503 {
        return None;
    }
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    parse_retry_after(value.to_str().ok()?, now)
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

fn classify(status: reqwest::StatusCode, retry_statuses: &[u16]) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Done
    } else if code == 408
        || code == 429
        || status.is_server_error()
        || retry_statuses.contains(&code)
    {
        Outcome::Retry(format!("HTTP {status}"))
    } else {
        Outcome::DeadLetter(ErrorClass::Permanent, format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_hold_no_credentials_or_query() {
        let url =
            reqwest::Url::parse("https://bot:pa55@hooks.example:8443/in/x?token=t#f").unwrap();
        assert_eq!(shown(&url), "https://hooks.example:8443/in/x");
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let c = |code| classify(reqwest::StatusCode::from_u16(code).unwrap(), &[]);
        assert_eq!(c(200), Outcome::Done);
        assert_eq!(c(204), Outcome::Done);
        assert!(matches!(c(408), Outcome::Retry(_)));
        assert!(matches!(c(429), Outcome::Retry(_)));
        assert!(matches!(c(503), Outcome::Retry(_)));
        assert!(matches!(
            c(400),
            Outcome::DeadLetter(ErrorClass::Permanent, _)
        ));
        assert!(matches!(
            c(404),
            Outcome::DeadLetter(ErrorClass::Permanent, _)
        ));
        assert!(matches!(
            c(301),
            Outcome::DeadLetter(ErrorClass::Permanent, _)
        ));
        let with = |code| classify(reqwest::StatusCode::from_u16(code).unwrap(), &[401, 409]);
        assert!(matches!(with(401), Outcome::Retry(_)));
        assert!(matches!(with(409), Outcome::Retry(_)));
        assert!(matches!(with(503), Outcome::Retry(_)));
        assert!(matches!(
            with(403),
            Outcome::DeadLetter(ErrorClass::Permanent, _)
        ));
    }
}
