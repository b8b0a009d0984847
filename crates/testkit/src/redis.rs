//! A private, non-persistent `redis-server` on a free loopback port.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::error::Result;
use crate::process::{self, Launch, LaunchFailure, ServerProcess};
use crate::resp;
use crate::sys;

/// How many fresh ports a start tries when it loses a port race.
pub(crate) const PORT_ATTEMPTS: usize = 5;
/// How long a server may take to answer after it was spawned.
pub(crate) const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long a restart keeps retrying while its port is still taken.
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(15);
/// Log phrases of a failed bind, after which another port (or the same one later) may work.
pub(crate) const PORT_IN_USE: &[&str] = &["address already in use"];
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// One `redis-server` with no persistence, in its own temp directory, on a free loopback port.
///
/// Dropping it SIGKILLs the server and removes the directory. The process also dies with the test
/// process (PDEATHSIG), so even a server in a `static` never outlives the test binary.
#[derive(Debug)]
pub struct RedisServer {
    // Declared before `dir` so that a default drop would also stop the process before removing
    // its directory; `Drop` below does it explicitly anyway.
    process: Option<ServerProcess>,
    port: u16,
    binary: PathBuf,
    /// Extra arguments, e.g. the cluster settings of a cluster node.
    extra_args: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a standalone server and waits until it answers PING.
    pub fn start() -> Result<Self> {
        Self::start_with(Vec::new())
    }

    pub(crate) fn start_with(extra_args: Vec<String>) -> Result<Self> {
        let binary = redis_server_binary()?;
        let mut attempt = 1;
        loop {
            let mut server = Self::stopped(binary.clone(), sys::free_port()?, extra_args.clone())?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(failure) if failure.retryable && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(error = %failure.error, "redis-server lost a port race, trying another port");
                    attempt += 1;
                }
                Err(failure) => return Err(*failure.error),
            }
        }
    }

    /// A server that is set up (directory, port) but not running; [`Self::spawn`] starts it.
    pub(crate) fn stopped(binary: PathBuf, port: u16, extra_args: Vec<String>) -> Result<Self> {
        Ok(RedisServer {
            process: None,
            port,
            binary,
            extra_args,
            dir: sys::server_dir("redis")?,
        })
    }

    /// Spawns the server on its port and waits until it answers PING.
    pub(crate) fn spawn(&mut self) -> Result<(), LaunchFailure> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            // No RDB snapshots and no AOF: nothing survives a restart, which is what tests expect.
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .current_dir(self.dir.path());
        let addr = self.addr();
        let log = process::log_path(self.dir.path(), "redis");
        let process = process::launch(
            Launch {
                name: "redis-server",
                command,
                log: &log,
                port: self.port,
                ready_within: READY_WITHIN,
                retry_when: PORT_IN_USE,
            },
            || ping(addr),
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// SIGKILLs the server and waits until it has exited. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and directory, and waits until it answers PING.
    /// Kills it first if it is still running. Data does not survive: there is no persistence.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        process::retry_for(RESTART_WINDOW, || self.spawn())
    }

    /// Freezes the server with SIGSTOP: connections stay open and nothing is answered until
    /// [`RedisServer::resume`], which then answers everything that waited. The "delayed" fault.
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// Lets a [`RedisServer::pause`]d server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> Result<()> {
        let pid = self.pid().ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "redis-server on port {} is not running",
                self.port
            ))
        })?;
        // The shell's `kill`, so that the spawner's stays the kit's only unsafe code.
        let mut kill = Command::new("sh");
        kill.args(["-c", &format!("kill -{name} {pid}")]);
        process::run_checked(kill, Duration::from_secs(5)).map(drop)
    }

    /// Whether the server process is alive (it may still be starting up or unresponsive).
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(ServerProcess::is_running)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::pid)
    }

    /// The server's private directory (log file `redis.log`, cluster `nodes.conf`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Stop the process before `dir` is removed (fields drop after this).
        self.kill();
    }
}

/// PING on a fresh connection; ready means `+PONG` (not `-LOADING` or a refused connection).
pub(crate) fn ping(addr: SocketAddr) -> Result<(), String> {
    match resp::command(addr, &["PING"], PROBE_TIMEOUT) {
        Ok(resp::Reply::Simple(pong)) if pong == "PONG" => Ok(()),
        Ok(other) => Err(format!("PING to {addr} answered {other:?}")),
        Err(e) => Err(format!("PING to {addr}: {e}")),
    }
}

pub(crate) fn redis_server_binary() -> Result<PathBuf> {
    sys::find_binary(
        "redis-server",
        &["/usr/local/bin", "/usr/bin"],
        "redis-server",
    )
}

pub(crate) fn redis_cli_binary() -> Result<PathBuf> {
    // redis-cli comes with redis-tools, which the redis-server package depends on.
    sys::find_binary("redis-cli", &["/usr/local/bin", "/usr/bin"], "redis-server")
}
