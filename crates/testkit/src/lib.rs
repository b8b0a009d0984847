//! Test support for statehouse: private, real servers and a fault-injecting proxy.
//!
//! Every server here — [`RedisServer`], [`RedisCluster`], [`Postgres`], [`Nats`] — is started by
//! the kit itself, in its own temp directory, on a free loopback port. Tests never touch servers
//! the machine may already run on the standard ports (6379, 5432, 4222), and they can `kill -9`
//! and restart what they started. [`FaultProxy`] sits between a client and a server to cut, stall
//! or slow the connection.
//!
//! # Lifetimes
//! Dropping a server SIGKILLs it, waits for it, and removes its directory. Servers also die with
//! the test process however it ends (panic, `exit`, statics never dropped): every child is forked
//! by one kit-owned thread with `PR_SET_PDEATHSIG(SIGKILL)` (see `src/spawner.rs` for why one
//! thread). Directories of servers that were never dropped are removed by the next test process
//! that uses the kit.
//!
//! # Missing servers fail, never skip
//! A server that cannot start is an error naming the binary, the command line and the last lines
//! of its log; a binary that is not installed is an error naming the apt package to install
//! (`redis-server`, `postgresql`, `nats-server`). The `shared_*` functions panic with that error.
//! No test is ever skipped silently, on CI or anywhere else.
//!
//! # Blocking
//! Constructors, kills and restarts block (polling with `std::thread::sleep`) for up to ~15 s
//! (~30 s for a cluster). From async tests, call them before starting time-sensitive work, or via
//! `tokio::task::spawn_blocking`.

mod cluster;
mod error;
mod nats;
mod postgres;
mod process;
mod proxy;
mod redis;
mod resp;
mod spawner;
mod sys;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::cluster::RedisCluster;
pub use crate::error::{Error, Result};
pub use crate::nats::Nats;
pub use crate::postgres::Postgres;
pub use crate::proxy::FaultProxy;
pub use crate::redis::RedisServer;

/// A standalone Redis shared by all tests of this test binary, started on first use and killed
/// when the process exits. Isolate tests by key prefix ([`unique_prefix`]).
///
/// # Panics
/// If the server cannot be started; the message says why (and what to install).
pub fn shared_redis() -> &'static RedisServer {
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    shared(&SHARED, "redis-server", RedisServer::start)
}

/// A six-node Redis Cluster shared by all tests of this test binary. Isolate tests by key prefix.
///
/// # Panics
/// If the cluster cannot be started.
pub fn shared_cluster() -> &'static RedisCluster {
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    shared(&SHARED, "redis cluster", RedisCluster::start)
}

/// A Postgres cluster shared by all tests of this test binary. Isolate tests by database
/// ([`Postgres::create_database`] with [`unique_db_name`]).
///
/// # Panics
/// If the server cannot be started.
pub fn shared_postgres() -> &'static Postgres {
    static SHARED: OnceLock<Postgres> = OnceLock::new();
    shared(&SHARED, "postgres", Postgres::start)
}

/// A NATS server (with JetStream) shared by all tests of this test binary. Isolate tests by
/// subject/stream prefix ([`unique_prefix`]).
///
/// # Panics
/// If the server cannot be started.
pub fn shared_nats() -> &'static Nats {
    static SHARED: OnceLock<Nats> = OnceLock::new();
    shared(&SHARED, "nats-server", Nats::start)
}

fn shared<T>(cell: &'static OnceLock<T>, what: &str, start: fn() -> Result<T>) -> &'static T {
    // If `start` fails, the cell stays empty and the next test tries again (and fails with its own
    // message) rather than every later test reporting a poisoned cell.
    cell.get_or_init(|| {
        start().unwrap_or_else(|e| panic!("could not start the shared {what} for tests: {e}"))
    })
}

/// Whether this run must have every server (`CI=true`).
///
/// Informational: the kit never skips anything. A server that cannot start is an `Err` from its
/// `start` (with the apt package to install when the binary is missing), and the `shared_*`
/// functions panic with it, inside and outside CI alike.
pub fn require_servers() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A key prefix no other test (in this or any concurrent process) uses:
/// `t{tag}-{pid}-{counter}-`.
pub fn unique_prefix(tag: &str) -> String {
    format!("t{tag}-{}-{}-", std::process::id(), next_id())
}

/// A database name no other test uses: `t_{tag}_{pid}_{counter}`, with `tag` lowercased, anything
/// but `[a-z0-9_]` turned into `_`, and cut so the whole fits Postgres's 63-byte identifiers.
pub fn unique_db_name(tag: &str) -> String {
    let suffix = format!("_{}_{}", std::process::id(), next_id());
    let tag: String = tag
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(63 - "t_".len() - suffix.len())
        .collect();
    format!("t_{tag}{suffix}")
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_names_are_safe_identifiers() {
        let long = "Ä-Very/Long tag ".repeat(10);
        for tag in ["store", "Mixed Case!", "", long.as_str()] {
            let name = unique_db_name(tag);
            assert!(name.len() <= 63, "{name}");
            assert!(name.starts_with("t_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        assert_ne!(unique_db_name("x"), unique_db_name("x"));
        assert_ne!(unique_prefix("x"), unique_prefix("x"));
    }
}
