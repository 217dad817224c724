//! The http handler in batches, against a receiver that parses each batch with the
//! CloudEvents SDK (Python `cloudevents`, `tests/cloudevents_receiver.py`): each event
//! arrives once, in per-key order, and a batch refused with 400 for one poison event
//! dead-letters that event alone.

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::consumer_helpers::*;
use crate::helpers::*;

/// The receiver process; killed when dropped.
struct Receiver {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Receiver {
    fn start() -> Receiver {
        let mut child = Command::new("python3")
            .arg("tests/cloudevents_receiver.py")
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the receiver (scripts/test.sh installs the cloudevents SDK)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the receiver's port, got {line:?}"));
        Receiver {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.addr, path).await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_batches_deliver_each_event_once_and_dead_letter_only_the_poison() {
    let receiver = Receiver::start();
    let (topic, _cluster, bootstrap) = consuming("cebatch", 2);
    let (keys, per_key) = (30, 10);
    let mut values: Vec<Identified> = Vec::new();
    for s in 0..per_key {
        for k in 0..keys {
            let value = format!(r#"{{"k": "k{k}", "s": {s}}}"#);
            values.push((
                (k % 2) as i32,
                format!("k{k}"),
                value,
                format!("{topic}-{k}-{s}"),
            ));
            if k == 5 && s == 4 {
                let poison = r#"{"k": "k5", "s": -1, "poison": true}"#.to_owned();
                values.push((1, "k5".into(), poison, format!("{topic}-poison")));
            }
        }
    }
    produce_identified(&bootstrap, &topic, &values, &[("event-type", "Counted")]).await;
    let url = format!("http://{}/events", receiver.addr);
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![("web", http_to(&url, "batch_size = 16"))],
    );
    cfg.consumer.as_mut().unwrap().max_in_flight = 64;
    let daemon = Daemon::start(cfg).await;
    let total = keys * per_key;
    eventually("every event taken", Duration::from_secs(30), || async {
        receiver.get("/events").await.as_array().unwrap().len() >= total
    })
    .await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    let taken = receiver.get("/events").await;
    let taken = taken.as_array().unwrap();
    assert_eq!(taken.len(), total, "each event once");
    let mut last: HashMap<String, i64> = HashMap::new();
    for event in taken {
        let data = &event[1];
        let (k, s) = (data["k"].as_str().unwrap(), data["s"].as_i64().unwrap());
        let before = last.insert(k.to_owned(), s).unwrap_or(-1);
        assert_eq!(s, before + 1, "{k}: {s} after {before}");
    }
    assert!(last.values().all(|s| *s == per_key as i64 - 1));
    let ids: Vec<&str> = dead
        .iter()
        .map(|d| d.headers["event-id"].as_str())
        .collect();
    assert_eq!(ids, [format!("{topic}-poison")], "the poison alone");
    assert_eq!(dead[0].headers["outboxd-dlt-error-class"], "permanent");
    assert!(
        dead[0].headers["outboxd-dlt-error-message"].contains("400"),
        "{:?}",
        dead[0].headers
    );
    let batches = receiver.get("/batches").await;
    let sizes: Vec<u64> = batches
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert!(
        sizes.iter().any(|n| *n > 1),
        "events went in batches: {sizes:?}"
    );
    let handler = [("handler", "web")];
    assert!(daemon.metric("outboxd_consumer_batch_splits_total", &handler) >= 1.0);
    daemon.stop().await.unwrap();
}
