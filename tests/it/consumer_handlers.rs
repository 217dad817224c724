//! The command, kafka and http handlers against real processes, a real broker and a real
//! HTTP server.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};

use crate::consumer_helpers::*;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_exit_codes_timeouts_and_literal_arguments() {
    let (topic, _cluster, bootstrap) = consuming("cmd", 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let pid = dir.path().join("pid");
    let injected = dir.path().join("injected");
    // The test uses sh to script the child; outboxd itself runs it directly, and the
    // last argument must arrive unexpanded.
    let script = r#"
        input=$(cat)
        case "$OUTBOXD_EVENT_TYPE" in
          ok) ;;
          flaky) [ "$OUTBOXD_ATTEMPT" -ge 2 ] || exit 75 ;;
          broken) echo "cannot parse $input" >&2; exit 3 ;;
          slow) echo $$ > "$2"; sleep 30 ;;
        esac
        printf '%s|%s|%s|%s\n' "$OUTBOXD_EVENT_TYPE" "$OUTBOXD_ATTEMPT" "$input" "$3" >> "$1"
    "#;
    let handler_toml = format!(
        "kind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}, \"sh\", \"{}\", \"{}\", \"$(touch {})\"]\ntimeout = \"300ms\"\nretry_exit_codes = [75]\n[retry]\nmax_attempts = 2\n",
        out.display(),
        pid.display(),
        injected.display()
    );
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "cmd")],
        vec![("cmd", handler(&handler_toml))],
    );
    produce(
        &bootstrap,
        &topic,
        &[
            (0, "k", b"one", &[("event-type", "ok")]),
            (0, "k", b"two", &[("event-type", "flaky")]),
            (0, "k", b"three", &[("event-type", "broken")]),
            (0, "k", b"four", &[("event-type", "slow")]),
            (0, "k", b"five", &[("event-type", "ok")]),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        2,
        Duration::from_millis(200),
        Duration::from_secs(30),
    )
    .await;
    eventually("last message handled", Duration::from_secs(10), || async {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            == 3
    })
    .await;
    let handled = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = handled.lines().collect();
    let literal = format!("$(touch {})", injected.display());
    assert_eq!(
        lines,
        [
            format!("ok|1|one|{literal}"),
            format!("flaky|2|two|{literal}"),
            format!("ok|1|five|{literal}"),
        ]
    );
    assert!(!injected.exists(), "the argument was expanded by a shell");

    let broken = dead
        .iter()
        .find(|d| d.payload == b"three")
        .expect("broken dead-lettered");
    assert_eq!(broken.headers["outboxd-dlt-error-class"], "permanent");
    assert!(
        broken.headers["outboxd-dlt-error-message"].contains("exit code 3: cannot parse three"),
        "{:?}",
        broken.headers
    );
    let slow = dead
        .iter()
        .find(|d| d.payload == b"four")
        .expect("slow dead-lettered");
    assert_eq!(
        slow.headers["outboxd-dlt-error-class"],
        "retryable_exhausted"
    );
    assert!(
        slow.headers["outboxd-dlt-error-message"].contains("killed"),
        "{:?}",
        slow.headers
    );
    let child: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually(
        "timed-out child is gone",
        Duration::from_secs(5),
        || async { !std::path::Path::new(&format!("/proc/{child}")).exists() },
    )
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_handler_forwards_key_value_and_headers() {
    let (topic, cluster, bootstrap) = consuming("mirror", 1);
    let mirror = format!("{topic}.mirror");
    cluster.create_topic(&mirror, 1, 1).unwrap();
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "mirror")],
        vec![(
            "mirror",
            handler(&format!("kind = \"kafka\"\ntopic = \"{mirror}\"")),
        )],
    );
    produce(
        &bootstrap,
        &topic,
        &[
            (
                0,
                "acc-1",
                br#"{"n": 1}"#,
                &[("event-id", "m-1"), ("traceparent", "00-a-b-01")],
            ),
            (0, "acc-2", br#"{"n": 2}"#, &[("event-id", "m-2")]),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    let forwarded = consume(
        &bootstrap,
        &mirror,
        2,
        Duration::from_millis(300),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(forwarded.len(), 2, "forwarded once each");
    assert_eq!((forwarded[0].key.as_str(), forwarded[0].n), ("acc-1", 1));
    assert_eq!(forwarded[0].headers["event-id"], "m-1");
    assert_eq!(forwarded[0].headers["traceparent"], "00-a-b-01");
    assert_eq!((forwarded[1].key.as_str(), forwarded[1].n), ("acc-2", 2));
    daemon.stop().await.unwrap();
}

/// Answers 200 with a body that arrives in two parts 20 ms apart, so that it is still
/// being read when the handler has the status; notes each request's client address.
async fn answer_slow_body(
    State(peers): State<Arc<Mutex<Vec<SocketAddr>>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Body {
    peers.lock().unwrap().push(peer);
    let parts = futures::stream::unfold(0, |part| async move {
        match part {
            0 => Some((Ok::<_, std::io::Error>(vec![b'a'; 1000]), 1)),
            1 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((Ok(vec![b'b'; 1000]), 2))
            }
            _ => None,
        }
    });
    Body::from_stream(parts)
}

/// An endpoint answering with [`answer_slow_body`]: its URL, and the client address of
/// every request so far.
async fn endpoint_noting_peers() -> (String, Arc<Mutex<Vec<SocketAddr>>>) {
    let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/events", axum::routing::post(answer_slow_body))
        .with_state(peers.clone());
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    (url, peers)
}

/// Runs `config` until `peers` counts `requests`; returns how many connections they took.
async fn connections_for(
    mut config: outboxd::config::Config,
    peers: &Mutex<Vec<SocketAddr>>,
    requests: usize,
) -> usize {
    // One call at a time, so that each may take the connection the last one left.
    config.consumer.as_mut().unwrap().ordering = outboxd::config::Ordering::Partition;
    let daemon = Daemon::start(config).await;
    eventually("every request", Duration::from_secs(30), || async {
        peers.lock().unwrap().len() == requests
    })
    .await;
    daemon.stop().await.unwrap();
    let connections: HashSet<SocketAddr> = peers.lock().unwrap().iter().copied().collect();
    connections.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_keeps_its_connection_when_responses_have_bodies() {
    let (topic, _cluster, bootstrap) = consuming("keepalive", 1);
    let (url, peers) = endpoint_noting_peers().await;
    produce_events(&bootstrap, &topic, 0, "ka", "Any", 0..10).await;
    let connections = connections_for(web_consumer(&bootstrap, &topic, &url), &peers, 10).await;
    // hyper's pool returns a connection from a task of its own, so the second request may
    // find none idle yet and open a second one; after that one of the two is always idle.
    // A connection closed after each response would make ten.
    assert!(
        connections <= 2,
        "ten requests in a row took {connections} connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handlers_of_one_endpoint_share_its_connections() {
    let (topic, _cluster, bootstrap) = consuming("shared", 1);
    let (url, peers) = endpoint_noting_peers().await;
    let types = ["A", "B", "C", "D"];
    // One partition: the events are handled one after the other, by four handlers in turn.
    for (i, event_type) in (0..12).zip(types.iter().cycle()) {
        produce_events(&bootstrap, &topic, 0, "sh", event_type, i..i + 1).await;
    }
    let names: Vec<String> = types.iter().map(|t| t.to_lowercase()).collect();
    let routes: Vec<(&str, Option<&str>, &str)> = types
        .iter()
        .zip(&names)
        .map(|(t, name)| (topic.as_str(), Some(*t), name.as_str()))
        .collect();
    let handlers = names
        .iter()
        .map(|name| (name.as_str(), http_to(&url, "")))
        .collect();
    let config = consumer_config(&bootstrap, &[&topic], &routes, handlers);
    let connections = connections_for(config, &peers, 12).await;
    // A client per handler would keep a connection per handler: four.
    assert!(
        connections <= 2,
        "twelve requests by four handlers took {connections} connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_name_the_cause_but_not_the_query_or_credentials() {
    let (topic, _cluster, bootstrap) = consuming("httpleak", 1);
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://bot:pa55-word@127.0.0.1:{port}/hook?token=tok-sekrit&x=1");
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![("web", http_to(&url, "[retry]\nmax_attempts = 1"))],
    );
    produce_events(&bootstrap, &topic, 0, "leak", "Any", 0..1).await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_millis(200),
        Duration::from_secs(30),
    )
    .await;
    daemon.stop().await.unwrap();
    let message = &dead[0].headers["outboxd-dlt-error-message"];
    assert!(
        message.contains(&format!("http://127.0.0.1:{port}/hook")),
        "{message}"
    );
    assert!(message.contains("refused"), "the cause is named: {message}");
    for secret in ["tok-sekrit", "token", "pa55-word", "bot"] {
        assert!(!message.contains(secret), "`{secret}` in {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_statuses_are_retried_while_others_dead_letter() {
    let (topic, _cluster, bootstrap) = consuming("retrystatus", 1);
    // 401 twice (a token rotating), then accepted; a 403 later stays permanent.
    let server = TestServer::start(&[401, 401, 200, 403], 200).await;
    let mut cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "web")],
        vec![(
            "web",
            http_to(
                &server.url,
                "retry_statuses = [401]\n[retry]\nmax_attempts = 5",
            ),
        )],
    );
    // The server answers from its script in arrival order: one call at a time.
    cfg.consumer.as_mut().unwrap().ordering = outboxd::config::Ordering::Partition;
    produce_events(&bootstrap, &topic, 0, "rs", "Any", 0..2).await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        1,
        Duration::from_millis(300),
        Duration::from_secs(30),
    )
    .await;
    daemon.stop().await.unwrap();
    assert_eq!(
        server.count(),
        4,
        "three calls for the first event, one for the second"
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id(), "rs-1");
    assert_eq!(dead[0].headers["outboxd-dlt-error-class"], "permanent");
    assert!(dead[0].headers["outboxd-dlt-error-message"].contains("403"));
}
