//! Starting a server and waiting until it is ready, holding its process, and running short-lived
//! tools with a timeout. Everything is forked through [`crate::spawner`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::spawner::{describe, spawn};
use crate::sys;

/// How often readiness and exits are polled.
const POLL: Duration = Duration::from_millis(25);
/// How many log lines a start failure shows.
const LOG_TAIL_LINES: usize = 20;
/// Written to the log before each start, so a failure shows only the latest attempt's lines.
const START_MARKER: &str = "==== testkit: starting ";

/// A running server process owned by the kit. Dropping it kills the process.
pub(crate) struct ServerProcess {
    pid: u32,
    // A mutex only so that `&self` can ask whether the process still runs (`try_wait` needs
    // `&mut Child`); no I/O happens while it is held.
    child: Mutex<Child>,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("pid", &self.pid)
            .finish()
    }
}

impl ServerProcess {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(child.try_wait(), Ok(None))
    }

    /// SIGKILL, then reap, so the port and data directory are free once this returns.
    pub(crate) fn kill(self) {
        drop(self);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Errors mean the process has already exited (and possibly been reaped by try_wait);
        // either way there is nothing left to stop.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What to start and how to tell that it is up.
pub(crate) struct Launch<'a> {
    /// Short binary name for messages, e.g. `redis-server`.
    pub(crate) name: &'a str,
    pub(crate) command: Command,
    /// The server's stdout and stderr are appended here.
    pub(crate) log: &'a Path,
    /// The port the server must end up listening on (checked against the process, see
    /// [`sys::listens_on`]).
    pub(crate) port: u16,
    pub(crate) ready_within: Duration,
    /// Log phrases (lowercase) after which starting again may succeed, e.g. a port race.
    pub(crate) retry_when: &'a [&'a str],
}

/// A failed start, and whether trying again (new port, or the same one a little later) may help.
#[derive(Debug)]
pub(crate) struct LaunchFailure {
    // Boxed to keep `Result<_, LaunchFailure>` small; failures are rare and slow anyway.
    pub(crate) error: Box<Error>,
    pub(crate) retryable: bool,
}

impl From<Error> for LaunchFailure {
    fn from(error: Error) -> Self {
        LaunchFailure {
            error: Box::new(error),
            retryable: false,
        }
    }
}

/// Starts the server and polls `probe` until it answers, the process exits, or time runs out.
pub(crate) fn launch(
    launch: Launch<'_>,
    mut probe: impl FnMut() -> Result<(), String>,
) -> Result<ServerProcess, LaunchFailure> {
    let Launch {
        name,
        mut command,
        log,
        port,
        ready_within,
        retry_when,
    } = launch;
    let described = describe(&command);
    let failure = |reason: String| Error::Start {
        binary: name.to_string(),
        command: described.clone(),
        reason,
        log: log.to_path_buf(),
        log_tail: log_tail(log),
    };

    let mut log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io(format!("opening log file {}", log.display())))?;
    writeln!(log_file, "{START_MARKER}{described}")
        .map_err(Error::io(format!("writing log file {}", log.display())))?;
    let stdout = log_file
        .try_clone()
        .map_err(Error::io("duplicating the log file handle"))?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(log_file);

    let mut child = spawn(command)?;
    let pid = child.id();
    let deadline = Instant::now() + ready_within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let error = failure(format!("exited with {status} before it was ready"));
            let retryable = match &error {
                Error::Start { log_tail, .. } => {
                    let tail = log_tail.to_lowercase();
                    retry_when.iter().any(|phrase| tail.contains(phrase))
                }
                _ => false,
            };
            return Err(LaunchFailure {
                error: Box::new(error),
                retryable,
            });
        }
        let last = match probe() {
            // `None`: the kernel cannot tell us who listens; trust the probe.
            Ok(()) if sys::listens_on(pid, port) != Some(false) => {
                return Ok(ServerProcess {
                    pid,
                    child: Mutex::new(child),
                });
            }
            // Someone else holds the port; ours will fail to bind and exit (retryable above).
            Ok(()) => format!("port {port} answers, but not from pid {pid}"),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failure(format!(
                "not ready within {ready_within:?}; last check: {last}"
            ))
            .into());
        }
        std::thread::sleep(POLL);
    }
}

