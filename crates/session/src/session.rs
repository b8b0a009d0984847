//! The per-request session handle.
//!
//! Nothing is read until a handler asks (lazy), and writes are *deltas*:
//! `insert` and `remove` record changes to single fields, and the layer
//! applies them after the handler in one atomic patch of those fields only.
//! Two requests of one session on two instances that change different
//! fields therefore never overwrite each other, unlike a whole-record
//! save. Read-modify-write of one field goes through [`Session::update`]
//! (compare-and-set on the field's version) or [`Session::increment`]
//! (atomic in the store).
//!
//! Every write to an existing session requires it to still exist
//! (`Existence::MustExist`), so a write that arrives after a logout is
//! refused instead of bringing the session back; new sessions always get a
//! fresh random id and are created with `MustNotExist`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use statehouse_store::{
    Conflict, Existence, FieldCondition, FieldMap, MapPatch, ReadState, Store, StoreError,
    Versioned,
};

use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::keys::SessionId;

/// The reserved field holding the creation time (Unix seconds).
const CREATED: &str = "_sh.created";
const RESERVED_PREFIX: &str = "_sh.";

pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) config: SessionConfig,
}

impl Shared {
    fn key(&self, id: &SessionId) -> String {
        [self.config.key_prefix.as_str(), id.as_str()].concat()
    }
}

/// What the response must do with the cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CookieAction {
    Keep,
    /// Set a new signed value (a session was created or rotated).
    Set(String),
    /// Expire the cookie (logout, or the presented session is gone).
    Clear,
}

/// What was read from the store, once per request.
#[derive(Debug)]
struct Snapshot {
    /// The stored map's fields as read, the layer's own (`RESERVED_PREFIX`)
    /// included: `get` cannot name those, and the two places that list
    /// fields skip them.
    fields: BTreeMap<String, Versioned>,
    /// Time left before the idle expiry, when the session exists.
    expires_in: Option<Duration>,
    read_state: ReadState,
}

#[derive(Debug)]
struct State {
    /// The session this request works on, if any.
    id: Option<SessionId>,
    created_secs: u64,
    /// Whether `id` names a live session in the store. `None` until known.
    exists: Option<bool>,
    /// Changes to apply after the handler: `Some` sets, `None` removes.
    pending: BTreeMap<String, Option<Bytes>>,
    /// Values this request already wrote straight to the store
    /// (`update`, `increment`, `rotate_id`): read back by `get`, never
    /// written again.
    written: BTreeMap<String, Option<Bytes>>,
    cookie: CookieAction,
    ended: bool,
}

struct Inner {
    shared: Arc<Shared>,
    // Loading awaits the store, so this is an async once-cell; everything
    // else is a std Mutex held only for map operations, never across an
    // await.
    snapshot: tokio::sync::OnceCell<Snapshot>,
    state: Mutex<State>,
}

/// The session of the current request. Cheap to clone; taken from the
/// request by the axum extractor (`session: Session` in a handler).
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        // Before 1970 the absolute lifetime check errs towards expiring.
        .unwrap_or(0)
}

