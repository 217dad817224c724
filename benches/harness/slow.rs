//! The consumer against a slow downstream: an HTTP endpoint that answers after 10 ms and
//! takes any number of requests at once. Throughput of a backlog, and the delay of healthy
//! messages from produce to delivery while 1 % of messages fail three times first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use crate::dispatch::{consumer_config, produce};
use crate::processes::{Broker, Outboxd};

/// Calls the endpoint answers per request.
const ANSWER_AFTER: Duration = Duration::from_millis(10);

/// What the slow endpoint saw.
#[derive(Default)]
pub struct Sink {
    /// Failed calls so far, per message (`n` of its body).
    failures: Mutex<HashMap<u64, u32>>,
    /// Delivered messages: (n, seconds from produce (`ce-time`) to delivery).
    delivered: Mutex<Vec<(u64, f64)>>,
    /// Every message with `n % fail_every == 0` fails this many times first (0: none).
    fail_times: u32,
    fail_every: u64,
}

async fn answer(State(s): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    tokio::time::sleep(ANSWER_AFTER).await;
    let n = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["n"].as_u64())
        .unwrap_or(u64::MAX);
    if s.fail_times > 0 && n.is_multiple_of(s.fail_every) {
        let mut f = s.failures.lock().unwrap();
        let failed = f.entry(n).or_default();
        if *failed < s.fail_times {
            *failed += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let produced = headers
        .get("ce-time")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    let delay = produced
        .and_then(|p| SystemTime::now().duration_since(p).ok())
        .map_or(f64::NAN, |d| d.as_secs_f64());
    s.delivered.lock().unwrap().push((n, delay));
    StatusCode::OK
}

async fn start_sink(fail_every: u64, fail_times: u32) -> Result<(String, Arc<Sink>)> {
    let sink = Arc::new(Sink {
        fail_every,
        fail_times,
        ..Sink::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/events", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/events", axum::routing::post(answer))
        .with_state(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, sink))
}

/// The consumer settings of a run: `ordering` and a `max_in_flight` that lets key order
/// use the endpoint's concurrency.
fn extra(ordering: &str) -> String {
    format!("ordering = \"{ordering}\"\nmax_in_flight = 256\n")
}

/// A backlog of `messages` (1,000 keys, 6 partitions) drained into the slow endpoint:
/// msgs/s from the first delivery to the last, and peak RSS in MiB.
pub async fn backlog(
    broker: &Broker,
    url: &str,
    ordering: &str,
    messages: i64,
) -> Result<(f64, f64)> {
    let topic = format!("bench.slow.{ordering}.{}", std::process::id());
    broker.create_topic(&topic, 6).await?;
    produce(broker, &topic, messages).await?;
    let (sink_url, _sink) = start_sink(1, 0).await?;
    let handler = format!("kind = \"http\"\nurl = \"{sink_url}\"");
    let config = consumer_config(
        broker,
        url,
        &topic,
        &format!("slow-{ordering}"),
        &handler,
        &extra(ordering),
    );
    let mut outboxd = Outboxd::start(&config)?;
    let rate = outboxd
        .rate_until("outboxd_consumer_messages_total", messages as f64)
        .await?;
    let (peak, _) = outboxd.rss();
    outboxd.stop();
    Ok((rate, peak))
}

/// Messages produced at `per_sec` for `secs` while the consumer runs; every hundredth
/// fails three times before it succeeds. The healthy messages' delay from produce to
/// delivery: (p50, p99, max) in ms.
pub async fn head_of_line(
    broker: &Broker,
    url: &str,
    ordering: &str,
    per_sec: u64,
    secs: u64,
) -> Result<(f64, f64, f64)> {
    let topic = format!("bench.hol.{ordering}.{}", std::process::id());
    broker.create_topic(&topic, 6).await?;
    let (sink_url, sink) = start_sink(100, 3).await?;
    let handler = format!("kind = \"http\"\nurl = \"{sink_url}\"");
    let config = consumer_config(
        broker,
        url,
        &topic,
        &format!("hol-{ordering}"),
        &handler,
        &extra(ordering),
    );
    let outboxd = Outboxd::start(&config)?;
    // One message first, so that the run starts once the partitions are assigned.
    crate::dispatch::produce_range(broker, &topic, 1_000_000..1_000_001).await?;
    let began = Instant::now();
    while sink.delivered.lock().unwrap().is_empty() {
        if began.elapsed() > Duration::from_secs(60) {
            bail!("no delivery within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = per_sec * secs;
    let tick = Duration::from_millis(100);
    let per_tick = per_sec / 10;
    let start = Instant::now();
    for i in 0..total / per_tick {
        let from = i * per_tick;
        crate::dispatch::produce_range(broker, &topic, from as i64..(from + per_tick) as i64)
            .await?;
        let next = start + tick * (i as u32 + 1);
        tokio::time::sleep_until(next.into()).await;
    }
    let waited = Instant::now();
    while (sink.delivered.lock().unwrap().len() as u64) < total + 1 {
        if waited.elapsed() > Duration::from_secs(300) {
            bail!("not every message delivered within 300 s of the last produce");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outboxd.stop();
    let mut healthy: Vec<f64> = sink
        .delivered
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n % 100 != 0 && *n < 1_000_000)
        .map(|(_, d)| d * 1000.0)
        .collect();
    healthy.sort_by(f64::total_cmp);
    let at = |q: f64| healthy[((healthy.len() - 1) as f64 * q) as usize];
    Ok((at(0.5), at(0.99), at(1.0)))
}
