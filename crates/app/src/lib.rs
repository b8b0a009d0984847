//! `statehouse-app`: the reference shop, its queue worker and `statehouse up`.
//!
//! The shop is stateless by construction: an instance keeps nothing another
//! instance could not rebuild from the request and the stores.
//!
//! | state | where it lives |
//! |---|---|
//! | login, cart | the session ([`statehouse_session`]) in the store the architecture names; with `--arch token`, a signed access token, a refresh token (its family in the store) and an encrypted cart cookie ([`statehouse_token`]) |
//! | users, orders | the durable database (SQLite or Postgres, through sqlx; [`db`]) |
//! | avatars | the object store (a local directory by default; [`objects`]) |
//! | order processing | the queue the orders table is (leases, at-least-once; [`worker`]) |
//!
//! [`serve`] runs one instance, [`worker::run`] the worker, and [`up::run`]
//! the whole tier on one machine: the load balancer, N instances and the
//! worker as child processes, plus the dashboard.

pub mod arch;
pub mod db;
mod error;
pub mod identity;
pub mod live;
pub mod objects;
pub mod shop;
mod stats;
pub mod up;
pub mod worker;

pub use arch::Arch;
pub use error::AppError;
pub use identity::TokenKeys;
pub use shop::{ServeConfig, serve};

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Ties this process's life to the process that started it: when the
/// environment names a parent (`STATEHOUSE_PARENT_PID`, set by `up`), the
/// kernel sends SIGTERM when that parent dies, so a killed `up` leaves no
/// orphans. A parent already gone by now means exit at once.
pub fn die_with_parent() {
    let Some(parent) = std::env::var("STATEHOUSE_PARENT_PID")
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        tracing::warn!("cannot tie this process to its parent: {e}");
    }
    if nix::unistd::getppid().as_raw() != parent {
        eprintln!("statehouse: the parent process {parent} is gone; exiting");
        std::process::exit(1);
    }
}