fn check_field_name(field: &str) -> Result<(), SessionError> {
    if field.starts_with(RESERVED_PREFIX) {
        return Err(SessionError::ReservedField(field.to_owned()));
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(field: &str, bytes: &[u8]) -> Result<T, SessionError> {
    serde_json::from_slice(bytes).map_err(|e| SessionError::Decode {
        field: field.to_owned(),
        reason: e.to_string(),
    })
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, id: Option<(SessionId, u64)>) -> Self {
        let (id, created_secs) = match id {
            Some((id, created)) => (Some(id), created),
            None => (None, 0),
        };
        Session {
            inner: Arc::new(Inner {
                shared,
                snapshot: tokio::sync::OnceCell::new(),
                state: Mutex::new(State {
                    exists: if id.is_none() { Some(false) } else { None },
                    id,
                    created_secs,
                    pending: BTreeMap::new(),
                    written: BTreeMap::new(),
                    cookie: CookieAction::Keep,
                    ended: false,
                }),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update of `State` is a handful of map operations that leave
        // it consistent even if interrupted by a panic.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn config(&self) -> &SessionConfig {
        &self.inner.shared.config
    }

    /// Reads the session once per request.
    async fn load(&self) -> Result<&Snapshot, SessionError> {
        self.inner
            .snapshot
            .get_or_try_init(|| async {
                let id = self.state().id.clone();
                let Some(id) = id else {
                    return Ok(Snapshot {
                        fields: BTreeMap::new(),
                        expires_in: None,
                        read_state: ReadState::Fresh,
                    });
                };
                metrics::counter!("statehouse_session_loads_total").increment(1);
                let read = self.shared().store.map_read(&self.shared().key(&id)).await?;
                let read_state = read.state;
                let map = read.into_inner();
                let map = match map {
                    Some(map) if self.past_absolute_lifetime(&map) => {
                        // Past the absolute cap: gone for good.
                        if let Err(e) = self.shared().store.map_delete(&self.shared().key(&id)).await
                        {
                            tracing::warn!(error = %e, "deleting a session past its lifetime failed");
                        }
                        None
                    }
                    other => other,
                };
                let mut state = self.state();
                match (&map, read_state) {
                    (Some(map), _) => {
                        state.exists = Some(true);
                        if let Some(created) = created_of(map) {
                            state.created_secs = created;
                        }
                    }
                    // Known absent: expired, destroyed or never existed. A
                    // write from this request will start a new session with
                    // a new id; the old id is never brought back.
                    (None, ReadState::Fresh) => {
                        state.exists = Some(false);
                        state.id = None;
                        state.cookie = CookieAction::Clear;
                    }
                    // The store is unreachable and the policy answered
                    // anyway: we do not know. Writes go to the presented id
                    // with MustExist (and fail while the store is down);
                    // never to a new session that would orphan the user's.
                    (None, _) => state.exists = Some(true),
                }
                let expires_in = map.as_ref().and_then(|m| m.expires_in);
                let fields = map.map(|m| m.fields).unwrap_or_default();
                Ok(Snapshot {
                    fields,
                    expires_in,
                    read_state,
                })
            })
            .await
    }

    fn past_absolute_lifetime(&self, map: &FieldMap) -> bool {
        match created_of(map) {
            Some(created) => {
                now_secs().saturating_sub(created) >= self.config().absolute_ttl.as_secs()
            }
            None => false,
        }
    }

    /// The idle TTL, capped so the session never outlives its absolute
    /// lifetime. `None` when that lifetime is already over.
    fn capped_ttl(&self, created_secs: u64) -> Option<Duration> {
        let config = self.config();
        let end = created_secs.saturating_add(config.absolute_ttl.as_secs());
        let left = Duration::from_secs(end.saturating_sub(now_secs()));
        let ttl = config.idle_ttl.min(left);
        (ttl >= Duration::from_millis(1)).then_some(ttl)
    }

    /// How fresh the data this request read is: `Degraded` or `Stale` when
    /// the store was unreachable and the store's policy answered anyway.
    pub fn read_state(&self) -> Option<ReadState> {
        self.inner.snapshot.get().map(|s| s.read_state)
    }

    /// A field's value, including this request's own changes.
    pub async fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, SessionError> {
        check_field_name(field)?;
        if let Some(local) = self.local(field) {
            return local.map(|b| decode(field, &b)).transpose();
        }
        let snapshot = self.load().await?;
        if let Some(local) = self.local(field) {
            return local.map(|b| decode(field, &b)).transpose();
        }
        snapshot
            .fields
            .get(field)
            .map(|v| decode(field, &v.value))
            .transpose()
    }

    fn local(&self, field: &str) -> Option<Option<Bytes>> {
        let state = self.state();
        state
            .pending
            .get(field)
            .or_else(|| state.written.get(field))
            .cloned()
    }

    /// Sets a field; written after the handler, as a delta of this field only.
    pub fn insert<T: Serialize>(&self, field: &str, value: &T) -> Result<(), SessionError> {
        check_field_name(field)?;
        let bytes = self.encode(field, value)?;
        self.state().pending.insert(field.to_owned(), Some(bytes));
        Ok(())
    }

    /// Removes a field; applied after the handler.
    pub fn remove(&self, field: &str) -> Result<(), SessionError> {
        check_field_name(field)?;
        self.state().pending.insert(field.to_owned(), None);
        Ok(())
    }

    fn encode<T: Serialize>(&self, field: &str, value: &T) -> Result<Bytes, SessionError> {
        let bytes = serde_json::to_vec(value).map_err(|e| SessionError::Decode {
            field: field.to_owned(),
            reason: e.to_string(),
        })?;
        let limit = self.config().max_field_bytes;
        if bytes.len() > limit {
            return Err(SessionError::TooLarge {
                what: "session field",
                size: bytes.len(),
                limit,
            });
        }
        Ok(Bytes::from(bytes))
    }

    /// Adds `delta` to an integer field atomically in the store, now, and
    /// returns the new value. Concurrent increments from any instance are
    /// all counted.
    pub async fn increment(&self, field: &str, delta: i64) -> Result<i64, SessionError> {
        check_field_name(field)?;
        let outcome = self
            .on_existing(|id, created| async move {
                let ttl = self.capped_ttl(created).ok_or(SessionError::Ended)?;
                let patch = MapPatch::new()
                    .incr(field, delta)
                    .existence(Existence::MustExist)
                    .ttl(ttl);
                self.patch(&id, &patch).await
            })
            .await?;
        let value = outcome.counters.first().copied().ok_or_else(|| {
            SessionError::Store(StoreError::Invalid("increment returned no value".into()))
        })?;
        self.state()
            .written
            .insert(field.to_owned(), Some(Bytes::from(value.to_string())));
        Ok(value)
    }

    /// Read-modify-write of one field with compare-and-set: `f` sees the
    /// current value and returns the new one (`None` removes the field). If
    /// another request changed the field meanwhile, `f` runs again on the
    /// new value, up to `update_attempts` times. Writes now, not after the
    /// handler.
    pub async fn update<T, F>(&self, field: &str, mut f: F) -> Result<Option<T>, SessionError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Option<T>,
    {
        check_field_name(field)?;
        let mut assumed = self.state().exists.is_none();
        let (mut id, mut created) = self.ensure_exists().await?;
        let mut key = self.shared().key(&id);
        let attempts = self.config().update_attempts.max(1);
        for _ in 0..attempts {
            let read = self.shared().store.map_read(&key).await?;
            if read.state != ReadState::Fresh {
                // Compare-and-set on a degraded or stale read would be a lie.
                return Err(SessionError::Unavailable(StoreError::Unavailable {
                    store: self.shared().store.describe().to_owned(),
                    kind: statehouse_store::UnavailableKind::Connection,
                    detail: "update needs a fresh read".into(),
                }));
            }
            let Some(map) = read.into_inner() else {
                if assumed {
                    // The presented id was never seen alive by this request:
                    // start a new session rather than fail.
                    assumed = false;
                    self.load().await?;
                    (id, created) = self.ensure_exists().await?;
                    key = self.shared().key(&id);
                    continue;
                }
                return Err(SessionError::Ended);
            };
            let current = map.fields.get(field);
            let condition = match current {
                Some(v) => FieldCondition::Version(v.version),
                None => FieldCondition::Absent,
            };
            let old = current.map(|v| decode(field, &v.value)).transpose()?;
            let new = f(old);
            let ttl = self.capped_ttl(created).ok_or(SessionError::Ended)?;
            let mut patch = MapPatch::new()
                .require(field, condition)
                .existence(Existence::MustExist)
                .ttl(ttl);
            let bytes = match &new {
                Some(value) => {
                    let bytes = self.encode(field, value)?;
                    patch = patch.set(field, bytes.clone());
                    Some(bytes)
                }
                None => {
                    patch = patch.remove(field);
                    None
                }
            };
            match self.shared().store.map_patch(&key, &patch).await {
                Ok(_) => {
                    self.state().written.insert(field.to_owned(), bytes);
                    return Ok(new);
                }
                Err(StoreError::Conflict(Conflict::VersionMismatch { .. })) => continue,
                Err(StoreError::Conflict(Conflict::NotFound)) => return Err(SessionError::Ended),
                Err(e) => return Err(e.into()),
            }
        }
        Err(SessionError::Contention {
            field: field.to_owned(),
            attempts,
        })
    }

    /// Gives the session a new id (call it at login: session fixation
    /// defence). The fields move to the new id, the old id is deleted, and
    /// the response carries the new cookie. The absolute lifetime restarts.
    pub async fn rotate_id(&self) -> Result<(), SessionError> {
        let snapshot = self.load().await?;
        if snapshot.read_state != ReadState::Fresh {
            return Err(SessionError::Unavailable(StoreError::Unavailable {
                store: self.shared().store.describe().to_owned(),
                kind: statehouse_store::UnavailableKind::Connection,
                detail: "rotation needs a fresh read".into(),
            }));
        }
        let (old, merged) = {
            let state = self.state();
            let mut merged: BTreeMap<String, Bytes> = app_fields(&snapshot.fields)
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect();
            for (field, change) in state.written.iter().chain(state.pending.iter()) {
                match change {
                    Some(v) => merged.insert(field.clone(), v.clone()),
                    None => merged.remove(field),
                };
            }
            (state.id.clone(), merged)
        };
        // The new session (fresh id, new cookie, new absolute lifetime)
        // first, so there is never a moment without one.
        self.create(merged.clone()).await?;
        if let Some(old) = &old {
            // If this fails the old id would stay valid: report it.
            self.shared()
                .store
                .map_delete(&self.shared().key(old))
                .await?;
        }
        metrics::counter!("statehouse_session_rotations_total").increment(1);
        let mut state = self.state();
        let mut written: BTreeMap<String, Option<Bytes>> = app_fields(&snapshot.fields)
            .map(|(k, _)| (k.clone(), None))
            .collect();
        written.extend(merged.into_iter().map(|(k, v)| (k, Some(v))));
        state.written = written;
        state.pending.clear();
        Ok(())
    }

    /// Ends the session now (logout): deletes it from the store and expires
    /// the cookie. No request still running with the old id, nor any that
    /// arrives later, can write into it or bring it back.
    pub async fn destroy(&self) -> Result<(), SessionError> {
        let id = self.state().id.clone();
        if let Some(id) = id {
            self.shared()
                .store
                .map_delete(&self.shared().key(&id))
                .await?;
            metrics::counter!("statehouse_session_destroyed_total").increment(1);
        }
        let mut state = self.state();
        state.id = None;
        state.exists = Some(false);
        state.pending.clear();
        state.written.clear();
        state.cookie = CookieAction::Clear;
        state.ended = true;
        Ok(())
    }

    /// Makes sure a live session exists in the store (creating one with a
    /// fresh id if needed) and returns its id and creation time.
    async fn ensure_exists(&self) -> Result<(SessionId, u64), SessionError> {
        {
            // A presented, verified id that this request has not read yet:
            // assume it exists and let the write's `MustExist` check it,
            // rather than reading the whole session first.
            let state = self.state();
            if let (Some(id), None, false) = (&state.id, state.exists, state.ended) {
                return Ok((id.clone(), state.created_secs));
            }
        }
        self.load().await?;
        {
            let state = self.state();
            if state.ended {
                return Err(SessionError::Ended);
            }
            if let (Some(id), Some(true)) = (&state.id, state.exists) {
                return Ok((id.clone(), state.created_secs));
            }
        }
        self.create(BTreeMap::new()).await
    }

    /// Runs a write that needs an existing session. If the presented id was
    /// only assumed to exist and the store says it does not (it expired or
    /// was destroyed before this request read it), the session is read, and
    /// a new one with a fresh id is created for the write; a session this
    /// request *saw* and that ended meanwhile stays ended.
    async fn on_existing<T, F, Fut>(&self, write: F) -> Result<T, SessionError>
    where
        F: Fn(SessionId, u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, SessionError>>,
    {
        let assumed = self.state().exists.is_none();
        let (id, created) = self.ensure_exists().await?;
        match write(id, created).await {
            Err(SessionError::Ended) if assumed => {
                // Read it for real this time; absent means a new session.
                self.load().await?;
                let (id, created) = self.ensure_exists().await?;
                write(id, created).await
            }
            other => other,
        }
    }

    /// Creates a new session with a fresh id holding `fields`.
    async fn create(
        &self,
        fields: BTreeMap<String, Bytes>,
    ) -> Result<(SessionId, u64), SessionError> {
        let id = SessionId::random();
        let created = now_secs();
        let ttl = self.capped_ttl(created).ok_or(SessionError::Ended)?;
        let mut patch = MapPatch::new()
            .set(CREATED, created.to_string())
            .existence(Existence::MustNotExist)
            .ttl(ttl)
            .max_bytes(self.config().max_session_bytes);
        for (field, value) in fields {
            patch = patch.set(field, value);
        }
        self.patch(&id, &patch).await?;
        metrics::counter!("statehouse_session_created_total").increment(1);
        let mut state = self.state();
        state.cookie = CookieAction::Set(self.config().keys.sign(
            &self.config().cookie.name,
            &id,
            created,
        ));
        state.id = Some(id.clone());
        state.created_secs = created;
        state.exists = Some(true);
        Ok((id, created))
    }

    async fn patch(
        &self,
        id: &SessionId,
        patch: &MapPatch,
    ) -> Result<statehouse_store::PatchOutcome, SessionError> {
        metrics::counter!("statehouse_session_writes_total").increment(1);
        match self
            .shared()
            .store
            .map_patch(&self.shared().key(id), patch)
            .await
        {
            Ok(outcome) => Ok(outcome),
            Err(StoreError::Conflict(Conflict::NotFound)) => Err(SessionError::Ended),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies the pending deltas and the sliding refresh after the handler
    /// ran; returns what to do with the cookie.
    pub(crate) async fn finish(&self) -> Result<CookieAction, SessionError> {
        let (pending, ended) = {
            let mut state = self.state();
            (std::mem::take(&mut state.pending), state.ended)
        };
        if ended {
            return Ok(CookieAction::Clear);
        }
        if pending.is_empty() {
            self.maybe_touch().await;
            return Ok(self.state().cookie.clone());
        }

        let (id, exists, created) = {
            let state = self.state();
            (state.id.clone(), state.exists, state.created_secs)
        };
        match id {
            // A session known to exist, or presented by a verified cookie and
            // not read by this request: write the deltas straight away, in
            // one round trip; the store checks existence and the size limit
            // atomically with the write.
            Some(id) if exists != Some(false) => {
                let patch = self.delta_patch(&pending, created)?;
                match self.patch(&id, &patch).await {
                    Ok(_) => {}
                    // Never seen alive by this request: it expired or was
                    // destroyed before. Start a new session (new id) with
                    // these changes rather than fail; a session this request
                    // *did* see alive stays ended (409).
                    Err(SessionError::Ended) if exists.is_none() => {
                        self.load().await?;
                        self.create(sets_only(pending)).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {
                self.create(sets_only(pending)).await?;
            }
        }
        Ok(self.state().cookie.clone())
    }

    fn delta_patch(
        &self,
        pending: &BTreeMap<String, Option<Bytes>>,
        created: u64,
    ) -> Result<MapPatch, SessionError> {
        let ttl = self.capped_ttl(created).ok_or(SessionError::Ended)?;
        let mut patch = MapPatch::new()
            .existence(Existence::MustExist)
            .ttl(ttl)
            .max_bytes(self.config().max_session_bytes);
        for (field, change) in pending {
            patch = match change {
                Some(value) => patch.set(field.clone(), value.clone()),
                None => patch.remove(field.clone()),
            };
        }
        Ok(patch)
    }

    /// Pushes back the idle expiry if more than `touch_fraction` of it has
    /// passed since the last refresh. Only for sessions this request read.
    async fn maybe_touch(&self) {
        let Some(snapshot) = self.inner.snapshot.get() else {
            return;
        };
        let (Some(expires_in), ReadState::Fresh) = (snapshot.expires_in, snapshot.read_state)
        else {
            return;
        };
        let (id, created) = {
            let state = self.state();
            (state.id.clone(), state.created_secs)
        };
        let (Some(id), Some(ttl)) = (id, self.capped_ttl(created)) else {
            return;
        };
        let idle = self.config().idle_ttl;
        let since_refresh = idle.saturating_sub(expires_in);
        if since_refresh.as_secs_f64() < idle.as_secs_f64() * self.config().touch_fraction {
            return;
        }
        metrics::counter!("statehouse_session_touches_total").increment(1);
        if let Err(e) = self
            .shared()
            .store
            .map_touch(&self.shared().key(&id), ttl)
            .await
        {
            // A missed refresh only shortens the session; the response the
            // handler built stands.
            tracing::warn!(error = %e, "session touch failed");
        }
    }
}

/// A stored map's fields without the layer's own.
fn app_fields(fields: &BTreeMap<String, Versioned>) -> impl Iterator<Item = (&String, &Versioned)> {
    fields
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
}

fn created_of(map: &FieldMap) -> Option<u64> {
    map.get(CREATED)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
}

fn sets_only(pending: BTreeMap<String, Option<Bytes>>) -> BTreeMap<String, Bytes> {
    pending
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}
