//! In-process memory: the stateful baseline.
//!
//! State here dies with the process and is invisible to other instances;
//! that is the point of having it (the `sticky-memory` architecture). It is
//! also the reference the other backends are compared with in tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::backend::{Backend, check_condition, next_version, plan_increments, unix_micros};
use crate::error::{Conflict, Result, StoreError};
use crate::types::{
    Condition, Existence, FieldCondition, FieldMap, FieldOp, MapPatch, PatchOutcome, Versioned,
    map_too_large,
};

#[derive(Debug)]
struct Entry<T> {
    data: T,
    expires_at: Option<Instant>,
}

impl<T> Entry<T> {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

#[derive(Debug, Default)]
struct MapData {
    version: u64,
    fields: BTreeMap<String, Versioned>,
}

#[derive(Debug, Default)]
struct Tables {
    kv: HashMap<String, Entry<Versioned>>,
    maps: HashMap<String, Entry<MapData>>,
    counters: HashMap<String, Entry<i64>>,
    ops_since_sweep: u32,
}

impl Tables {
    /// Expired entries are never returned (every read checks `live`); this
    /// sweep only bounds memory, once every few thousand operations.
    fn maybe_sweep(&mut self, now: Instant) {
        self.ops_since_sweep += 1;
        if self.ops_since_sweep < 4096 {
            return;
        }
        self.ops_since_sweep = 0;
        self.kv.retain(|_, e| e.live(now));
        self.maps.retain(|_, e| e.live(now));
        self.counters.retain(|_, e| e.live(now));
    }
}

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    // A std Mutex, not a tokio one: no `.await` happens while it is held, and
    // every critical section is a few map operations.
    tables: Mutex<Tables>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Tables, Instant) -> R) -> R {
        let now = Instant::now();
        // A poisoned lock means a panic inside one of the short sections
        // below, none of which can leave the maps half-updated in a way later
        // reads could not handle; carry on with the data.
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables.maybe_sweep(now);
        f(&mut tables, now)
    }
}

fn expiry(now: Instant, ttl: Option<Duration>) -> Option<Instant> {
    ttl.map(|t| now + t)
}

