//! What happens when the store is slow or down.
//!
//! Every call gets a timeout; consecutive unavailability opens a circuit
//! breaker so callers fail fast instead of queueing on a dead store; and
//! `OnStoreDown` says what a *read* does while the store is unreachable.
//! Writes are never acknowledged unless the store took them, whatever the
//! policy: a write to an unreachable store always returns `Unavailable`.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

/// The read behaviour while the store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreDown {
    /// Reads fail with `Unavailable`; an HTTP layer answers 503 + Retry-After.
    FailClosed,
    /// Reads succeed as "absent", marked [`ReadState::Degraded`]: the caller
    /// continues without the state and knows it.
    FailOpen,
    /// Reads answer from a bounded local cache of recent successful reads if
    /// the cached copy is at most `max_age` old (marked [`ReadState::Stale`]);
    /// otherwise they fail closed.
    ServeStale { max_age: Duration, capacity: usize },
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive unavailable calls that open the circuit.
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe call is let through.
    pub open_for: Duration,
}

/// The policy around every call to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Per-call deadline. A write that times out may or may not have been
    /// applied; it is reported as `Unavailable { kind: Timeout }`.
    pub timeout: Duration,
    pub breaker: BreakerConfig,
    pub on_down: OnStoreDown,
}

impl Policy {
    /// Fail closed, 1 s per call, open the circuit after 5 consecutive
    /// failures for 200 ms (so a returning store is used again well within
    /// a second).
    pub fn fail_closed() -> Self {
        Policy {
            timeout: Duration::from_secs(1),
            breaker: BreakerConfig {
                failure_threshold: 5,
                open_for: Duration::from_millis(200),
            },
            on_down: OnStoreDown::FailClosed,
        }
    }

    pub fn with_on_down(mut self, on_down: OnStoreDown) -> Self {
        self.on_down = on_down;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How fresh a read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    /// Answered by the store.
    Fresh,
    /// Answered from the local cache because the store is unreachable; the
    /// copy was read from the store `age` ago.
    Stale { age: Duration },
    /// The store is unreachable and the policy is fail-open: the value is
    /// reported absent.
    Degraded,
}

/// A read result with its freshness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<T> {
    pub value: T,
    pub state: ReadState,
}

impl<T> Read<T> {
    pub fn fresh(value: T) -> Self {
        Read {
            value,
            state: ReadState::Fresh,
        }
    }

    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> std::ops::Deref for Read<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

#[derive(Debug)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else fails fast until it returns.
    HalfOpen,
}

/// A consecutive-failure circuit breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    // std Mutex: held for a few instructions, never across an await.
    state: Mutex<BreakerState>,
    /// Whether `state` is `Closed` with no failure counted: then a call is
    /// admitted, and a success changes nothing, without taking the lock, so
    /// a healthy store's calls do not all pass through one lock. Written
    /// only under the lock, after `state`.
    healthy: AtomicBool,
}

/// Whether a call may go to the store.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Yes,
    Probe,
    No,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            healthy: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a plain value that is always valid, so a poisoned
        // lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn admit(&self) -> Admit {
        if self.healthy.load(Ordering::Acquire) {
            return Admit::Yes;
        }
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => Admit::Yes,
            BreakerState::Open { until } if Instant::now() >= until => {
                *state = BreakerState::HalfOpen;
                Admit::Probe
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => Admit::No,
        }
    }

    pub(crate) fn record(&self, admitted: Admit, store_reachable: bool) {
        if store_reachable && self.healthy.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        self.transition(&mut state, admitted, store_reachable);
        self.healthy.store(
            matches!(*state, BreakerState::Closed { failures: 0 }),
            Ordering::Release,
        );
    }

    fn transition(&self, state: &mut BreakerState, admitted: Admit, store_reachable: bool) {
        if store_reachable {
            *state = BreakerState::Closed { failures: 0 };
            return;
        }
        match (&*state, admitted) {
            (BreakerState::HalfOpen, Admit::Probe) => {
                *state = BreakerState::Open {
                    until: Instant::now() + self.config.open_for,
                };
            }
            (BreakerState::Closed { failures }, _) => {
                let failures = failures + 1;
                *state = if failures >= self.config.failure_threshold {
                    BreakerState::Open {
                        until: Instant::now() + self.config.open_for,
                    }
                } else {
                    BreakerState::Closed { failures }
                };
            }
            _ => {}
        }
    }
}

