//! `command`: runs a program directly (no shell) with the value on stdin and the message's
//! metadata in `OUTBOXD_*` variables. Exit 0 done; a listed exit code, death by signal or
//! a timeout retry; any other exit code dead-letters with the tail of stderr.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::message::Message;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{ErrorClass, Event, Handle, Outcome};
use crate::config::CommandHandlerConfig;

/// How much of stderr goes into an error message.
const STDERR_TAIL: usize = 1024;

/// One program.
pub struct CommandHandler {
    program: PathBuf,
    args: Vec<String>,
    /// Milliseconds; a reload may change it.
    timeout_ms: AtomicU64,
    retry_exit_codes: Vec<i32>,
}

impl CommandHandler {
    /// A handler running the configured program.
    pub fn new(c: &CommandHandlerConfig) -> Self {
        CommandHandler {
            program: c.program.clone(),
            args: c.args.clone(),
            timeout_ms: AtomicU64::new(c.timeout.as_millis() as u64),
            retry_exit_codes: c.retry_exit_codes.clone(),
        }
    }

    /// Takes the new timeout (a reload).
    pub fn reconfigure(&self, c: &CommandHandlerConfig) {
        self.timeout_ms
            .store(c.timeout.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Handle for CommandHandler {
    async fn handle(&self, event: &Event, attempt: u32) -> Outcome {
        let m = &event.message;
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        let spawned = Command::new(&self.program)
            .args(&self.args)
            .env("OUTBOXD_TOPIC", m.topic())
            .env("OUTBOXD_PARTITION", m.partition().to_string())
            .env("OUTBOXD_OFFSET", m.offset().to_string())
            .env("OUTBOXD_KEY", event.key().as_ref())
            .env("OUTBOXD_EVENT_ID", event.event_id().as_ref())
            .env("OUTBOXD_EVENT_TYPE", event.event_type().unwrap_or_default())
            .env("OUTBOXD_ATTEMPT", attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                return Outcome::Retry(format!("cannot start {}: {e}", self.program.display()))
            }
        };
        let stdin = child.stdin.take();
        let value = event.value();
        let run = async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read its input is fine: ignore a broken pipe.
                let _ = stdin.write_all(value).await;
            }
            child.wait_with_output().await
        };
        // On timeout the future is dropped, which kills the child (kill_on_drop).
        let output = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Outcome::Retry(format!("waiting for the program: {e}")),
            Err(_) => {
                return Outcome::Retry(format!(
                    "{} did not finish within {:?} and was killed",
                    self.program.display(),
                    timeout
                ))
            }
        };
        let stderr = tail(&output.stderr);
        match output.status.code() {
            Some(0) => Outcome::Done,
            Some(code) if self.retry_exit_codes.contains(&code) => {
                Outcome::Retry(format!("exit code {code}: {stderr}"))
            }
            Some(code) => {
                Outcome::DeadLetter(ErrorClass::Permanent, format!("exit code {code}: {stderr}"))
            }
            None => Outcome::Retry(format!("killed by a signal: {stderr}")),
        }
    }
}

/// The last `STDERR_TAIL` bytes of stderr, trimmed, as text.
fn tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&stderr[start..]).trim().to_owned()
}