#[async_trait]
impl Backend for MemoryBackend {
    fn describe(&self) -> &str {
        "memory://"
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Ok(self.with(|t, now| {
            t.kv.get(key)
                .filter(|e| e.live(now))
                .map(|e| e.data.clone())
        }))
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<u64> {
        self.with(|t, now| {
            let current = t.kv.get(key).filter(|e| e.live(now)).map(|e| &e.data);
            check_condition(current.map(|v| v.version), condition)?;
            let previous = t.kv.get(key).map_or(0, |e| e.data.version);
            let version = next_version(previous, unix_micros());
            t.kv.insert(
                key.to_owned(),
                Entry {
                    data: Versioned { value, version },
                    expires_at: expiry(now, ttl),
                },
            );
            Ok(version)
        })
    }

    async fn delete(&self, key: &str, condition: Condition) -> Result<bool> {
        self.with(|t, now| {
            let current =
                t.kv.get(key)
                    .filter(|e| e.live(now))
                    .map(|e| e.data.version);
            check_condition(current, condition)?;
            Ok(t.kv.remove(key).is_some_and(|e| e.live(now)))
        })
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        Ok(self.with(|t, now| match t.kv.get_mut(key) {
            Some(e) if e.live(now) => {
                e.expires_at = Some(now + ttl);
                true
            }
            _ => false,
        }))
    }

    async fn map_read(&self, key: &str) -> Result<Option<FieldMap>> {
        Ok(self.with(|t, now| {
            t.maps.get(key).filter(|e| e.live(now)).map(|e| FieldMap {
                version: e.data.version,
                fields: e.data.fields.clone(),
                expires_in: e.expires_at.map(|at| at - now),
            })
        }))
    }

    async fn map_patch(&self, key: &str, patch: &MapPatch) -> Result<PatchOutcome> {
        self.with(|t, now| {
            let live = t.maps.get(key).is_some_and(|e| e.live(now));
            match (patch.existence, live) {
                (Existence::MustExist, false) => {
                    return Err(StoreError::Conflict(Conflict::NotFound));
                }
                (Existence::MustNotExist, true) => {
                    return Err(StoreError::Conflict(Conflict::AlreadyExists));
                }
                _ => {}
            }
            let empty = BTreeMap::new();
            let fields = match t.maps.get(key) {
                Some(e) if live => &e.data.fields,
                _ => &empty,
            };
            for (field, condition) in &patch.conditions {
                let current = fields.get(field).map(|v| v.version);
                let holds = match condition {
                    FieldCondition::Absent => current.is_none(),
                    FieldCondition::Version(v) => current == Some(*v),
                };
                if !holds {
                    return Err(StoreError::Conflict(Conflict::VersionMismatch {
                        field: Some(field.clone()),
                    }));
                }
            }
            // Every increment is computed before anything changes: all or nothing.
            let planned = plan_increments(&patch.ops, |f| fields.get(f).map(|v| v.value.as_ref()))?;
            if let Some(limit) = patch.max_bytes {
                let size = projected_size(fields, &patch.ops, &planned);
                if size > limit {
                    return Err(map_too_large(size, limit));
                }
            }

            let entry = match t.maps.get_mut(key) {
                Some(e) if e.live(now) => e,
                _ => {
                    let previous = t.maps.get(key).map_or(0, |e| e.data.version);
                    t.maps.insert(
                        key.to_owned(),
                        Entry {
                            data: MapData {
                                version: previous,
                                fields: BTreeMap::new(),
                            },
                            expires_at: None,
                        },
                    );
                    t.maps.get_mut(key).expect("inserted just above")
                }
            };
            let version = next_version(entry.data.version, unix_micros());
            entry.data.version = version;
            let planned_out = planned.clone();
            let mut counters = planned.into_iter();
            for op in &patch.ops {
                match op {
                    FieldOp::Set(field, value) => {
                        entry.data.fields.insert(
                            field.clone(),
                            Versioned {
                                value: value.clone(),
                                version,
                            },
                        );
                    }
                    FieldOp::Remove(field) => {
                        entry.data.fields.remove(field);
                    }
                    FieldOp::Incr(field, _) => {
                        let value = counters.next().expect("one planned value per Incr op");
                        entry.data.fields.insert(
                            field.clone(),
                            Versioned {
                                value: Bytes::from(value.to_string()),
                                version,
                            },
                        );
                    }
                }
            }
            if let Some(ttl) = patch.ttl {
                entry.expires_at = Some(now + ttl);
            }
            let counters = planned_out;
            Ok(PatchOutcome { version, counters })
        })
    }

    async fn map_delete(&self, key: &str) -> Result<bool> {
        Ok(self.with(|t, now| t.maps.remove(key).is_some_and(|e| e.live(now))))
    }

    async fn map_touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        Ok(self.with(|t, now| match t.maps.get_mut(key) {
            Some(e) if e.live(now) => {
                e.expires_at = Some(now + ttl);
                true
            }
            _ => false,
        }))
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64> {
        self.with(|t, now| {
            let entry = match t.counters.get_mut(key) {
                Some(e) if e.live(now) => e,
                _ => {
                    t.counters.insert(
                        key.to_owned(),
                        Entry {
                            data: 0,
                            expires_at: expiry(now, ttl),
                        },
                    );
                    t.counters.get_mut(key).expect("inserted just above")
                }
            };
            entry.data = entry
                .data
                .checked_add(delta)
                .ok_or_else(|| StoreError::Invalid(format!("counter {key:?} would overflow")))?;
            Ok(entry.data)
        })
    }

    async fn counter(&self, key: &str) -> Result<Option<i64>> {
        Ok(self.with(|t, now| t.counters.get(key).filter(|e| e.live(now)).map(|e| e.data)))
    }
}

/// The map's size (names + values) after `ops`, given the planned counter
/// values.
fn projected_size(fields: &BTreeMap<String, Versioned>, ops: &[FieldOp], planned: &[i64]) -> usize {
    let mut sizes: HashMap<&str, usize> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), k.len() + v.value.len()))
        .collect();
    let mut counters = planned.iter();
    for op in ops {
        match op {
            FieldOp::Set(f, v) => {
                sizes.insert(f, f.len() + v.len());
            }
            FieldOp::Remove(f) => {
                sizes.remove(f.as_str());
            }
            FieldOp::Incr(f, _) => {
                let n = counters.next().copied().unwrap_or_default();
                sizes.insert(f, f.len() + n.to_string().len());
            }
        }
    }
    sizes.values().sum()
}
