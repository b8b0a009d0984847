//! `statehouse-fanout`: messages that survive the instance holding the
//! connection.
//!
//! A [`Broker`] keeps an ordered log per channel: [`Broker::publish`]
//! returns the message's offset, [`Broker::read`] returns what came after an
//! offset, and [`Broker::wait`] resolves when more may have come. Every
//! message carries its channel, offset and the channel's *epoch*: a new
//! epoch means the log was lost and recreated, so a client's old offset
//! means nothing in it. A client that reconnects — to any instance — reads
//! from its last offset and gets exactly the gap, in order, without
//! duplicates; if the gap is beyond retention, or the epoch changed, it gets
//! [`BrokerError::Gap`] and knows to reload.
//!
//! Backends, one conformance suite ([`conformance`], feature
//! `conformance`): memory (one process; the baseline), SQLite (the
//! embedded default, shared by processes on one host) and Redis Streams
//! (standalone or Cluster), NATS JetStream (a stream per channel).
//!
//! On top: the WebSocket [`hub`] for axum apps and the [`client`] that
//! reconnects and resumes, speaking [`protocol`].
//!
//! ```
//! # async fn demo() -> Result<(), statehouse_fanout::BrokerError> {
//! use statehouse_fanout::{open, BrokerConfig};
//! let broker = open(BrokerConfig::new("memory://")).await?;
//! let sent = broker.publish("orders.42", "placed".into()).await?;
//! let batch = broker.read("orders.42", 0, None, 100).await?;
//! assert_eq!(batch.messages[0].offset, sent.offset);
//! # Ok(()) }
//! ```

// Built with no backend (the fuzz target's `protocol` build), the helpers
// the backends share have no caller.
#![cfg_attr(
    not(any(
        feature = "memory",
        feature = "sqlite",
        feature = "redis",
        feature = "nats"
    )),
    allow(dead_code)
)]

mod broker;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "hub")]
pub mod hub;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "protocol")]
pub mod protocol;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use broker::{
    Batch, Broker, BrokerConfig, BrokerError, Message, Offset, Published, Result, Retention,
    check_channel, new_epoch,
};

use std::sync::Arc;

/// Opens the broker `config.url` names: `memory://`, `sqlite://PATH`,
/// `redis://HOST:PORT`, `redis+cluster://HOST:PORT,...` or `nats://HOST:PORT`
/// (JetStream).
pub async fn open(config: BrokerConfig) -> Result<Arc<dyn Broker>> {
    let scheme = config.url.split_once(':').map_or("", |(s, _)| s);
    match scheme {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(memory::MemoryBroker::new(config))),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(sqlite::SqliteBroker::open(config).await?)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+cluster" => {
            Ok(Arc::new(redis::RedisBroker::open(config).await?))
        }
        #[cfg(feature = "nats")]
        "nats" | "tls" => Ok(Arc::new(nats::NatsBroker::open(config).await?)),
        #[allow(unreachable_patterns)]
        "memory" | "sqlite" | "redis" | "rediss" | "redis+cluster" | "nats" | "tls" => {
            Err(BrokerError::Config(format!(
                "broker URL {:?}: the {scheme} backend is not compiled in",
                config.url
            )))
        }
        _ => Err(BrokerError::Config(format!(
            "broker URL {:?}: unknown scheme {scheme:?}; expected memory://, sqlite://PATH, redis://HOST:PORT, redis+cluster://HOST:PORT,... or nats://HOST:PORT",
            config.url
        ))),
    }
}
