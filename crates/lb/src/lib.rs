//! `statehouse-lb`: an HTTP/1.1 and HTTP/2 (h2c) load balancer in front of N interchangeable
//! instances.
//!
//! - **Selection** ([`selection`]): round robin; least-requests by power of two choices over
//!   peak-EWMA latency; consistent hashing of a header, cookie or path on a ring with virtual
//!   nodes; a sticky cookie (the stateful contrast mode, which re-pins and counts broken pins).
//! - **Health** ([`health`]): active HTTP checks with interval, timeout, rise and fall in a
//!   background task; passive ejection on consecutive connect failures or 5xx, capped as a share
//!   of the instances; fail open when no instance is usable.
//! - **Retries**: a request is retried on another instance when it provably never left (the
//!   connection could not be made), and — opt-in — when it is idempotent with a replayable
//!   body; always within a retry budget. A POST that may have reached an instance is never
//!   replayed.
//! - **Timeouts** on connect, request head, idle keep-alive, upstream response and a response
//!   that stops moving (`timeouts.response_stall`); pooled keep-alive connections to the
//!   instances.
//! - **Hygiene**: hop-by-hop headers stripped, `X-Forwarded-For`/`-Proto` and `X-Request-Id`
//!   added; `Host` required on HTTP/1.1, never twice, `host[:port]` only; smuggling shapes (CL+TE, repeated `Content-Length`), malformed and oversized heads
//!   refused (400/431) before anything is forwarded ([`proxy::framing`], [`proxy::normalize`]).
//! - **WebSocket** upgrades proxied end to end.
//! - **Admin API** (below): list, add, remove, drain, undrain; Prometheus `/metrics`; graceful
//!   shutdown with a drain deadline.
//!
//! # Admin API
//!
//! On its own listener; loopback by default, and a bearer token (`admin.token`) is required when
//! it is not (and on every request whenever a token is configured).
//!
//! | request | effect |
//! |---|---|
//! | `GET /instances` | every instance: health, ejection, drain state, load, counters |
//! | `GET /instances/{name}` | one instance |
//! | `POST /instances` `{"name":…,"addr":…}` | add (201; 409 if the name is taken) |
//! | `DELETE /instances/{name}` | remove at once; requests in flight finish |
//! | `POST /instances/{name}/drain[?wait=30s]` | no new requests; with `wait`, answers when nothing is in flight (`"drained": true`) or the wait ends |
//! | `POST /instances/{name}/undrain` | back in rotation |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /health` | `ok` while the balancer runs |
//!
//! # Entry point
//!
//! ```no_run
//! # async fn example() -> Result<(), statehouse_lb::LbError> {
//! use statehouse_lb::{LbConfig, run, shutdown_signal};
//! let config = LbConfig::load(Some("lb.toml".as_ref()), &["health.interval=1s".into()])?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await.expect("bind");
//! let admin = tokio::net::TcpListener::bind(config.admin.listen).await.expect("bind admin");
//! run(listener, admin, config, shutdown_signal()).await
//! # }
//! ```

mod admin;
pub mod config;
mod date;
pub mod discovery;
mod error;
pub mod h1_server;
pub mod health;
mod metrics;
mod net;
pub mod proxy;
pub mod selection;
mod server;

pub use config::LbConfig;
pub use discovery::{Backend, BackendSet, Discovery, StaticDiscovery};
pub use error::{ConfigError, LbError};
pub use health::{HealthCheck, HttpHealthCheck};
pub use server::{run, run_with, shutdown_signal};

/// Resolves once the flag is set (or its sender is gone). The watch's read guard stays inside,
/// so the caller's future remains `Send`.
pub(crate) async fn until_set(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|set| *set).await;
}
