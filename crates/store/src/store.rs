//! The handle applications hold: validation, namespacing and the policy layer
//! in front of one backend.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::Backend;
use crate::deadline::Deadlines;
use crate::error::{Result, StoreError, UnavailableKind};
use crate::policy::{Breaker, OnStoreDown, Permit, Policy, Read, ReadState, StaleCache};
use crate::types::{Condition, FieldMap, Limits, MapPatch, PatchOutcome, Versioned};

/// Everything needed to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `memory://`, `sqlite://PATH`, `redis://HOST:PORT[/DB]`,
    /// `redis+cluster://HOST:PORT[,HOST:PORT...]`, `postgres://...`.
    pub url: String,
    /// Prepended to every key, so several apps or tests can share a server.
    pub prefix: String,
    pub limits: Limits,
    pub policy: Policy,
}

impl StoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        StoreConfig {
            url: url.into(),
            prefix: "sh:".to_owned(),
            limits: Limits::default(),
            policy: Policy::fail_closed(),
        }
    }

    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// What the stale cache keeps: one entry type per namespace.
#[derive(Debug, Clone)]
enum Cached {
    Value(Option<Versioned>),
    Map(Option<FieldMap>),
    Counter(Option<i64>),
}

/// A read's result type, convertible to and from the stale cache's entry.
trait Cacheable: Sized + Clone {
    const TAG: char;
    fn wrap(value: Option<Self>) -> Cached;
    fn unwrap(cached: Cached) -> Option<Option<Self>>;
}

