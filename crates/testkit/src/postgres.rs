//! A private Postgres cluster: `initdb` into a temp directory, then the `postgres` binary itself.
//!
//! Not `pg_ctl`: it daemonizes, and we want the real postmaster as our child so that a kill is a
//! real `kill -9` of the server, PDEATHSIG applies to it, and we can wait for it to exit.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::process::{self, Launch, LaunchFailure, ServerProcess};
use crate::redis::{PORT_ATTEMPTS, PORT_IN_USE, READY_WITHIN, RESTART_WINDOW};
use crate::sys;

/// initdb with `--no-sync` takes about a second; allow for a slow, busy machine.
const INITDB_WITHIN: Duration = Duration::from_secs(120);
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// Log phrases after which starting again may succeed: a port race, or (on restart) backends of
/// the killed postmaster still attached to the old shared memory for a moment.
const RETRY_WHEN: &[&str] = &[PORT_IN_USE[0], "pre-existing shared memory block"];

/// Server settings. Durability against *machine* crashes is traded for speed (no fsync, no full
/// page writes), but a commit is still written to the OS before it is acknowledged, so everything
/// committed survives a `kill -9` of the server, which is what restart tests check.
const SETTINGS: &[&str] = &[
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "full_page_writes=off",
    // Not `off`: an asynchronous commit sits in shared memory for up to ~3 × wal_writer_delay, and
    // a kill -9 in that window loses it after restart.
    "synchronous_commit=on",
    // Test binaries run many tests at once, each with its own pool.
    "max_connections=200",
];

/// A private Postgres cluster on a free loopback port, superuser `postgres`, trust authentication.
///
/// Tests isolate themselves by database ([`Self::create_database`] with [`crate::unique_db_name`]).
/// When the tests run as root, `initdb` and `postgres` run as the `postgres` system user, because
/// Postgres refuses to run as root. Dropping it SIGKILLs the server and removes its directory.
#[derive(Debug)]
pub struct Postgres {
    process: Option<ServerProcess>,
    port: u16,
    bindir: PathBuf,
    /// uid and gid to run the server as, when we are root.
    run_as: Option<(u32, u32)>,
    dir: TempDir,
}

impl Postgres {
    /// Creates a new cluster with `initdb`, starts it, and waits until `pg_isready` says it
    /// accepts connections.
    pub fn start() -> Result<Self> {
        let bindir = pg_bindir()?;
        let run_as = match sys::effective_uid()? {
            0 => Some(sys::user_ids("postgres")?),
            _ => None,
        };
        let dir = sys::server_dir("postgres")?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(Error::io(
                format!("handing {} to the postgres user", dir.path().display()),
            ))?;
        }
        let mut server = Postgres {
            process: None,
            port: 0,
            bindir,
            run_as,
            dir,
        };
        server.initdb()?;

