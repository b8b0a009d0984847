//! `statehouse-store`: one async API over versioned key/values, field maps
//! and counters with TTL, on interchangeable backends.
//!
//! ```no_run
//! # async fn demo() -> statehouse_store::Result<()> {
//! use statehouse_store::{open, Condition, MapPatch, StoreConfig};
//! use std::time::Duration;
//!
//! let store = open(StoreConfig::new("sqlite://./state.db")).await?;
//! let v = store.put("greeting", "hello", Some(Duration::from_secs(60)), Condition::IfAbsent).await?;
//! store.put("greeting", "hi", None, Condition::IfVersion(v)).await?;
//! store.map_patch("session:1", &MapPatch::new().set("cart", "[]").incr("visits", 1)).await?;
//! # Ok(()) }
//! ```
//!
//! Backends (each behind a cargo feature of the same name): `memory`,
//! `sqlite`, `redis` (standalone and Cluster), `postgres`. Every backend
//! passes the same conformance suite (`conformance` feature).

mod backend;
mod deadline;
mod error;
mod policy;
mod store;
mod types;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::sync::Arc;

pub use backend::Backend;
pub use error::{Conflict, Result, StoreError, UnavailableKind};
pub use policy::{BreakerConfig, OnStoreDown, Policy, Read, ReadState};
pub use store::{Store, StoreConfig};
pub use types::{
    Condition, Existence, FieldCondition, FieldMap, FieldOp, Limits, MapPatch, PatchOutcome,
    Versioned,
};

/// Opens the store named by `config.url`, checking that it answers.
///
/// A wrong URL, a backend compiled out, an unreachable server or rejected
/// credentials give `StoreError::Config` naming the store and what was tried.
pub async fn open(config: StoreConfig) -> Result<Store> {
    let backend = open_backend(&config).await?;
    Ok(Store::with_backend(backend, &config))
}

async fn open_backend(config: &StoreConfig) -> Result<Arc<dyn Backend>> {
    let url = config.url.as_str();
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    #[cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]
    let timeout = config.policy.timeout;
    match scheme {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(memory::MemoryBackend::new())),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(sqlite::SqliteBackend::open(url, timeout).await?)),
        #[cfg(feature = "redis")]
        "redis" => Ok(Arc::new(redis::RedisBackend::open(url, timeout).await?)),
        #[cfg(feature = "redis")]
        "redis+cluster" => Ok(Arc::new(
            redis::RedisBackend::open_cluster(url, timeout).await?,
        )),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(
            postgres::PostgresBackend::open(url, timeout).await?,
        )),
        // Reached only for backends compiled out by features.
        #[allow(unreachable_patterns)]
        "memory" | "sqlite" | "redis" | "redis+cluster" | "postgres" | "postgresql" => {
            Err(StoreError::Config(format!(
                "store URL {:?}: the {scheme} backend is not compiled in (enable the cargo feature)",
                error::redact_url(url)
            )))
        }
        _ => Err(StoreError::Config(format!(
            "store URL {:?}: unknown scheme {scheme:?}; expected memory://, sqlite://PATH, \
             redis://HOST:PORT, redis+cluster://HOST:PORT,..., or postgres://...",
            error::redact_url(url)
        ))),
    }
}