macro_rules! cacheable {
    ($ty:ty, $variant:ident, $tag:literal) => {
        impl Cacheable for $ty {
            const TAG: char = $tag;
            fn wrap(value: Option<Self>) -> Cached {
                Cached::$variant(value)
            }
            fn unwrap(cached: Cached) -> Option<Option<Self>> {
                match cached {
                    Cached::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
cacheable!(Versioned, Value, 'v');
cacheable!(FieldMap, Map, 'm');
cacheable!(i64, Counter, 'c');

#[derive(Debug)]
struct Inner {
    backend: Arc<dyn Backend>,
    prefix: String,
    limits: Limits,
    policy: Policy,
    breaker: Breaker,
    stale: Option<StaleCache<Cached>>,
    deadlines: Deadlines,
}

/// A cheap-to-clone handle on one store. Every instance of a service opens
/// its own handle on the same shared store; no handle keeps state another
/// instance would need, except the optional stale-read cache, which is only
/// ever used while the store is unreachable and is bounded by `max_age`.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Wraps an already-open backend.
    pub fn with_backend(backend: Arc<dyn Backend>, config: &StoreConfig) -> Self {
        let stale = match config.policy.on_down {
            OnStoreDown::ServeStale { capacity, .. } => Some(StaleCache::new(capacity)),
            _ => None,
        };
        Store {
            inner: Arc::new(Inner {
                backend,
                prefix: config.prefix.clone(),
                limits: config.limits,
                policy: config.policy,
                breaker: Breaker::new(config.policy.breaker),
                stale,
                deadlines: Deadlines::new(),
            }),
        }
    }

    /// The store's address, without credentials.
    pub fn describe(&self) -> &str {
        self.inner.backend.describe()
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub async fn get(&self, key: &str) -> Result<Read<Option<Versioned>>> {
        let key = self.key(key)?;
        self.read(&key, self.inner.backend.get(&key)).await
    }

    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<u64> {
        let key = self.key(key)?;
        let value = value.into();
        self.check_value(value.len())?;
        if let Some(ttl) = ttl {
            check_ttl(ttl)?;
        }
        self.write::<Versioned, _>(&key, self.inner.backend.put(&key, value, ttl, condition))
            .await
    }

    pub async fn delete(&self, key: &str, condition: Condition) -> Result<bool> {
        let key = self.key(key)?;
        if condition == Condition::IfAbsent {
            return Err(StoreError::Invalid(
                "delete takes Condition::Any or Condition::IfVersion".into(),
            ));
        }
        self.write::<Versioned, _>(&key, self.inner.backend.delete(&key, condition))
            .await
    }

    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let key = self.key(key)?;
        check_ttl(ttl)?;
        self.call(self.inner.backend.touch(&key, ttl)).await
    }

    pub async fn map_read(&self, key: &str) -> Result<Read<Option<FieldMap>>> {
        let key = self.key(key)?;
        self.read(&key, self.inner.backend.map_read(&key)).await
    }

    pub async fn map_patch(&self, key: &str, patch: &MapPatch) -> Result<PatchOutcome> {
        let key = self.key(key)?;
        self.check_patch(patch)?;
        self.write::<FieldMap, _>(&key, self.inner.backend.map_patch(&key, patch))
            .await
    }

    pub async fn map_delete(&self, key: &str) -> Result<bool> {
        let key = self.key(key)?;
        self.write::<FieldMap, _>(&key, self.inner.backend.map_delete(&key))
            .await
    }

    pub async fn map_touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let key = self.key(key)?;
        check_ttl(ttl)?;
        self.call(self.inner.backend.map_touch(&key, ttl)).await
    }

    pub async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64> {
        let key = self.key(key)?;
        if let Some(ttl) = ttl {
            check_ttl(ttl)?;
        }
        self.write::<i64, _>(&key, self.inner.backend.incr(&key, delta, ttl))
            .await
    }

    pub async fn counter(&self, key: &str) -> Result<Read<Option<i64>>> {
        let key = self.key(key)?;
        self.read(&key, self.inner.backend.counter(&key)).await
    }

    fn key(&self, key: &str) -> Result<String> {
        if key.is_empty() {
            return Err(StoreError::Invalid("empty key".into()));
        }
        if key.len() > self.inner.limits.max_key_bytes {
            return Err(StoreError::TooLarge {
                what: "key",
                size: key.len(),
                limit: self.inner.limits.max_key_bytes,
            });
        }
        Ok([self.inner.prefix.as_str(), key].concat())
    }

    fn check_value(&self, len: usize) -> Result<()> {
        if len > self.inner.limits.max_value_bytes {
            return Err(StoreError::TooLarge {
                what: "value",
                size: len,
                limit: self.inner.limits.max_value_bytes,
            });
        }
        Ok(())
    }

    fn check_field(&self, field: &str) -> Result<()> {
        if field.is_empty() {
            return Err(StoreError::Invalid("empty field name".into()));
        }
        if field.len() > self.inner.limits.max_field_name_bytes {
            return Err(StoreError::TooLarge {
                what: "field name",
                size: field.len(),
                limit: self.inner.limits.max_field_name_bytes,
            });
        }
        Ok(())
    }

    fn check_patch(&self, patch: &MapPatch) -> Result<()> {
        let entries = patch.ops.len() + patch.conditions.len();
        if entries > self.inner.limits.max_patch_entries {
            return Err(StoreError::TooLarge {
                what: "patch (ops + conditions)",
                size: entries,
                limit: self.inner.limits.max_patch_entries,
            });
        }
        for op in &patch.ops {
            self.check_field(op.field())?;
            if let crate::FieldOp::Set(_, value) = op {
                self.check_value(value.len())?;
            }
        }
        for (field, _) in &patch.conditions {
            self.check_field(field)?;
        }
        if let Some(ttl) = patch.ttl {
            check_ttl(ttl)?;
        }
        Ok(())
    }

    /// Timeout and circuit breaker around one backend call.
    async fn call<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let Some(permit) = Permit::acquire(&self.inner.breaker) else {
            return Err(StoreError::unavailable(
                self.describe(),
                UnavailableKind::CircuitOpen,
                "circuit breaker open after repeated failures",
            ));
        };
        let result = match self
            .inner
            .deadlines
            .bound(self.inner.policy.timeout, fut)
            .await
        {
            Ok(result) => result,
            Err(_) => Err(StoreError::unavailable(
                self.describe(),
                UnavailableKind::Timeout,
                format!("no answer within {:?}", self.inner.policy.timeout),
            )),
        };
        permit.finish(!matches!(&result, Err(e) if e.is_unavailable()));
        result
    }

    /// A read under the `OnStoreDown` policy.
    async fn read<T: Cacheable>(
        &self,
        key: &str,
        fut: impl Future<Output = Result<Option<T>>>,
    ) -> Result<Read<Option<T>>> {
        match self.call(fut).await {
            Ok(value) => {
                if let Some(cache) = &self.inner.stale {
                    cache.remember(cache_key::<T>(key), T::wrap(value.clone()));
                }
                Ok(Read::fresh(value))
            }
            Err(e) if e.is_unavailable() => match self.inner.policy.on_down {
                OnStoreDown::FailClosed => Err(e),
                OnStoreDown::FailOpen => Ok(Read {
                    value: None,
                    state: ReadState::Degraded,
                }),
                OnStoreDown::ServeStale { max_age, .. } => {
                    let cached = self
                        .inner
                        .stale
                        .as_ref()
                        .and_then(|c| c.recall(&cache_key::<T>(key), max_age))
                        .and_then(|(cached, age)| T::unwrap(cached).map(|v| (v, age)));
                    match cached {
                        Some((value, age)) => Ok(Read {
                            value,
                            state: ReadState::Stale { age },
                        }),
                        None => Err(e),
                    }
                }
            },
            Err(e) => Err(e),
        }
    }

    /// A write: acknowledged only when the backend took it. Whatever the
    /// outcome, the cached copy of the key is dropped so a stale read never
    /// shows a value older than one this instance wrote.
    async fn write<T: Cacheable, R>(
        &self,
        key: &str,
        fut: impl Future<Output = Result<R>>,
    ) -> Result<R> {
        let result = self.call(fut).await;
        if let Some(cache) = &self.inner.stale {
            cache.forget(&cache_key::<T>(key));
        }
        result
    }
}

fn cache_key<T: Cacheable>(key: &str) -> String {
    format!("{}{}", T::TAG, key)
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_millis(1) {
        return Err(StoreError::Invalid(format!(
            "TTL {ttl:?} is shorter than the 1 ms resolution of the backends"
        )));
    }
    Ok(())
}
