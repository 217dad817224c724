//! The key-order suite's parts: a receiving server that checks each key's order and
//! counts every message, a producer of keyed messages, and the set-up of an outboxd
//! consumer, in process or as a separate `outboxd run`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use outboxd::config::Config;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::consumer_helpers::*;
use crate::helpers::*;

/// A server that reads `{"k": key, "s": seq}` bodies: it records each key's delivered
/// sequence numbers, answers 503 to the keys it is told to fail, waits a random time up to
/// `jitter` per call, and counts the calls running at once.
#[derive(Clone, Default)]
pub(crate) struct KeyServer {
    pub(crate) url: String,
    pub(crate) state: Arc<KeyState>,
}

#[derive(Default)]
pub(crate) struct KeyState {
    pub(crate) delivered: Mutex<HashMap<String, Vec<u64>>>,
    /// Every call, in arrival order: (key, seq).
    pub(crate) calls: Mutex<Vec<(String, u64)>>,
    pub(crate) failing: Mutex<HashSet<String>>,
    /// Calls of this key from the given call number on (1-based) wait a minute.
    pub(crate) hang: Mutex<Option<(String, usize)>>,
    pub(crate) jitter_ms: AtomicUsize,
    /// While set, every call is answered 503 (an outage of the whole endpoint).
    pub(crate) down: AtomicBool,
    /// Seconds sent as `Retry-After` with each 503, when above 0.
    pub(crate) retry_after: AtomicUsize,
    /// When each call answered 503 because of `down` arrived.
    pub(crate) down_calls: Mutex<Vec<Instant>>,
    pub(crate) running: AtomicUsize,
    pub(crate) peak: AtomicUsize,
}

impl KeyServer {
    pub(crate) async fn start() -> KeyServer {
        let state = Arc::new(KeyState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/events", axum::routing::post(key_answer))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        KeyServer { url, state }
    }

    pub(crate) fn fail(&self, key: &str, failing: bool) {
        let mut f = self.state.failing.lock().unwrap();
        if failing {
            f.insert(key.to_owned());
        } else {
            f.remove(key);
        }
    }

    pub(crate) fn delivered(&self) -> HashMap<String, Vec<u64>> {
        self.state.delivered.lock().unwrap().clone()
    }

    pub(crate) fn delivered_count(&self) -> usize {
        self.state
            .delivered
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum()
    }

    pub(crate) fn calls_of(&self, key: &str) -> usize {
        let calls = self.state.calls.lock().unwrap();
        calls.iter().filter(|(k, _)| k == key).count()
    }
}

pub(crate) async fn key_answer(
    State(s): State<Arc<KeyState>>,
    body: Bytes,
) -> (StatusCode, HeaderMap) {
    let status = key_status(&s, body).await;
    let mut headers = HeaderMap::new();
    let after = s.retry_after.load(AtomicOrdering::SeqCst);
    if status == StatusCode::SERVICE_UNAVAILABLE && after > 0 {
        headers.insert("retry-after", after.to_string().parse().unwrap());
    }
    (status, headers)
}

async fn key_status(s: &KeyState, body: Bytes) -> StatusCode {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let (key, seq) = (
        v["k"].as_str().unwrap().to_owned(),
        v["s"].as_u64().unwrap(),
    );
    let running = s.running.fetch_add(1, AtomicOrdering::SeqCst) + 1;
    s.peak.fetch_max(running, AtomicOrdering::SeqCst);
    let call = {
        let mut calls = s.calls.lock().unwrap();
        calls.push((key.clone(), seq));
        calls.iter().filter(|(k, _)| *k == key).count()
    };
    let hang = s.hang.lock().unwrap().clone();
    if hang.is_some_and(|(k, from)| k == key && call >= from) {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let jitter = s.jitter_ms.load(AtomicOrdering::SeqCst) as u64;
    if jitter > 0 {
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..jitter * 1000))).await;
    }
    s.running.fetch_sub(1, AtomicOrdering::SeqCst);
    if s.down.load(AtomicOrdering::SeqCst) {
        s.down_calls.lock().unwrap().push(Instant::now());
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if s.failing.lock().unwrap().contains(&key) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    s.delivered
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .push(seq);
    StatusCode::OK
}

