//! The values the store API speaks: bytes, versions and durations.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

/// A stored value and the version it was written with.
///
/// Versions are unique per key over time: every backend derives a new version
/// from `max(previous + 1, now in microseconds)`, so a key that is deleted and
/// written again does not reuse an old version (no ABA on compare-and-set),
/// as long as the clock of the store does not jump back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub version: u64,
}

/// The condition a write of a versioned value is subject to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Write whatever is there.
    Any,
    /// Write only if the key is absent or expired.
    IfAbsent,
    /// Write only if the key is live and holds exactly this version.
    IfVersion(u64),
}

/// A field map with the version of each field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldMap {
    /// The map's own sequence number: the version given to the fields written
    /// by its latest patch.
    pub version: u64,
    pub fields: BTreeMap<String, Versioned>,
    /// Time left before the map expires, `None` when it has no expiry.
    pub expires_in: Option<Duration>,
}

impl FieldMap {
    /// The bytes of one field.
    pub fn get(&self, field: &str) -> Option<&Bytes> {
        self.fields.get(field).map(|v| &v.value)
    }

    /// A counter field written by [`MapPatch::incr`].
    pub fn counter(&self, field: &str) -> Option<i64> {
        self.fields
            .get(field)
            .and_then(|v| std::str::from_utf8(&v.value).ok())
            .and_then(|s| s.parse().ok())
    }
}

/// A condition on one field of a map, checked before a patch applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldCondition {
    /// The field must not exist.
    Absent,
    /// The field must exist with exactly this version.
    Version(u64),
}

/// Whether a patch may create the map, must find it, or must create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existence {
    /// Create the map if needed.
    #[default]
    Any,
    /// Fail with `Conflict::NotFound` if the map is absent or expired. Sessions
    /// use this so that no late write can bring back a destroyed session.
    MustExist,
    /// Fail with `Conflict::AlreadyExists` if the map is live.
    MustNotExist,
}

/// One change inside a patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldOp {
    Set(String, Bytes),
    Remove(String),
    /// Add to a decimal integer field (absent counts as 0). The new value is
    /// returned in [`PatchOutcome::counters`], in op order.
    Incr(String, i64),
}

impl FieldOp {
    pub fn field(&self) -> &str {
        match self {
            FieldOp::Set(f, _) | FieldOp::Remove(f) | FieldOp::Incr(f, _) => f,
        }
    }
}

/// An atomic change to a field map: conditions are checked, then every op is
/// applied and the TTL refreshed, all or nothing, in one round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapPatch {
    pub ops: Vec<FieldOp>,
    pub conditions: Vec<(String, FieldCondition)>,
    pub existence: Existence,
    /// New time to live for the whole map; `None` keeps the current expiry
    /// (a new map then has none).
    pub ttl: Option<Duration>,
    /// Upper bound on the map's size after the patch, counted as the sum of
    /// field name and value lengths in bytes. Checked atomically with the
    /// patch by the backend, so concurrent writers cannot together exceed
    /// it; over it the patch fails with `TooLarge` and changes nothing.
    pub max_bytes: Option<usize>,
}

impl MapPatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(mut self, field: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.ops.push(FieldOp::Set(field.into(), value.into()));
        self
    }

    pub fn remove(mut self, field: impl Into<String>) -> Self {
        self.ops.push(FieldOp::Remove(field.into()));
        self
    }

    pub fn incr(mut self, field: impl Into<String>, delta: i64) -> Self {
        self.ops.push(FieldOp::Incr(field.into(), delta));
        self
    }

    pub fn require(mut self, field: impl Into<String>, condition: FieldCondition) -> Self {
        self.conditions.push((field.into(), condition));
        self
    }

    pub fn existence(mut self, existence: Existence) -> Self {
        self.existence = existence;
        self
    }

    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    pub fn max_bytes(mut self, limit: usize) -> Self {
        self.max_bytes = Some(limit);
        self
    }
}

/// The error for a map over its `max_bytes`.
pub(crate) fn map_too_large(size: usize, limit: usize) -> crate::StoreError {
    crate::StoreError::TooLarge {
        what: "map",
        size,
        limit,
    }
}

/// What a successful patch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchOutcome {
    /// The version given to every field this patch wrote.
    pub version: u64,
    /// New values of the `Incr` ops, in the order they appear in the patch.
    pub counters: Vec<i64>,
}

/// Size limits, checked before anything is sent to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_field_name_bytes: usize,
    /// Ops plus conditions in one patch.
    pub max_patch_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 512,
            max_value_bytes: 1024 * 1024,
            max_field_name_bytes: 256,
            max_patch_entries: 1024,
        }
    }
}
