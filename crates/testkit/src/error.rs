//! The kit's one error type. Every message names the binary and the command line that was tried,
//! because the reader is a developer looking at a failed test, not a program deciding what to do.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias used throughout the kit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a server or tool could not be started or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server or client binary is not installed where the kit looks for it.
    #[error(
        "`{binary}` not found (looked in {looked}); install the `{apt_package}` apt package \
         (tests never skip when a server is missing)"
    )]
    BinaryNotFound {
        binary: String,
        looked: String,
        apt_package: &'static str,
    },

    /// The operating system refused to start the process at all.
    #[error("could not spawn `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    /// The server process started but exited, or never became ready.
    #[error(
        "`{binary}` did not start: {reason}\n  tried: {command}\n--- last lines of {} ---\n{log_tail}",
        .log.display()
    )]
    Start {
        binary: String,
        command: String,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },

    /// A short-lived tool (initdb, createdb, psql, redis-cli, ...) exited unsuccessfully.
    #[error("`{command}` failed ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")]
    Command {
        command: String,
        status: String,
        stdout: String,
        stderr: String,
    },

    /// A condition the kit polls for (tool exit, cluster health) did not hold in time.
    #[error("{what}: not done within {after:?}; last observation: {last}")]
    Timeout {
        what: String,
        after: Duration,
        last: String,
    },

    /// Local I/O the kit needs (temp dirs, ports, log files) failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The caller passed something the kit will not use (e.g. an unsafe database name).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