/// Retries `attempt` while it fails in a retryable way, for up to `window`. Used by restarts,
/// which must reuse their port: right after a kill it may briefly still be in use.
pub(crate) fn retry_for(
    window: Duration,
    mut attempt: impl FnMut() -> Result<(), LaunchFailure>,
) -> Result<()> {
    let deadline = Instant::now() + window;
    loop {
        match attempt() {
            Ok(()) => return Ok(()),
            Err(failure) if failure.retryable && Instant::now() < deadline => {
                tracing::debug!(error = %failure.error, "restart failed, retrying on the same port");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(failure) => return Err(*failure.error),
        }
    }
}

/// The last lines of the latest start attempt recorded in a server log.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = match std::fs::read(log) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("(log unreadable: {e})"),
    };
    let latest = text
        .rfind(START_MARKER)
        .and_then(|at| text[at..].find('\n').map(|nl| &text[at + nl + 1..]))
        .unwrap_or(&text);
    let lines: Vec<&str> = latest.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".to_string()
    } else {
        tail
    }
}

/// The outcome of a short-lived tool.
#[derive(Debug)]
pub(crate) struct ToolOutput {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs a tool to completion, killing it after `timeout`.
///
/// Output goes to anonymous temp files rather than pipes: no reader threads are needed to avoid a
/// full pipe blocking the tool, and polling `try_wait` gives the timeout for free.
pub(crate) fn run_tool(mut command: Command, timeout: Duration) -> Result<ToolOutput> {
    let described = describe(&command);
    let capture = || tempfile::tempfile().map_err(Error::io("creating a capture file"));
    let (mut out, mut err) = (capture()?, capture()?);
    let dup = |f: &File| {
        f.try_clone()
            .map_err(Error::io("duplicating a capture file"))
    };
    command
        .stdin(Stdio::null())
        .stdout(dup(&out)?)
        .stderr(dup(&err)?);

    let mut child = spawn(command)?;
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                // Most tools finish in milliseconds; back off for the slow ones.
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    what: format!("running `{described}`"),
                    after: timeout,
                    last: format!("stdout: {}", read_all(&mut out)),
                });
            }
            Err(e) => return Err(Error::io(format!("waiting for `{described}`"))(e)),
        }
    };
    Ok(ToolOutput {
        status,
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
    })
}

/// Runs a tool and returns its stdout, or an error with both outputs if it exited unsuccessfully.
pub(crate) fn run_checked(command: Command, timeout: Duration) -> Result<String> {
    let described = describe(&command);
    let output = run_tool(command, timeout)?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(Error::Command {
            command: described,
            status: output.status.to_string(),
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    // The tool has exited (or been killed), so the file is complete; a failed read leaves what we got.
    let _ = file.rewind().and_then(|()| file.read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The path of a server's log file inside its directory.
pub(crate) fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_dies_reports_its_log_and_whether_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_path(dir.path(), "fake");
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo preparing; echo 'bind: Address already in use' >&2; exit 3",
        ]);
        let failure = launch(
            Launch {
                name: "fake-server",
                command,
                log: &log,
                port: 1,
                ready_within: Duration::from_secs(5),
                retry_when: &["address already in use"],
            },
            || Err("not yet".into()),
        )
        .unwrap_err();
        assert!(failure.retryable);
        let message = failure.error.to_string();
        for expected in [
            "`fake-server` did not start",
            "exit status: 3",
            "sh -c",
            "preparing",
            "Address already in use",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing from:\n{message}"
            );
        }
        // Only the latest attempt's lines count.
        assert!(!message.contains(START_MARKER), "{message}");
    }

    #[test]
    fn a_hanging_tool_is_killed_at_its_timeout() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let started = Instant::now();
        let error = run_tool(command, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