/// Produces `per_key` messages for each of `keys` keys, `{"k": "k<i>", "s": <seq>}`,
/// spread over `partitions` by key (key `k<i>` on partition `i % partitions`), keyed with
/// the key unless `keyless`.
pub(crate) async fn produce_keys(
    bootstrap: &str,
    topic: &str,
    partitions: usize,
    keys: usize,
    per_key: u64,
    keyless: bool,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut deliveries = Vec::new();
    for seq in 0..per_key {
        for i in 0..keys {
            let key = format!("k{i}");
            let value = format!(r#"{{"k": "{key}", "s": {seq}}}"#);
            let mut record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                .partition((i % partitions) as i32)
                .payload(&value);
            if !keyless {
                record = record.key(&key);
            }
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    for d in deliveries {
        d.await.unwrap().expect("produced");
    }
}

/// Every key's delivered sequence numbers are `0..per_key`, in order, once each.
pub(crate) fn assert_in_order_once(server: &KeyServer, keys: usize, per_key: u64) {
    let delivered = server.delivered();
    assert_eq!(delivered.len(), keys, "every key delivered");
    let want: Vec<u64> = (0..per_key).collect();
    for (key, seqs) in &delivered {
        assert_eq!(
            seqs, &want,
            "key {key}: delivered out of order, twice or not at all"
        );
    }
}

/// Checks one key's deliveries across crashes: each is the next sequence number after the
/// one before, or a step back to replay from an earlier point (what a restart does with
/// messages handled after the last commit), and the numbers reach `per_key - 1`. Returns
/// the number of steps back; any gap, jump ahead or missing tail is an error.
pub(crate) fn replays_in_order(seqs: &[u64], per_key: u64) -> Result<usize, String> {
    let mut rewinds = 0;
    let mut prev: Option<u64> = None;
    for (i, &s) in seqs.iter().enumerate() {
        match prev {
            None if s != 0 => return Err(format!("starts at {s}, not 0")),
            None => {}
            Some(p) if s == p + 1 => {}
            Some(p) if s <= p => rewinds += 1,
            Some(p) => return Err(format!("{s} after {p} at delivery {i}: a gap")),
        }
        prev = Some(s);
    }
    let top = seqs.iter().max().copied();
    if top != Some(per_key - 1) {
        return Err(format!("reached {top:?}, not {}", per_key - 1));
    }
    Ok(rewinds)
}

#[test]
fn replays_in_order_accepts_replays_and_refuses_gaps() {
    assert_eq!(replays_in_order(&[0, 1, 2], 3), Ok(0));
    assert_eq!(replays_in_order(&[0, 1, 2, 1, 2], 3), Ok(1));
    assert_eq!(replays_in_order(&[0, 1, 1, 2, 0, 1, 2], 3), Ok(2));
    assert!(replays_in_order(&[0, 2, 1], 3).is_err(), "reordered");
    assert!(
        replays_in_order(&[0, 1, 0, 2], 3).is_err(),
        "replay skips 1"
    );
    assert!(replays_in_order(&[1, 2], 3).is_err(), "0 lost");
    assert!(replays_in_order(&[0, 1], 3).is_err(), "tail lost");
}

pub(crate) fn key_config(bootstrap: &str, topic: &str, url: &str, max_in_flight: usize) -> Config {
    let mut cfg = web_consumer(bootstrap, topic, url);
    let c = cfg.consumer.as_mut().unwrap();
    c.max_in_flight = max_in_flight;
    c.retry.max_attempts = 10_000;
    cfg
}

/// Writes the config of a consumer of `topic` posting to `url`, as a file for a separate
/// `outboxd run` process.
pub(crate) fn process_config(
    dir: &std::path::Path,
    bootstrap: &str,
    topic: &str,
    url: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("outboxd.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 6000\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [consumer]\ngroup_id = \"{}\"\ntopics = [\"{topic}\"]\n{extra}\n\
             [[consumer.routes]]\ntopic = \"{topic}\"\nhandler = \"web\"\n\
             [handlers.web]\nkind = \"http\"\nurl = \"{url}\"\n",
            unique("group")
        ),
    )
    .unwrap();
    path
}

pub(crate) fn spawn(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(crate::cli::BIN)
        .args(["run", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

pub(crate) fn kill(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}
