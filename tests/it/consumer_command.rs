//! The command handler's children, as real processes: what environment they see, pipes
//! that fill up, processes they leave behind, and values a process cannot be given.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::consumer_helpers::*;
use crate::helpers::*;

/// A command handler running `script` under `/bin/sh -c` with `$1` = `dir`, plus extra
/// TOML lines.
fn script_handler(script: &str, dir: &Path, extra: &str) -> outboxd::config::HandlerConfig {
    handler(&format!(
        "kind = \"command\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", {script:?}, \"sh\", \"{}\"]\n{extra}",
        dir.display()
    ))
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_see_only_path_the_configured_variables_and_the_event() {
    let (topic, _cluster, bootstrap) = consuming("cmdenv", 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "cmd")],
        vec![(
            "cmd",
            script_handler(
                r#"env > "$1/env""#,
                dir.path(),
                "inherit_env = [\"HOME\", \"OUTBOXD_TEST_NOT_SET\"]\nenv = { GREETING = \"hi\" }",
            ),
        )],
    );
    produce(
        &bootstrap,
        &topic,
        &[(0, "k", b"v", &[("event-id", "e-1"), ("event-type", "T")])],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    let file = dir.path().join("env");
    eventually("the child ran", Duration::from_secs(20), || async {
        std::fs::read_to_string(&file).is_ok_and(|s| s.contains("OUTBOXD_ATTEMPT"))
    })
    .await;
    daemon.stop().await.unwrap();
    let seen = std::fs::read_to_string(&file).unwrap();
    let names: BTreeSet<&str> = seen
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        // The shell itself exports its working directory.
        .filter(|k| *k != "PWD")
        .collect();
    let expected: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "GREETING",
        "OUTBOXD_TOPIC",
        "OUTBOXD_PARTITION",
        "OUTBOXD_OFFSET",
        "OUTBOXD_KEY",
        "OUTBOXD_EVENT_ID",
        "OUTBOXD_EVENT_TYPE",
        "OUTBOXD_ATTEMPT",
    ]
    .into();
    assert!(
        std::env::vars().count() > expected.len(),
        "the test process has more variables than a child may see"
    );
    assert_eq!(names, expected, "the child's environment:\n{seen}");
    assert!(seen.contains("GREETING=hi\n") && seen.contains("OUTBOXD_EVENT_ID=e-1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pipes_leftover_processes_and_nul_bytes_get_the_right_outcome() {
    let (topic, _cluster, bootstrap) = consuming("cmdpipes", 1);
    let dir = tempfile::tempdir().unwrap();
    // chatty: fills stderr (far past a pipe's 64 KiB) before it reads its input.
    // leaves: starts a process that keeps stderr open, and succeeds.
    // hangs: starts a grandchild, then outlives the timeout.
    let script = r#"
        case "$OUTBOXD_EVENT_TYPE" in
          chatty) head -c 300000 /dev/zero | tr '\0' x >&2; wc -c > "$1/chatty" ;;
          leaves) sleep 60 & echo $! > "$1/left"; echo done >> "$1/leaves" ;;
          hangs) sleep 60 & echo $! > "$1/grandchild"; sleep 60 ;;
          *) echo "$OUTBOXD_KEY" >> "$1/ok" ;;
        esac
    "#;
    let cfg = consumer_config(
        &bootstrap,
        &[&topic],
        &[(&topic, None, "cmd")],
        vec![(
            "cmd",
            script_handler(
                script,
                dir.path(),
                "timeout = \"3s\"\n[retry]\nmax_attempts = 1",
            ),
        )],
    );
    let big = vec![b'i'; 300_000];
    produce(
        &bootstrap,
        &topic,
        &[
            (0, "a", &big, &[("event-type", "chatty")]),
            (0, "b", b"x", &[("event-type", "leaves")]),
            (0, "c\0d", b"x", &[("event-type", "plain")]),
            (0, "e", b"x", &[("event-type", "hangs")]),
            (0, "f", b"x", &[("event-type", "plain")]),
        ],
    )
    .await;
    let daemon = Daemon::start(cfg).await;
    let dead = consume(
        &bootstrap,
        &format!("{topic}.dlq"),
        2,
        Duration::from_millis(300),
        Duration::from_secs(40),
    )
    .await;
    eventually(
        "the last message handled",
        Duration::from_secs(20),
        || async { dir.path().join("ok").exists() },
    )
    .await;
    daemon.stop().await.unwrap();

    // Input and stderr were served together: the child read all of its input.
    let chatty = std::fs::read_to_string(dir.path().join("chatty")).unwrap();
    assert_eq!(chatty.trim(), "300000");
    // A process left holding stderr did not make a success a retry.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("leaves")).unwrap(),
        "done\n",
        "handled once"
    );
    let left = std::fs::read_to_string(dir.path().join("left")).unwrap();
    assert!(
        alive(&left),
        "a process a successful child started is left alone"
    );
    let _ = std::process::Command::new("kill").arg(left.trim()).status();
    // The timeout killed the whole group.
    let grandchild = std::fs::read_to_string(dir.path().join("grandchild")).unwrap();
    eventually("the grandchild is gone", Duration::from_secs(5), || async {
        !alive(&grandchild)
    })
    .await;

    let mut classes: Vec<(String, String, String)> = dead
        .iter()
        .map(|d| {
            (
                d.key.clone(),
                d.headers["outboxd-dlt-error-class"].clone(),
                d.headers["outboxd-dlt-attempts"].clone(),
            )
        })
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            ("c\0d".to_owned(), "permanent".to_owned(), "1".to_owned()),
            (
                "e".to_owned(),
                "retryable_exhausted".to_owned(),
                "1".to_owned()
            ),
        ],
        "only the NUL key (at once, permanent) and the hanging child are dead letters"
    );
    let nul = dead.iter().find(|d| d.key == "c\0d").unwrap();
    assert!(
        nul.headers["outboxd-dlt-error-message"].contains("NUL byte"),
        "{:?}",
        nul.headers
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ok")).unwrap(),
        "f\n"
    );
}