        let mut attempt = 1;
        loop {
            server.port = sys::free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(failure) if failure.retryable && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(error = %failure.error, "postgres lost a port race, trying another port");
                    attempt += 1;
                }
                Err(failure) => return Err(*failure.error),
            }
        }
    }

    fn initdb(&self) -> Result<()> {
        let mut command = self.server_command("initdb");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            // A fixed encoding and the C locale: the machine's locale must not change test results
            // (and may not even be installed).
            .args(["-E", "UTF8", "--no-locale"]);
        process::run_checked(command, INITDB_WITHIN).map(drop)
    }

    fn spawn(&mut self) -> Result<(), LaunchFailure> {
        let mut command = self.server_command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            // The Unix socket goes into our directory, never the system's /var/run/postgresql.
            .arg("-k")
            .arg(self.dir.path());
        for setting in SETTINGS {
            command.args(["-c", setting]);
        }
        let log = process::log_path(self.dir.path(), "postgres");
        let addr = self.addr();
        let process = process::launch(
            Launch {
                name: "postgres",
                command,
                log: &log,
                port: self.port,
                ready_within: READY_WITHIN,
                retry_when: RETRY_WHEN,
            },
            || is_ready(addr, self.client_command("pg_isready")),
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// `postgres://postgres@127.0.0.1:PORT/{database}`.
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Creates a database with `createdb` and returns its URL. `name` must be a lowercase
    /// identifier (letters, digits, `_`, not starting with a digit, at most 63 bytes), as made by
    /// [`crate::unique_db_name`].
    pub fn create_database(&self, name: &str) -> Result<String> {
        check_identifier(name)?;
        let mut command = self.client_command("createdb");
        command.arg("--").arg(name);
        process::run_checked(command, TOOL_TIMEOUT)?;
        Ok(self.database_url(name))
    }

    /// Runs `sql` with `psql` in `database` (stopping at the first error) and returns the
    /// unaligned, tuples-only output without its trailing newline, e.g. `"1"` for `SELECT 1`.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        check_identifier(database)?;
        let mut command = self.client_command("psql");
        command.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
            "-c",
            sql,
        ]);
        let out = process::run_checked(command, TOOL_TIMEOUT)?;
        Ok(out.trim_end_matches('\n').to_string())
    }

    /// SIGKILLs the postmaster, waits until it has exited, and waits (briefly) for its backends,
    /// which exit on their own when they notice the postmaster is gone. Does nothing if it is not
    /// running.
    pub fn kill(&mut self) {
        let Some(process) = self.process.take() else {
            return;
        };
        let backends = sys::children_of(process.pid());
        process.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while backends.iter().any(|&pid| sys::is_alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same port and data directory (so data committed before a
    /// kill is still there, after crash recovery), and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        process::retry_for(RESTART_WINDOW, || self.spawn())
    }

    /// Whether the postmaster process is alive.
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(ServerProcess::is_running)
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::pid)
    }

    /// The cluster's private directory: `data/`, the Unix socket, and `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A server-side binary (`initdb`, `postgres`), run as the postgres user when we are root.
    fn server_command(&self, name: &str) -> Command {
        let mut command = Command::new(self.bindir.join(name));
        command.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// A client tool connecting over TCP as the superuser; it may run as any user.
    fn client_command(&self, name: &str) -> Command {
        let mut command = Command::new(client_binary(&self.bindir, name));
        command
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", "postgres"])
            .env("PGCONNECT_TIMEOUT", "5");
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Stop the server before `dir` (its data directory) is removed.
        self.kill();
    }
}

/// Ready means a TCP connect works and `pg_isready` says the server accepts connections (it
/// refuses them during startup and crash recovery).
fn is_ready(addr: SocketAddr, mut pg_isready: Command) -> Result<(), String> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    pg_isready.args(["-d", "postgres", "-t", "2"]);
    let output =
        process::run_tool(pg_isready, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("pg_isready: {}", output.stdout.trim()))
    }
}

fn check_identifier(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "`{name}` is not a safe database name (use unique_db_name)"
        )))
    }
}

/// The directory holding `postgres` and `initdb`: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian keeps them off `PATH`).
fn pg_bindir() -> Result<PathBuf> {
    let has_server = |dir: &Path| {
        sys::is_executable(&dir.join("postgres")) && sys::is_executable(&dir.join("initdb"))
    };
    if let Ok(pg_config) = sys::find_binary("pg_config", &[], "postgresql") {
        let mut command = Command::new(pg_config);
        command.arg("--bindir");
        if let Ok(out) = process::run_checked(command, TOOL_TIMEOUT) {
            let dir = PathBuf::from(out.trim());
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.to_string();
            let key: Vec<u32> = version
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((key, bin))
        })
        .max();
    newest
        .map(|(_, bin)| bin)
        .ok_or_else(|| Error::BinaryNotFound {
            binary: "postgres".into(),
            looked: "`pg_config --bindir` and /usr/lib/postgresql/*/bin".into(),
            apt_package: "postgresql",
        })
}

/// A client tool from the server's bindir (matching versions), else from `PATH`.
fn client_binary(bindir: &Path, name: &str) -> PathBuf {
    let beside = bindir.join(name);
    if sys::is_executable(&beside) {
        beside
    } else {
        // Fall back to the bare name: if it is not on PATH either, the spawn error names it.
        sys::find_binary(name, &[], "postgresql").unwrap_or_else(|_| PathBuf::from(name))
    }
}
