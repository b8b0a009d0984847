//! Discovery: which instances exist. The set is an immutable snapshot swapped atomically (one
//! `ArcSwap` store per change), so a request reads one consistent set, with the selector built
//! for exactly that set, without taking a lock.
//!
//! Instances come from a [`Discovery`] source at start (the static list of the configuration)
//! and are then added and removed through the admin API. A removed instance leaves the set at
//! once; requests already holding it finish normally (they hold an `Arc`).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{InstanceConfig, LbConfig};
use crate::error::LbError;
use crate::metrics::BackendMetrics;
use crate::selection::{self, SelectionConfig, Selector};

/// A source of instances.
pub trait Discovery: Send + Sync {
    /// The instances to start with.
    fn discover(&self) -> impl Future<Output = Result<Vec<InstanceConfig>, LbError>> + Send;
}

/// The fixed list of `[[instances]]` from the configuration.
#[derive(Debug, Clone)]
pub struct StaticDiscovery(pub Vec<InstanceConfig>);

impl Discovery for StaticDiscovery {
    async fn discover(&self) -> Result<Vec<InstanceConfig>, LbError> {
        Ok(self.0.clone())
    }
}

/// One instance and everything the balancer knows about it.
pub struct Backend {
    name: String,
    addr: String,
    sticky_id: String,
    /// Set by the admin API: no new requests, in-flight ones finish.
    draining: AtomicBool,
    /// The active checker's verdict (starts healthy: an instance is innocent until probed).
    healthy: AtomicBool,
    /// Passive ejection: out of rotation until this instant.
    ejected_until: Mutex<Option<Instant>>,
    /// Whether `ejected_until` may be set: lets every request skip the lock (and the clock)
    /// while the instance was never ejected or the ejection has been seen to end. Changed only
    /// under that lock.
    maybe_ejected: AtomicBool,
    consecutive_failures: AtomicU32,
    in_flight: AtomicU64,
    /// Woken whenever `in_flight` drops to zero (drain waits on it).
    idle: Notify,
    /// Peak-EWMA latency estimate for P2C, in nanoseconds, and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
    pub(crate) metrics: BackendMetrics,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("draining", &self.is_draining())
            .field("healthy", &self.is_healthy())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Backend {
    pub(crate) fn new(inst: &InstanceConfig, default_rtt: Duration) -> Self {
        Self {
            sticky_id: format!(
                "{:016x}",
                selection::hash::stable_hash(inst.name.as_bytes())
            ),
            name: inst.name.clone(),
            addr: inst.addr.clone(),
            draining: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            ejected_until: Mutex::new(None),
            maybe_ejected: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
            ewma: Mutex::new((default_rtt.as_nanos() as f64, Instant::now())),
            metrics: BackendMetrics::default(),
        }
    }

    /// The instance's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The opaque value the sticky cookie carries for this instance (a hash of its name: it
    /// does not reveal the address).
    pub fn sticky_id(&self) -> &str {
        &self.sticky_id
    }

    /// Whether the instance is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The active health checker's verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Whether passive ejection has it out of rotation now.
    pub fn is_ejected(&self) -> bool {
        if !self.maybe_ejected.load(Ordering::Acquire) {
            return false;
        }
        let mut until = self.ejected_until_locked();
        match *until {
            Some(t) if Instant::now() < t => true,
            _ => {
                *until = None;
                self.maybe_ejected.store(false, Ordering::Release);
                false
            }
        }
    }

    /// Requests (and WebSocket tunnels) in flight on this instance.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Healthy, not ejected, not draining: gets traffic normally.
    pub(crate) fn is_usable(&self) -> bool {
        !self.is_draining() && self.is_healthy() && !self.is_ejected()
    }

    pub(crate) fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    pub(crate) fn set_healthy(&self, on: bool) {
        self.healthy.store(on, Ordering::Release);
    }

    fn ejected_until_locked(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // The lock only guards an `Option<Instant>` (and the flag beside it); a poisoned lock
        // still holds a valid value.
        self.ejected_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn eject_until(&self, until: Instant) {
        let mut g = self.ejected_until_locked();
        *g = Some(until);
        self.maybe_ejected.store(true, Ordering::Release);
    }

    /// Counts a failure seen in live traffic; returns the new count of consecutive failures.
    pub(crate) fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn record_success(&self) {
        // Read first: a store on every request would bounce the line between cores.
        if self.consecutive_failures.load(Ordering::Acquire) != 0 {
            self.consecutive_failures.store(0, Ordering::Release);
        }
    }

    pub(crate) fn reset_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
    }

    /// Marks one more request in flight until the guard drops.
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Waits until nothing is in flight.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a decrement between the check and the await is not
            // missed.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Peak EWMA: a slower answer raises the estimate at once, faster ones lower it gradually
    /// with time constant `decay`.
    pub(crate) fn observe_latency(&self, rtt: Duration, decay: Duration) {
        let mut g = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        let (est, at) = *g;
        let next = if rtt > est {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            let w = (-elapsed / decay.as_secs_f64()).exp();
            est * w + rtt * (1.0 - w)
        };
        *g = (next, now);
    }

    /// P2C's load: the latency estimate scaled by the queue an extra request would join.
    pub(crate) fn load_cost(&self) -> f64 {
        let est = self.ewma.lock().unwrap_or_else(|p| p.into_inner()).0;
        est * (self.in_flight() as f64 + 1.0)
    }
}

/// A request in flight on a backend; decrements the count (and wakes drain waiters) on drop.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Backend>);

impl InFlight {
    /// The instance the request is on.
    pub(crate) fn backend(&self) -> &Backend {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One immutable version of the backend set and the selector built for it.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) backends: Arc<[Arc<Backend>]>,
    pub(crate) selector: Box<dyn Selector>,
}

/// The live backend set, swapped atomically on every change.
pub struct BackendSet {
    current: ArcSwap<Snapshot>,
    /// Serializes the read-modify-write of add/remove; readers never take it.
    write: Mutex<()>,
    selection: SelectionConfig,
    default_rtt: Duration,
}

impl fmt::Debug for BackendSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendSet")
            .field("backends", &self.snapshot().backends)
            .finish()
    }
}