/// An admitted call. If the call is dropped before it reports (its future was
/// cancelled), a probe counts as failed so the breaker never stays half-open.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    admit: Option<Admit>,
}

impl<'a> Permit<'a> {
    /// `None` when the circuit is open and the call must fail fast.
    pub(crate) fn acquire(breaker: &'a Breaker) -> Option<Self> {
        match breaker.admit() {
            Admit::No => None,
            admit => Some(Permit {
                breaker,
                admit: Some(admit),
            }),
        }
    }

    pub(crate) fn finish(mut self, store_reachable: bool) {
        if let Some(admit) = self.admit.take() {
            self.breaker.record(admit, store_reachable);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(Admit::Probe) = self.admit.take() {
            self.breaker.record(Admit::Probe, false);
        }
    }
}

/// Recent successful reads, kept only for `OnStoreDown::ServeStale`.
#[derive(Debug)]
pub(crate) struct StaleCache<V> {
    // std Mutex: no await while held.
    entries: Mutex<LruCache<String, (V, Instant)>>,
}

impl<V: Clone> StaleCache<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        StaleCache {
            entries: Mutex::new(LruCache::new(capacity)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, (V, Instant)>> {
        // Each entry is replaced whole, so a poisoned cache is still valid.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn remember(&self, key: String, value: V) {
        self.lock().put(key, (value, Instant::now()));
    }

    pub(crate) fn forget(&self, key: &str) {
        self.lock().pop(key);
    }

    pub(crate) fn recall(&self, key: &str, max_age: Duration) -> Option<(V, Duration)> {
        let mut entries = self.lock();
        let (value, at) = entries.get(key)?;
        let age = at.elapsed();
        (age <= max_age).then(|| (value.clone(), age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_millis(100),
        });
        assert_eq!(b.admit(), Admit::Yes);
        b.record(Admit::Yes, false);
        assert_eq!(b.admit(), Admit::Yes);
        b.record(Admit::Yes, false);
        assert_eq!(b.admit(), Admit::No, "open after two failures");
        tokio::time::advance(Duration::from_millis(101)).await;
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "only one probe at a time");
        b.record(Admit::Probe, false);
        assert_eq!(b.admit(), Admit::No, "failed probe reopens");
        tokio::time::advance(Duration::from_millis(101)).await;
        assert_eq!(b.admit(), Admit::Probe);
        b.record(Admit::Probe, true);
        assert_eq!(b.admit(), Admit::Yes, "successful probe closes");
        // Closed again with no failure counted: a failure, then a success
        // that resets the count, then one failure stays under the threshold.
        b.record(Admit::Yes, false);
        b.record(Admit::Yes, true);
        b.record(Admit::Yes, false);
        assert_eq!(b.admit(), Admit::Yes, "a success resets the count");
        b.record(Admit::Yes, false);
        assert_eq!(b.admit(), Admit::No, "two in a row open it");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_cache_respects_max_age() {
        let c = StaleCache::new(2);
        c.remember("a".into(), 1);
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(
            c.recall("a", Duration::from_millis(100)).map(|v| v.0),
            Some(1)
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(c.recall("a", Duration::from_millis(100)), None);
        c.remember("b".into(), 2);
        c.remember("c".into(), 3);
        c.remember("d".into(), 4);
        assert_eq!(
            c.recall("b", Duration::from_secs(1)),
            None,
            "bounded: evicted"
        );
        c.forget("d");
        assert_eq!(c.recall("d", Duration::from_secs(1)), None);
    }
}
