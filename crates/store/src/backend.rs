//! The one trait every backend implements.
//!
//! Keys arrive already namespaced and validated by [`crate::Store`]; a backend
//! only translates each operation into its engine's commands and maps the
//! engine's failures onto [`StoreError`]. The semantics are pinned by the
//! conformance suite (`conformance.rs`), which runs unchanged on every backend.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::types::{Condition, FieldMap, MapPatch, PatchOutcome, Versioned};
#[cfg(any(feature = "memory", feature = "sqlite"))]
use crate::{
    error::{Conflict, StoreError},
    types::FieldOp,
};

/// A storage engine behind the store API.
///
/// Versioned values, field maps and counters live in separate namespaces: the
/// same key may name one of each.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The store's address with credentials removed, for errors and logs.
    fn describe(&self) -> &str;

    /// The live value, or `None` if absent or expired.
    async fn get(&self, key: &str) -> Result<Option<Versioned>>;

    /// Writes `value` if `condition` holds and returns the new version.
    /// `ttl: None` means no expiry.
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<u64>;

    /// Deletes the value if `condition` holds (`Any` or `IfVersion`); returns
    /// whether a live value was deleted.
    async fn delete(&self, key: &str, condition: Condition) -> Result<bool>;

    /// Sets a new TTL on a live value; returns false if it is absent.
    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Every field of a live map with its version.
    async fn map_read(&self, key: &str) -> Result<Option<FieldMap>>;

    /// Applies a patch atomically, in one round trip to the engine.
    async fn map_patch(&self, key: &str, patch: &MapPatch) -> Result<PatchOutcome>;

    /// Deletes a map; returns whether a live map was deleted.
    async fn map_delete(&self, key: &str) -> Result<bool>;

    /// Sets a new TTL on a live map; returns false if it is absent.
    async fn map_touch(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Adds `delta` to a counter (absent counts as 0) and returns the new
    /// value. `ttl` is applied when the counter is created; a live counter
    /// keeps its expiry (fixed windows, as rate limits want).
    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64>;

    /// The live value of a counter.
    async fn counter(&self, key: &str) -> Result<Option<i64>>;
}

/// `max(previous + 1, now in microseconds)`: the version rule shared by the
/// backends that compute versions on the client side.
#[cfg(any(feature = "memory", feature = "sqlite"))]
pub(crate) fn next_version(previous: u64, now_micros: u64) -> u64 {
    (previous + 1).max(now_micros)
}

#[cfg(any(feature = "memory", feature = "sqlite"))]
pub(crate) fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        // A clock before 1970 only weakens the no-reuse property of versions;
        // `previous + 1` still keeps them increasing.
        .unwrap_or(0)
}

/// Milliseconds of a TTL as the engines take them, at least 1.
#[cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]
pub(crate) fn ttl_millis(ttl: Duration) -> i64 {
    (ttl.as_millis().clamp(1, i64::MAX as u128)) as i64
}

/// Checks a versioned-value condition against the live version (if any).
#[cfg(any(feature = "memory", feature = "sqlite"))]
pub(crate) fn check_condition(current: Option<u64>, condition: Condition) -> Result<()> {
    match (condition, current) {
        (Condition::Any, _) => Ok(()),
        (Condition::IfAbsent, None) => Ok(()),
        (Condition::IfAbsent, Some(_)) => Err(StoreError::Conflict(Conflict::AlreadyExists)),
        (Condition::IfVersion(_), None) => Err(StoreError::Conflict(Conflict::NotFound)),
        (Condition::IfVersion(want), Some(have)) if want == have => Ok(()),
        (Condition::IfVersion(_), Some(_)) => {
            Err(StoreError::Conflict(Conflict::VersionMismatch {
                field: None,
            }))
        }
    }
}

#[cfg(any(feature = "memory", feature = "sqlite", feature = "redis"))]
pub(crate) fn parse_counter(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Computes the new value of every `Incr` op of a patch, in op order, before
/// anything is applied, so a patch with a non-integer field changes nothing.
/// Within one patch, ops apply in order: a `Set` then an `Incr` of the same
/// field adds to the set value, a `Remove` then an `Incr` starts from 0.
/// `stored` gives a field's payload as it is in the store.
#[cfg(any(feature = "memory", feature = "sqlite"))]
pub(crate) fn plan_increments<'a>(
    ops: &[FieldOp],
    stored: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Vec<i64>> {
    // `None` in `pending` marks a field set to a non-integer by this patch.
    let mut pending: std::collections::HashMap<&str, Option<i64>> = Default::default();
    let mut out = Vec::new();
    for op in ops {
        match op {
            FieldOp::Set(field, value) => {
                pending.insert(field, parse_counter(value));
            }
            FieldOp::Remove(field) => {
                pending.insert(field, Some(0));
            }
            FieldOp::Incr(field, delta) => {
                let base = match pending.get(field.as_str()) {
                    Some(v) => *v,
                    None => stored(field).map_or(Some(0), parse_counter),
                };
                let next = base
                    .ok_or_else(|| {
                        StoreError::Invalid(format!("field {field:?} is not an integer"))
                    })?
                    .checked_add(*delta)
                    .ok_or_else(|| {
                        StoreError::Invalid(format!("field {field:?} would overflow"))
                    })?;
                pending.insert(field, Some(next));
                out.push(next);
            }
        }
    }
    Ok(out)
}
