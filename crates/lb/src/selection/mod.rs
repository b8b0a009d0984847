//! Selection: which instance serves a request. One trait, [`Selector`], with four
//! implementations. A selector is built for one snapshot of the backend set and swapped together
//! with it, so its precomputed state (the hash ring) always matches the set it picks from.
//!
//! Selectors do not know about health: the proxy passes an `eligible` predicate (usable and not
//! already tried by this request; relaxed to "not draining" when nothing is usable, which is how
//! the balancer fails open).

pub(crate) mod hash;
mod p2c_ewma;
mod round_robin;
mod sticky;

use crate::config::{LbConfig, PolicyKind};
use crate::discovery::Backend;
use std::fmt;
use std::sync::Arc;

pub use hash::HashRing;
pub use p2c_ewma::P2cEwma;
pub use round_robin::RoundRobin;
pub use sticky::Sticky;

/// What a selector may look at in a request.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestKey<'a> {
    /// The bytes consistent hashing keys on (header, cookie or path), if present.
    pub hash_key: Option<&'a [u8]>,
    /// The sticky cookie's value, if present.
    pub pin: Option<&'a str>,
}

/// What happened to a sticky pin. Non-sticky selectors always say [`PinOutcome::NotSticky`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// Not a sticky policy.
    NotSticky,
    /// The pinned instance was used.
    Kept,
    /// No pin yet: a new one must be set.
    New,
    /// The pinned instance is gone, down or draining: re-picked, the cookie must be re-set, and
    /// the broken pin counted.
    Broken,
}

/// The selector's answer: an index into the backends it was given, and the pin outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into the backend slice.
    pub index: usize,
    /// For sticky selection, what happened to the pin.
    pub pin: PinOutcome,
}

/// Picks an instance for a request.
pub trait Selector: Send + Sync + fmt::Debug {
    /// Picks one of `backends` (the set this selector was built for) that `eligible` accepts,
    /// or `None` if it accepts none.
    fn select(
        &self,
        backends: &[Arc<Backend>],
        key: &RequestKey<'_>,
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<Pick>;
}

/// What the selectors are built from (the parts of [`LbConfig`] they need).
#[derive(Debug, Clone)]
pub(crate) struct SelectionConfig {
    pub(crate) policy: PolicyKind,
    pub(crate) virtual_nodes: u32,
}

impl SelectionConfig {
    pub(crate) fn from_config(c: &LbConfig) -> Self {
        Self {
            policy: c.policy,
            virtual_nodes: c.hash.virtual_nodes,
        }
    }
}

pub(crate) fn build(cfg: &SelectionConfig, backends: &[Arc<Backend>]) -> Box<dyn Selector> {
    match cfg.policy {
        PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        PolicyKind::P2cEwma => Box::new(P2cEwma),
        PolicyKind::Hash => Box::new(HashRing::new(backends, cfg.virtual_nodes)),
        PolicyKind::Sticky => Box::new(Sticky::new(RoundRobin::default())),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::time::Duration;

    use crate::config::InstanceConfig;

    pub(crate) fn backends(n: usize) -> Vec<Arc<Backend>> {
        (0..n).map(|i| backend(&format!("i{i}"))).collect()
    }

    pub(crate) fn backend(name: &str) -> Arc<Backend> {
        let inst = InstanceConfig {
            name: name.into(),
            addr: "127.0.0.1:1".into(),
        };
        Arc::new(Backend::new(&inst, Duration::from_millis(5)))
    }
}