/// Why an admin change to the set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    /// The name is taken.
    #[error("an instance named {0:?} already exists")]
    Exists(String),
    /// No instance has that name.
    #[error("no instance named {0:?}")]
    NotFound(String),
    /// The instance is malformed.
    #[error("`{0}`: {1}")]
    Invalid(&'static str, String),
}

impl BackendSet {
    pub(crate) fn new(config: &LbConfig, initial: &[InstanceConfig]) -> Self {
        let selection = SelectionConfig::from_config(config);
        let backends: Arc<[Arc<Backend>]> = initial
            .iter()
            .map(|i| Arc::new(Backend::new(i, config.p2c.default_rtt)))
            .collect();
        let selector = selection::build(&selection, &backends);
        Self {
            current: ArcSwap::from_pointee(Snapshot { backends, selector }),
            write: Mutex::new(()),
            selection,
            default_rtt: config.p2c.default_rtt,
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current snapshot without touching its reference count (which every request would
    /// otherwise bounce between cores): for short, synchronous use.
    pub(crate) fn snapshot_ref(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current instances.
    pub fn backends(&self) -> Arc<[Arc<Backend>]> {
        Arc::clone(&self.snapshot().backends)
    }

    /// The instance named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Backend>> {
        self.snapshot()
            .backends
            .iter()
            .find(|b| b.name == name)
            .cloned()
    }

    pub(crate) fn add(&self, inst: &InstanceConfig) -> Result<Arc<Backend>, SetError> {
        crate::config::validate_instance(inst).map_err(|(k, r)| SetError::Invalid(k, r))?;
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.snapshot();
        if cur.backends.iter().any(|b| b.name == inst.name) {
            return Err(SetError::Exists(inst.name.clone()));
        }
        let new = Arc::new(Backend::new(inst, self.default_rtt));
        let backends: Arc<[Arc<Backend>]> = cur
            .backends
            .iter()
            .cloned()
            .chain([Arc::clone(&new)])
            .collect();
        self.swap(backends);
        Ok(new)
    }

    pub(crate) fn remove(&self, name: &str) -> Result<Arc<Backend>, SetError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.snapshot();
        let gone = cur
            .backends
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| SetError::NotFound(name.to_owned()))?;
        let backends: Arc<[Arc<Backend>]> = cur
            .backends
            .iter()
            .filter(|b| b.name != name)
            .cloned()
            .collect();
        self.swap(backends);
        Ok(gone)
    }

    fn swap(&self, backends: Arc<[Arc<Backend>]>) {
        let selector = selection::build(&self.selection, &backends);
        self.current
            .store(Arc::new(Snapshot { backends, selector }));
    }
}
