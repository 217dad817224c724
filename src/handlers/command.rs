//! `command`: runs a program directly (no shell) with the value on stdin and the message's
//! metadata in `OUTBOXD_*` variables. Exit 0 done; a listed exit code, death by signal or
//! a timeout retry; any other exit code dead-letters with the tail of stderr.
//!
//! The child gets a clean environment (`PATH`, the configured variables, the event
//! variables) and a process group of its own, which is killed whole on timeout. Its input
//! is written while its stderr is read, so neither pipe can block the other; both are let
//! go once the child has exited, so a background process it left holding them does not
//! hold up the outcome.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::message::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio_util::sync::CancellationToken;

use super::{ErrorClass, Event, Handle, Outcome};
use crate::config::{event_vars, CommandHandlerConfig};

/// How much of stderr goes into an error message.
const STDERR_TAIL: usize = 1024;

/// How long stderr is still read after the child exited: what it wrote before exiting is
/// in the pipe already; a process it left running may hold the pipe open for ever.
const STDERR_GRACE: Duration = Duration::from_millis(100);

/// `PATH` for the child when outboxd has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// One program.
pub struct CommandHandler {
    program: PathBuf,
    args: Vec<String>,
    /// Milliseconds; a reload may change it.
    timeout_ms: AtomicU64,
    retry_exit_codes: Vec<i32>,
    /// The child's environment before the event variables: `PATH`, the inherited
    /// variables, then `env`, resolved once at start.
    base_env: Vec<(OsString, OsString)>,
}

impl CommandHandler {
    /// A handler running the configured program.
    pub fn new(c: &CommandHandlerConfig) -> Self {
        let mut base_env = vec![(
            OsString::from("PATH"),
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        )];
        for name in &c.inherit_env {
            if let Some(value) = std::env::var_os(name) {
                base_env.push((name.into(), value));
            }
        }
        base_env.extend(c.env.iter().map(|(k, v)| (k.into(), v.into())));
        CommandHandler {
            program: c.program.clone(),
            args: c.args.clone(),
            timeout_ms: AtomicU64::new(c.timeout.as_millis() as u64),
            retry_exit_codes: c.retry_exit_codes.clone(),
            base_env,
        }
    }

    /// Takes the new timeout (a reload).
    pub fn reconfigure(&self, c: &CommandHandlerConfig) {
        self.timeout_ms
            .store(c.timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The event variables; a value a process environment cannot carry (a NUL byte) is
    /// named in the error.
    fn event_env(event: &Event, attempt: u32) -> Result<Vec<(&'static str, String)>, String> {
        let m = &event.message;
        let vars = vec![
            (event_vars::TOPIC, m.topic().to_owned()),
            (event_vars::PARTITION, m.partition().to_string()),
            (event_vars::OFFSET, m.offset().to_string()),
            (event_vars::KEY, event.key().into_owned()),
            (event_vars::EVENT_ID, event.event_id().into_owned()),
            (
                event_vars::EVENT_TYPE,
                event.event_type().unwrap_or_default().to_owned(),
            ),
            (event_vars::ATTEMPT, attempt.to_string()),
        ];
        match vars.iter().find(|(_, value)| value.contains('\0')) {
            Some((name, _)) => Err(format!(
                "{name} would contain a NUL byte, which a process environment cannot carry"
            )),
            None => Ok(vars),
        }
    }
}

impl Handle for CommandHandler {
    async fn handle(&self, event: &Event, attempt: u32) -> Outcome {
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        let vars = match Self::event_env(event, attempt) {
            Ok(vars) => vars,
            Err(e) => return Outcome::DeadLetter(ErrorClass::Permanent, e),
        };
        let spawned = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .envs(self.base_env.iter().map(|(k, v)| (k, v)))
            .envs(vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                return Outcome::Retry(format!("cannot start {}: {e}", self.program.display()))
            }
        };
        // Kills the child's group if this future is dropped (shutdown) or times out.
        let group = GroupGuard(child.id());
        let finished = tokio::time::timeout(timeout, run(&mut child, event.value())).await;
        let (status, stderr) = match finished {
            Ok(Ok(done)) => {
                group.disarm();
                done
            }
            Ok(Err(e)) => return Outcome::Retry(format!("waiting for the program: {e}")),
            Err(_) => {
                drop(group);
                // The group kill reached it; kill it directly too in case it did not (its
                // id did not fit a pid), then reap it now rather than leave it to the
                // runtime.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Outcome::Retry(format!(
                    "{} did not finish within {:?}; its process group was killed",
                    self.program.display(),
                    timeout
                ));
            }
        };
        let stderr = tail(&stderr);
        match status.code() {
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

/// Feeds `input` to the child and collects the tail of its stderr until it exits.
async fn run(child: &mut Child, input: &[u8]) -> std::io::Result<(ExitStatus, Vec<u8>)> {
    let stdin = child.stdin.take();
    let stderr = child.stderr.take();
    let exited = CancellationToken::new();
    let wait = async {
        let status = child.wait().await;
        exited.cancel();
        status
    };
    let ((), stderr, status) = tokio::join!(
        write_input(stdin, input, &exited),
        read_tail(stderr, &exited),
        wait
    );
    Ok((status?, stderr))
}

/// Writes `input` and closes stdin; stops when the child exited. A program that does not
/// read its input is fine: a broken pipe is ignored.
async fn write_input(stdin: Option<ChildStdin>, input: &[u8], exited: &CancellationToken) {
    let Some(mut stdin) = stdin else { return };
    tokio::select! {
        _ = stdin.write_all(input) => {}
        () = exited.cancelled() => {}
    }
}

/// Reads stderr to its end, or until `STDERR_GRACE` after the child exited, keeping the
/// last `STDERR_TAIL` bytes.
async fn read_tail(stderr: Option<impl AsyncRead + Unpin>, exited: &CancellationToken) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut stderr) = stderr else {
        return kept;
    };
    let mut buf = [0u8; 4096];
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let grace = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now));
        tokio::select! {
            read = stderr.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * STDERR_TAIL {
                        kept.drain(..kept.len() - STDERR_TAIL);
                    }
                }
            },
            () = exited.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + STDERR_GRACE);
            }
            () = grace, if deadline.is_some() => break,
        }
    }
    kept
}

/// Kills the process group of a child that has not finished (timeout, or the handler
/// call dropped at shutdown), grandchildren included.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    /// The child finished: leave its group alone (a process it started on purpose may
    /// live on).
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: killpg has no memory effects; the group is the unreaped child's own
            // (`process_group(0)`), so its id cannot have been reused.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
    }
}

/// The last `STDERR_TAIL` bytes of stderr, trimmed, as text.
fn tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&stderr[start..]).trim().to_owned()
}
