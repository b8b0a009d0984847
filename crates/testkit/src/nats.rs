//! A private `nats-server` with JetStream on a free loopback port.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::error::Result;
use crate::process::{self, Launch, LaunchFailure, ServerProcess};
use crate::redis::{PORT_ATTEMPTS, PORT_IN_USE, READY_WITHIN, RESTART_WINDOW};
use crate::sys;

/// One `nats-server -js` with its JetStream store in its own temp directory.
///
/// Dropping it SIGKILLs the server and removes the directory. JetStream data survives
/// [`Self::restart`], since the store directory is kept.
#[derive(Debug)]
pub struct Nats {
    process: Option<ServerProcess>,
    port: u16,
    binary: PathBuf,
    dir: TempDir,
}

impl Nats {
    /// Starts the server and waits until it greets a client with its `INFO` line.
    pub fn start() -> Result<Self> {
        let binary = sys::find_binary(
            "nats-server",
            &["/usr/sbin", "/usr/local/bin"],
            "nats-server",
        )?;
        let mut server = Nats {
            process: None,
            port: 0,
            binary,
            dir: sys::server_dir("nats")?,
        };
        let mut attempt = 1;
        loop {
            server.port = sys::free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(failure) if failure.retryable && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(error = %failure.error, "nats-server lost a port race, trying another port");
                    attempt += 1;
                }
                Err(failure) => return Err(*failure.error),
            }
        }
    }

    fn spawn(&mut self) -> Result<(), LaunchFailure> {
        let mut command = Command::new(&self.binary);
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("js"))
            .current_dir(self.dir.path());
        let log = process::log_path(self.dir.path(), "nats");
        let addr = self.addr();
        let process = process::launch(
            Launch {
                name: "nats-server",
                command,
                log: &log,
                port: self.port,
                ready_within: READY_WITHIN,
                retry_when: PORT_IN_USE,
            },
            || read_info(addr).map(drop),
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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

    /// Starts the server again on the same port and store directory, and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        process::retry_for(RESTART_WINDOW, || self.spawn())
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(ServerProcess::is_running)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::pid)
    }

    /// The server's private directory (`nats.log`, JetStream store in `js/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        // Stop the server before `dir` (its JetStream store) is removed.
        self.kill();
    }
}

/// Connects and reads the `INFO {...}` line a NATS server sends every new client.
fn read_info(addr: SocketAddr) -> Result<String, String> {
    let timeout = Duration::from_millis(500);
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set read timeout: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("read INFO from {addr}: {e}"))?;
    if line.starts_with("INFO ") {
        Ok(line)
    } else {
        Err(format!("{addr} greeted with {line:?}, expected INFO"))
    }
}
