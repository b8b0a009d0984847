//! The WebSocket hub: an axum route that relays a [`Broker`]'s channels to
//! browsers and services, on every instance of an app.
//!
//! The hub holds connections, never messages: every message lives in the
//! broker's log, so a client whose instance dies reconnects to any other and
//! resumes from the last offset it saw ([`crate::protocol`]).
//!
//! Inside one instance, each channel with local subscribers has one *pump*: a
//! task that reads the broker from the channel's tail, encodes each message
//! once, and offers it to every local subscriber's bounded queue. Each
//! connection keeps, per channel, the last offset it sent; it drops what it
//! already sent and fills any hole from the broker before sending what comes
//! after it, so a subscription that joins while the pump runs, a resume, and
//! a pump that restarted all come out gap-free and duplicate-free.
//!
//! Fan-out costs a write per connection, whatever the message size; so a
//! pump offers no two batches closer than [`HubConfig::batch_interval`]: at
//! high rates each connection gets several messages per write, at low rates
//! nothing waits.
//!
//! A connection whose queue is full is cut (close 4408) with a resume hint
//! rather than allowed to hold memory; it reconnects and resumes with nothing
//! lost. On [`Hub::drain`] every client is told to reconnect elsewhere (close
//! 1012).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use statehouse_store::{MapPatch, Store};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

use crate::broker::unix_millis;
use crate::protocol::{ClientFrame, ServerFrame, close, decode_client_frame, encode_message};
use crate::{Broker, BrokerError, Offset};

/// Who is connected, as the app's [`Authenticate`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user or service (a token's `sub`); presence lists these.
    pub subject: String,
    /// When the credential stops being valid (seconds since the Unix epoch):
    /// the hub closes the connection (4401) at the first ping after it and
    /// the client reconnects with a fresh one.
    pub expires_at: Option<u64>,
}

/// Why a connection was refused; the text is sent in the close reason, so it
/// names the category, not the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// The app's say on who may connect and what they may subscribe to.
#[async_trait]
pub trait Authenticate: Send + Sync + fmt::Debug + 'static {
    /// Checks the upgrade request's headers (a cookie, `Authorization`) and
    /// the token the client's `hello` carried, if any.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        token: Option<&str>,
    ) -> Result<Identity, AuthError>;

    /// Whether `who` may subscribe to `channel` (already a valid name).
    fn may_subscribe(&self, who: &Identity, channel: &str) -> bool;
}

type ChannelRule = dyn Fn(&Identity, &str) -> bool + Send + Sync;

/// [`Authenticate`] with statehouse-token: a JWT in the `hello` frame or in
/// `Authorization: Bearer`, checked by a [`statehouse_token::TokenVerifier`]
/// (signature, `iss`, `aud`, `exp`, revocation); the channel rule is the
/// app's (default: every channel).
pub struct TokenAuth {
    verifier: statehouse_token::TokenVerifier,
    rule: Arc<ChannelRule>,
}

impl fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenAuth").finish_non_exhaustive()
    }
}

impl TokenAuth {
    pub fn new(verifier: statehouse_token::TokenVerifier) -> Self {
        TokenAuth {
            verifier,
            rule: Arc::new(|_, _| true),
        }
    }

    /// Only channels `rule` allows, e.g. `|who, ch| ch == format!("user.{}", who.subject)`.
    pub fn channels(
        mut self,
        rule: impl Fn(&Identity, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.rule = Arc::new(rule);
        self
    }
}

#[async_trait]
impl Authenticate for TokenAuth {
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        token: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = token.or(bearer) else {
            return Err(AuthError(
                "no token: send it in hello or in Authorization: Bearer".into(),
            ));
        };
        let claims = self
            .verifier
            .verify(token)
            .await
            .map_err(|e| AuthError(format!("token refused: {}", e.public_description())))?;
        Ok(Identity {
            subject: claims.sub,
            expires_at: Some(claims.exp),
        })
    }

    fn may_subscribe(&self, who: &Identity, channel: &str) -> bool {
        (self.rule)(who, channel)
    }
}

/// The hub's limits and timings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This instance's name, in `welcome` frames and presence entries.
    pub instance: String,
    /// Messages queued per connection before it counts as a slow consumer
    /// and is cut with a resume hint. Default 1024.
    pub queue: usize,
    /// Subscriptions per connection. Default 256.
    pub max_subscriptions: usize,
    /// The largest frame a client may send. Default 16 KiB.
    pub max_frame_bytes: usize,
    /// A ping is sent this often; a client silent for two intervals is
    /// dropped. Default 20 s.
    pub ping_interval: Duration,
    /// The `hello` frame must arrive within this. Default 10 s.
    pub hello_timeout: Duration,
    /// Messages per broker read. Default 256.
    pub read_batch: usize,
    /// Presence entries live this long without a heartbeat (sent every third
    /// of it). Default 15 s.
    pub presence_ttl: Duration,
    /// The least time between two batches a channel's pump offers: at high
    /// rates the messages that arrive meanwhile go out together, one write
    /// per connection instead of one per message (the cost of fan-out is
    /// per write, not per byte); at rates below one message per interval it
    /// adds nothing. Default 3 ms (fanout-bench: at 10 ms, p99 at 100-400
    /// msg/s was two to three times higher for no gain in the highest
    /// sustained rate); zero turns batching off.
    pub batch_interval: Duration,
    /// A connection whose socket accepts nothing for this long is dropped
    /// (a peer that vanished without a FIN, or stopped reading). Default 10 s.
    pub write_timeout: Duration,
    /// The WebSocket read buffer per connection (tungstenite's default is
    /// 128 KiB, which idle connections would hold); client frames are
    /// small, and a larger one grows it. Default 128 bytes.
    pub read_buffer_bytes: usize,
}

impl HubConfig {
    pub fn new(instance: impl Into<String>) -> Self {
        HubConfig {
            instance: instance.into(),
            queue: 1024,
            max_subscriptions: 256,
            max_frame_bytes: 16 * 1024,
            ping_interval: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
            read_batch: 256,
            presence_ttl: Duration::from_secs(15),
            batch_interval: Duration::from_millis(3),
            write_timeout: Duration::from_secs(10),
            read_buffer_bytes: 128,
        }
    }
}

/// Counters for dashboards and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub connections: u64,
    pub channels: u64,
    pub delivered: u64,
    pub slow_consumers_cut: u64,
}

/// The hub. Cheap to clone; mount it with [`Hub::router`].
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<dyn Broker>,
    auth: Arc<dyn Authenticate>,
    config: HubConfig,
    presence: Option<Store>,
    channels: Mutex<HashMap<Arc<str>, ChannelEntry>>,
    draining: AtomicBool,
    /// Wakes every connection at once: at each ping tick (a hub-wide timer
    /// instead of one per connection) and on drain.
    signal: Notify,
    next_conn: AtomicU64,
    connections: AtomicU64,
    delivered: Arc<AtomicU64>,
    slow_cut: Arc<AtomicU64>,
    /// The ping ticker and the presence heartbeat, stopped with the hub.
    tasks: Mutex<Vec<AbortHandle>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("broker", &self.broker.describe())
            .field("instance", &self.config.instance)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// One message, encoded once, shared by every local subscriber's queue.
#[derive(Debug)]
struct Delivery {
    channel: Arc<str>,
    offset: Offset,
    epoch: Arc<str>,
    text: Utf8Bytes,
}

/// A connection's handle in a channel's subscriber list.
struct Subscriber {
    conn: u64,
    subject: Arc<str>,
    inbox: Arc<Inbox>,
}

/// A connection's bounded queue of deliveries. A plain deque behind a lock
/// rather than a channel: it allocates nothing until the first message and
/// little after, which an idle connection's memory depends on.
struct Inbox {
    queue: Mutex<VecDeque<Arc<Delivery>>>,
    capacity: usize,
    /// Woken on every delivery, and when the connection is cut.
    notify: Notify,
    /// Set when the queue overflowed (a slow consumer, cut with a resume
    /// hint) or the connection is gone; pumps drop such subscribers.
    cut: AtomicBool,
}

impl Inbox {
    fn new(capacity: usize) -> Self {
        Inbox {
            queue: Mutex::default(),
            capacity,
            notify: Notify::new(),
            cut: AtomicBool::new(false),
        }
    }

    /// Queues `delivery`; false when the queue is full.
    fn offer(&self, delivery: &Arc<Delivery>) -> bool {
        let mut queue = lock(&self.queue);
        if queue.len() >= self.capacity {
            return false;
        }
        queue.push_back(delivery.clone());
        drop(queue);
        self.notify.notify_one();
        true
    }

    fn pop(&self) -> Option<Arc<Delivery>> {
        let mut queue = lock(&self.queue);
        let next = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 64 {
            // A burst is over: give its memory back.
            *queue = VecDeque::new();
        }
        next
    }

    fn is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
    }
}

struct ChannelEntry {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    pump: AbortHandle,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn presence_key(channel: &str) -> String {
    format!("fanout:presence:{channel}")
}

impl Hub {
    /// A hub relaying `broker`, admitting whom `auth` admits. With
    /// `presence`, subscribers are listed per channel in that store, kept
    /// alive by heartbeats from this instance (they disappear within
    /// [`HubConfig::presence_ttl`] of its death).
    pub fn new(
        broker: Arc<dyn Broker>,
        auth: Arc<dyn Authenticate>,
        config: HubConfig,
        presence: Option<Store>,
    ) -> Hub {
        let hub = Hub {
            inner: Arc::new(Inner {
                broker,
                auth,
                config,
                presence,
                channels: Mutex::default(),
                draining: AtomicBool::new(false),
                signal: Notify::new(),
                next_conn: AtomicU64::new(1),
                connections: AtomicU64::new(0),
                delivered: Arc::default(),
                slow_cut: Arc::default(),
                tasks: Mutex::default(),
            }),
        };
        // Ping ticks: one timer for the hub rather than one per connection
        // (memory per idle connection is a goal of the hub).
        hub.every(hub.inner.config.ping_interval, |hub| async move {
            hub.inner.signal.notify_waiters();
        });
        if hub.inner.presence.is_some() {
            hub.every(hub.inner.config.presence_ttl / 3, |hub| async move {
                hub.heartbeat().await;
            });
        }
        hub
    }

    /// Runs `work` every `period` (the first time after one period) for
    /// as long as the hub lives.
    fn every<F, Fut>(&self, period: Duration, work: F)
    where
        F: Fn(Hub) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                work(Hub { inner }).await;
            }
        });
        lock(&self.inner.tasks).push(task.abort_handle());
    }

    /// The hub as a route at `path` (a `GET` that upgrades to WebSocket).
    pub fn router<S: Clone + Send + Sync + 'static>(&self, path: &str) -> Router<S> {
        Router::new()
            .route(path, get(upgrade))
            .with_state(self.clone())
    }

    /// The broker this hub relays.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// Tells every client to reconnect elsewhere and refuses new ones (503):
    /// call it when the instance starts draining.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.signal.notify_waiters();
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            connections: self.inner.connections.load(Ordering::Relaxed),
            channels: lock(&self.inner.channels).len() as u64,
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            slow_consumers_cut: self.inner.slow_cut.load(Ordering::Relaxed),
        }
    }

    /// The subjects subscribed to `channel` on every instance (needs a
    /// presence store; empty without one).
    pub async fn presence(
        &self,
        channel: &str,
    ) -> Result<Vec<String>, statehouse_store::StoreError> {
        let Some(store) = &self.inner.presence else {
            return Ok(Vec::new());
        };
        let key = presence_key(channel);
        let Some(map) = store.map_read(&key).await?.value else {
            return Ok(Vec::new());
        };
        let now = unix_millis();
        let mut members = Vec::new();
        let mut expired = MapPatch::new();
        let mut any_expired = false;
        for (field, value) in &map.fields {
            let until = std::str::from_utf8(&value.value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if until > now {
                if let Some((subject, _)) = field.split_once('\u{1f}') {
                    members.push(subject.to_owned());
                }
            } else {
                expired = expired.remove(field.clone());
                any_expired = true;
            }
        }
        if any_expired {
            // Best effort: a dead instance's entries are already ignored.
            let _ = store.map_patch(&key, &expired).await;
        }
        members.sort();
        members.dedup();
        Ok(members)
    }

    /// Refreshes this instance's presence entries: one patch per channel.
    async fn heartbeat(&self) {
        let Some(store) = &self.inner.presence else {
            return;
        };
        let snapshot: Vec<(Arc<str>, Vec<String>)> = lock(&self.inner.channels)
            .iter()
            .map(|(name, entry)| {
                let fields = lock(&entry.subscribers)
                    .iter()
                    .map(|s| self.presence_field(&s.subject, s.conn))
                    .collect();
                (name.clone(), fields)
            })
            .collect();
        for (channel, fields) in snapshot {
            if fields.is_empty() {
                continue;
            }
            if let Err(e) = self.mark_present(store, &channel, fields).await {
                tracing::warn!(%channel, error = %e, "presence heartbeat failed");
            }
        }
    }

    fn presence_field(&self, subject: &str, conn: u64) -> String {
        format!("{subject}\u{1f}{}\u{1f}{conn}", self.inner.config.instance)
    }

    async fn mark_present(
        &self,
        store: &Store,
        channel: &str,
        fields: Vec<String>,
    ) -> Result<(), statehouse_store::StoreError> {
        let ttl = self.inner.config.presence_ttl;
        let until = (unix_millis() + ttl.as_millis() as u64).to_string();
        let mut patch = MapPatch::new().ttl(ttl);
        for field in fields {
            patch = patch.set(field, until.clone());
        }
        store
            .map_patch(&presence_key(channel), &patch)
            .await
            .map(|_| ())
    }

    fn forget_presence(&self, channel: Arc<str>, subject: Arc<str>, conn: u64) {
        let Some(store) = self.inner.presence.clone() else {
            return;
        };
        let field = self.presence_field(&subject, conn);
        tokio::spawn(async move {
            let _ = store
                .map_patch(&presence_key(&channel), &MapPatch::new().remove(field))
                .await;
        });
    }

    /// Adds a subscriber to `channel`, starting its pump at `tail` if this
    /// is the channel's first local subscriber.
    fn register(&self, channel: &Arc<str>, subscriber: Subscriber, tail: (Offset, String)) {
        let mut channels = lock(&self.inner.channels);
        let entry = channels.entry(channel.clone()).or_insert_with(|| {
            let subscribers = Arc::new(Mutex::new(Vec::new()));
            let pump = tokio::spawn(pump(
                self.inner.broker.clone(),
                channel.clone(),
                subscribers.clone(),
                tail,
                self.inner.config.read_batch,
                self.inner.config.batch_interval,
                self.inner.slow_cut.clone(),
            ));
            ChannelEntry {
                subscribers,
                pump: pump.abort_handle(),
            }
        });
        lock(&entry.subscribers).push(subscriber);
    }

    fn unregister(&self, channel: &str, conn: u64) {
        let mut channels = lock(&self.inner.channels);
        let Some(entry) = channels.get(channel) else {
            return;
        };
        let empty = {
            let mut subscribers = lock(&entry.subscribers);
            subscribers.retain(|s| s.conn != conn);
            subscribers.is_empty()
        };
        if empty && let Some(entry) = channels.remove(channel) {
            entry.pump.abort();
        }
    }
}

/// The channel's pump: reads the broker from the tail onwards and offers
/// every message to every local subscriber. It never gives up: a broker
/// error is retried with backoff from the same offset, so an outage delays
/// messages and loses none.
async fn pump(
    broker: Arc<dyn Broker>,
    channel: Arc<str>,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    (mut last, epoch): (Offset, String),
    batch: usize,
    batch_interval: Duration,
    slow_cut: Arc<AtomicU64>,
) {
    let mut epoch: Arc<str> = epoch.into();
    let mut backoff = Duration::from_millis(50);
    let mut offered = tokio::time::Instant::now() - batch_interval;
    loop {
        // Batching: no two offers closer than `batch_interval`.
        tokio::time::sleep_until(offered + batch_interval).await;
        let asked = (!epoch.is_empty()).then_some(&*epoch);
        match broker.read(&channel, last, asked, batch).await {
            Ok(read) if read.messages.is_empty() => {
                backoff = Duration::from_millis(50);
                if epoch.is_empty() && !read.epoch.is_empty() {
                    epoch = read.epoch.into();
                }
                if let Err(e) = broker.wait(&channel, last, Duration::from_secs(30)).await {
                    tracing::warn!(%channel, error = %e, "fan-out wait failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
            }
            Ok(read) => {
                backoff = Duration::from_millis(50);
                offered = tokio::time::Instant::now();
                for message in &read.messages {
                    if *epoch != *message.epoch {
                        epoch = message.epoch.as_str().into();
                    }
                    let delivery = Arc::new(Delivery {
                        channel: channel.clone(),
                        offset: message.offset,
                        epoch: epoch.clone(),
                        text: encode_message(message).into(),
                    });
                    offer(&subscribers, &delivery, &slow_cut);
                    last = message.offset;
                }
            }
            Err(BrokerError::Gap {
                epoch: now, oldest, ..
            }) => {
                // The log was recreated or trimmed past us: go on from what
                // it keeps; each connection sees the jump and tells its client.
                epoch = now.into();
                last = oldest.saturating_sub(1);
            }
            Err(e) => {
                tracing::warn!(%channel, error = %e, "fan-out read failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Puts `delivery` on every subscriber's queue; a full queue marks its
/// connection as a slow consumer, to be cut with a resume hint.
fn offer(subscribers: &Mutex<Vec<Subscriber>>, delivery: &Arc<Delivery>, slow_cut: &AtomicU64) {
    lock(subscribers).retain(|s| {
        if s.inbox.cut.load(Ordering::Relaxed) {
            return false;
        }
        if s.inbox.offer(delivery) {
            return true;
        }
        if !s.inbox.cut.swap(true, Ordering::Relaxed) {
            slow_cut.fetch_add(1, Ordering::Relaxed);
        }
        s.inbox.notify.notify_one();
        false
    });
}

/// The WebSocket handshake (RFC 6455 4.2), done here rather than by
/// axum's `WebSocketUpgrade` so that a connection's task holds one copy of
/// its state: axum's upgrade task keeps the socket, the callback and the
/// request headers alongside the callback's future, and an idle connection's
/// memory is a goal of the hub.
async fn upgrade(State(hub): State<Hub>, mut request: Request) -> Response {
    if hub.inner.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this instance is draining; connect to another",
        )
            .into_response();
    }
    let accept = match handshake(request.headers()) {
        Ok(accept) => accept,
        Err((status, why)) => {
            let mut refusal = (status, why).into_response();
            if status == StatusCode::UPGRADE_REQUIRED {
                refusal.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return refusal;
        }
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded to WebSocket (HTTP/1.1 only)",
        )
            .into_response();
    };
    // Copied, not kept: the request's header values are slices of the
    // connection's 8 KiB read buffer, which would stay allocated until the
    // hello (and, allocated between long-lived pieces of other connections,
    // leave holes in the heap after).
    let headers = Box::new(own_headers(request.headers()));
    // The connection's whole life, in one future that holds each piece of
    // state once (captured values stay in a future's state for its whole
    // life, so it captures only pointers; an `async fn` taking the
    // connection would hold it twice).
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let config = &hub.inner.config;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_bytes)
            .write_buffer_size(16 * 1024)
            .max_message_size(Some(config.max_frame_bytes))
            .max_frame_size(Some(config.max_frame_bytes));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config))
                .await;
        let mut connection = Connection::new(hub, socket);
        let end = connection.run(headers).await;
        Box::pin(connection.finish(end)).await;
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = response.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// A copy of `headers` that shares no buffer with the request.
fn own_headers(headers: &HeaderMap) -> HeaderMap {
    let mut own = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(mut copy) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            own.append(name.clone(), copy);
        }
    }
    own
}

/// Checks an opening handshake; the `Sec-WebSocket-Accept` value, or the
/// status and reason of the refusal.
fn handshake(headers: &HeaderMap) -> Result<HeaderValue, (StatusCode, &'static str)> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err((
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs `Connection: upgrade`",
        ));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err((
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs `Upgrade: websocket`",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        // RFC 6455 4.4: 426 naming the version spoken here.
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is spoken here",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs `Sec-WebSocket-Key`",
        ));
    };
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode Sec-WebSocket-Accept",
        )
    })
}

/// How a connection ends: a close frame to send, or nothing (the peer is
/// gone).
#[derive(Debug)]
enum End {
    Close(u16, String),
    Gone,
}

fn close_with(code: u16, reason: impl Into<String>) -> End {
    End::Close(code, reason.into())
}

/// Where one subscription of a connection is.
#[derive(Debug)]
struct Position {
    last: Offset,
    epoch: Arc<str>,
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

struct Connection {
    hub: Hub,
    conn: u64,
    socket: Socket,
    /// Where each subscription is; a few entries, searched in order.
    subs: Vec<(Arc<str>, Position)>,
    subject: Arc<str>,
    inbox: Arc<Inbox>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // However the task ends, pumps stop offering to it.
        self.inbox.cut.store(true, Ordering::Relaxed);
        self.hub.inner.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    fn new(hub: Hub, socket: Socket) -> Connection {
        let inner = &hub.inner;
        let conn = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        inner.connections.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::new(inner.config.queue));
        Connection {
            hub,
            conn,
            socket,
            subs: Vec::new(),
            subject: Arc::from(""),
            inbox,
        }
    }

    fn sub(&self, channel: &str) -> Option<&Position> {
        self.subs
            .iter()
            .find(|(name, _)| &**name == channel)
            .map(|(_, p)| p)
    }

    fn sub_mut(&mut self, channel: &str) -> Option<&mut Position> {
        self.subs
            .iter_mut()
            .find(|(name, _)| &**name == channel)
            .map(|(_, p)| p)
    }

    async fn run(&mut self, headers: Box<HeaderMap>) -> End {
        let inner = self.hub.inner.clone();
        let config = &inner.config;
        // Boxed, like every rarely taken branch below: an idle connection's
        // task then holds only the small waiting state (memory per idle
        // connection is a goal of the hub).
        let hello = Box::pin(self.hello(headers, config.hello_timeout)).await;
        let identity = match hello {
            Ok(identity) => identity,
            Err(end) => return end,
        };
        self.subject = identity.subject.as_str().into();
        let welcome = ServerFrame::Welcome {
            conn: format!("{}-{}", config.instance, self.conn),
            instance: config.instance.clone(),
        };
        if Box::pin(self.send(welcome.encode())).await.is_err() {
            return End::Gone;
        }

        let inbox = self.inbox.clone();
        let mut heard = tokio::time::Instant::now();
        // Registered before the drain flag is read, so a drain between the
        // two still wakes it.
        let mut signal = std::pin::pin!(inner.signal.notified());
        signal.as_mut().enable();
        let mut last_ping = tokio::time::Instant::now();
        if inner.draining.load(Ordering::SeqCst) {
            return Box::pin(self.move_on()).await;
        }

        loop {
            tokio::select! {
                biased;
                () = &mut signal => {
                    signal.set(inner.signal.notified());
                    signal.as_mut().enable();
                    if inner.draining.load(Ordering::SeqCst) {
                        return Box::pin(self.move_on()).await;
                    }
                    // A ping tick. Token expiry is checked here, at ping
                    // granularity: no timer of the connection's own.
                    if identity.expires_at.is_some_and(|at| unix_millis() / 1000 >= at) {
                        return close_with(close::UNAUTHORIZED, "token expired: reconnect with a fresh one");
                    }
                    if last_ping.elapsed() < config.ping_interval / 2 {
                        continue; // connected since the last tick
                    }
                    last_ping = tokio::time::Instant::now();
                    if heard.elapsed() > config.ping_interval * 2 {
                        return End::Gone;
                    }
                    if Box::pin(self.socket.send(WsMessage::Ping(Default::default()))).await.is_err() {
                        return End::Gone;
                    }
                }
                () = inbox.notify.notified() => {
                    if inbox.cut.load(Ordering::Relaxed) {
                        return close_with(
                            close::SLOW_CONSUMER,
                            "slow consumer: reconnect and resume from your last offsets",
                        );
                    }
                    let timeout = config.write_timeout;
                    let sent = Box::pin(async {
                        tokio::time::timeout(timeout, self.deliver_queued()).await
                    });
                    match sent.await {
                        Ok(Ok(())) => {}
                        Ok(Err(end)) => return end,
                        Err(_) => return End::Gone,
                    }
                }
                incoming = self.socket.next() => {
                    heard = tokio::time::Instant::now();
                    let frame = match incoming {
                        None => return End::Gone,
                        Some(Err(e)) => return read_error(&e),
                        Some(Ok(frame)) => frame,
                    };
                    let text = match frame {
                        WsMessage::Text(text) => text,
                        WsMessage::Binary(_) => {
                            return close_with(close::BAD_FRAME, "binary frames are not part of statehouse-fanout.v1");
                        }
                        WsMessage::Close(_) => return End::Gone,
                        WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
                    };
                    let frame = match decode_client_frame(&text) {
                        Ok(frame) => frame,
                        Err(e) => return close_with(close::BAD_FRAME, e.0),
                    };
                    if let Err(end) = Box::pin(self.handle(frame, &identity)).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Drain: tells the client to reconnect elsewhere.
    async fn move_on(&mut self) -> End {
        let bye = ServerFrame::Reconnect {
            reason: "draining".into(),
        };
        let _ = self.send(bye.encode()).await;
        close_with(
            close::RECONNECT,
            "instance draining: reconnect elsewhere and resume",
        )
    }

    /// The first frame must be `hello`; the app's authenticator decides.
    async fn hello(&mut self, headers: Box<HeaderMap>, timeout: Duration) -> Result<Identity, End> {
        let first = match tokio::time::timeout(timeout, self.socket.next()).await {
            Err(_) => return Err(close_with(close::UNAUTHORIZED, "no hello frame in time")),
            Ok(None) => return Err(End::Gone),
            Ok(Some(Err(e))) => return Err(read_error(&e)),
            Ok(Some(Ok(frame))) => frame,
        };
        let WsMessage::Text(text) = first else {
            return Err(close_with(
                close::BAD_FRAME,
                "the first frame must be a hello text frame",
            ));
        };
        let token = match decode_client_frame(&text) {
            Ok(ClientFrame::Hello { token }) => token,
            Ok(_) => {
                return Err(close_with(
                    close::BAD_FRAME,
                    "the first frame must be hello",
                ));
            }
            Err(e) => return Err(close_with(close::BAD_FRAME, e.0)),
        };
        self.hub
            .inner
            .auth
            .authenticate(&headers, token.as_deref())
            .await
            .map_err(|e| close_with(close::UNAUTHORIZED, e.0))
    }

    async fn handle(&mut self, frame: ClientFrame, identity: &Identity) -> Result<(), End> {
        match frame {
            ClientFrame::Hello { .. } => {
                Err(close_with(close::BAD_FRAME, "hello was already sent"))
            }
            ClientFrame::Ping => self.send(ServerFrame::Pong.encode()).await,
            ClientFrame::Presence { ch } => {
                let members = self.hub.presence(&ch).await.map_err(|e| {
                    close_with(
                        close::BROKER_UNAVAILABLE,
                        format!("presence unavailable: {e}"),
                    )
                })?;
                self.send(ServerFrame::Presence { ch, members }.encode())
                    .await
            }
            ClientFrame::Unsub { ch } => {
                if let Some(at) = self.subs.iter().position(|(name, _)| **name == *ch) {
                    let (name, _) = self.subs.swap_remove(at);
                    self.hub.unregister(&name, self.conn);
                    self.hub
                        .forget_presence(name, self.subject.clone(), self.conn);
                }
                Ok(())
            }
            ClientFrame::Sub { ch, after, epoch } => {
                if !self.hub.inner.auth.may_subscribe(identity, &ch) {
                    return Err(close_with(
                        close::FORBIDDEN,
                        format!("channel {ch:?} is not yours to subscribe to"),
                    ));
                }
                if self.sub(&ch).is_some() {
                    return Err(close_with(
                        close::BAD_FRAME,
                        format!("already subscribed to {ch:?}"),
                    ));
                }
                let limit = self.hub.inner.config.max_subscriptions;
                if self.subs.len() >= limit {
                    return Err(close_with(
                        close::TOO_MANY_SUBSCRIPTIONS,
                        format!("at most {limit} subscriptions per connection"),
                    ));
                }
                self.subscribe(ch.into(), after, epoch).await
            }
        }
    }

    async fn subscribe(
        &mut self,
        channel: Arc<str>,
        after: Option<Offset>,
        epoch: Option<String>,
    ) -> Result<(), End> {
        let hub = self.hub.clone();
        // The tail, read before joining: a new pump starts there, and
        // everything after it reaches this connection through the pump.
        let tail = hub
            .inner
            .broker
            .read(&channel, 0, None, 0)
            .await
            .map_err(broker_down)?;
        let position = match after {
            None => Position {
                last: tail.last,
                epoch: tail.epoch.as_str().into(),
            },
            Some(after) => Position {
                last: after,
                epoch: epoch.unwrap_or_default().into(),
            },
        };
        let subscribed = ServerFrame::Subscribed {
            ch: channel.to_string(),
            epoch: position.epoch.to_string(),
            last: position.last,
        };
        hub.register(
            &channel,
            Subscriber {
                conn: self.conn,
                subject: self.subject.clone(),
                inbox: self.inbox.clone(),
            },
            (tail.last, tail.epoch),
        );
        if self.subs.is_empty() {
            // Most connections hold one subscription: room for exactly one.
            self.subs.reserve_exact(1);
        }
        self.subs.push((channel.clone(), position));
        if let Some(store) = &hub.inner.presence {
            let field = hub.presence_field(&self.subject, self.conn);
            if let Err(e) = hub.mark_present(store, &channel, vec![field]).await {
                tracing::warn!(%channel, error = %e, "presence update failed");
            }
        }
        self.send(subscribed.encode()).await?;
        // Whatever came before the pump reached us: the resume gap, or what
        // the pump sent before we joined.
        self.catch_up(&channel, None).await?;
        self.flush().await
    }

    /// Sends what is queued (up to 64 at a time), then flushes.
    async fn deliver_queued(&mut self) -> Result<(), End> {
        for _ in 0..64 {
            match self.inbox.pop() {
                Some(next) => self.deliver(next).await?,
                None => break,
            }
        }
        if !self.inbox.is_empty() {
            // More than one round's worth: come back for the rest.
            self.inbox.notify.notify_one();
        }
        self.flush().await
    }

    /// Sends `delivery` unless it was sent already, after filling any hole
    /// before it from the broker.
    async fn deliver(&mut self, delivery: Arc<Delivery>) -> Result<(), End> {
        let Some(position) = self.sub_mut(&delivery.channel) else {
            return Ok(()); // unsubscribed since it was queued
        };
        if position.epoch.is_empty() && position.last == 0 {
            position.epoch = delivery.epoch.clone();
        }
        let same_epoch = position.epoch == delivery.epoch;
        if same_epoch && delivery.offset <= position.last {
            return Ok(());
        }
        if !same_epoch || delivery.offset > position.last + 1 {
            self.catch_up(&delivery.channel, Some(delivery.offset - 1))
                .await?;
        }
        let Some(position) = self.sub_mut(&delivery.channel) else {
            return Ok(());
        };
        if position.epoch == delivery.epoch && delivery.offset == position.last + 1 {
            position.last = delivery.offset;
            self.feed(delivery.text.clone()).await?;
            self.hub.inner.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `channel` from the broker after this connection's position,
    /// up to `upto` (or the end), and sends it; a position the broker
    /// cannot serve becomes a `gap` frame and the position jumps to the log's
    /// end.
    async fn catch_up(&mut self, channel: &Arc<str>, upto: Option<Offset>) -> Result<(), End> {
        let batch = self.hub.inner.config.read_batch;
        loop {
            let Some(position) = self.sub(channel) else {
                return Ok(());
            };
            if upto.is_some_and(|u| position.last >= u) {
                return Ok(());
            }
            let asked = (!position.epoch.is_empty()).then(|| position.epoch.to_string());
            let read = self
                .hub
                .inner
                .broker
                .read(channel, position.last, asked.as_deref(), batch)
                .await;
            match read {
                Ok(read) if read.messages.is_empty() => {
                    if let Some(position) = self.sub_mut(channel)
                        && position.epoch.is_empty()
                    {
                        position.epoch = read.epoch.into();
                    }
                    return Ok(());
                }
                Ok(read) => {
                    for message in &read.messages {
                        self.feed(encode_message(message).into()).await?;
                        self.hub.inner.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if let (Some(position), Some(newest)) =
                        (self.sub_mut(channel), read.messages.last())
                    {
                        position.last = newest.offset;
                        position.epoch = newest.epoch.as_str().into();
                    }
                }
                Err(BrokerError::Gap {
                    epoch,
                    oldest,
                    last,
                    ..
                }) => {
                    let gap = ServerFrame::Gap {
                        ch: channel.to_string(),
                        epoch: epoch.clone(),
                        oldest,
                        last,
                    };
                    if let Some(position) = self.sub_mut(channel) {
                        *position = Position {
                            last,
                            epoch: epoch.into(),
                        };
                    }
                    return self.feed(gap.encode().into()).await;
                }
                Err(e) => return Err(broker_down(e)),
            }
        }
    }

    async fn send(&mut self, text: String) -> Result<(), End> {
        self.socket
            .send(WsMessage::Text(text.into()))
            .await
            .map_err(|_| End::Gone)
    }

    async fn feed(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.socket
            .feed(WsMessage::Text(text))
            .await
            .map_err(|_| End::Gone)
    }

    async fn flush(&mut self) -> Result<(), End> {
        SinkExt::flush(&mut self.socket)
            .await
            .map_err(|_| End::Gone)
    }

    /// Leaves every channel and says goodbye with the close code, if the
    /// peer is still there to hear it.
    async fn finish(&mut self, end: End) {
        for (channel, _) in std::mem::take(&mut self.subs) {
            self.hub.unregister(&channel, self.conn);
            self.hub
                .forget_presence(channel, self.subject.clone(), self.conn);
        }
        if let End::Close(code, reason) = end {
            tracing::debug!(conn = self.conn, code, %reason, "closing fan-out connection");
            let reason = truncate_reason(&reason);
            let frame = CloseFrame {
                code: code.into(),
                reason: reason.into(),
            };
            // Then wait (briefly) for the peer's close: closing a socket
            // with unread input resets it, and the peer would lose the
            // close frame and its reason.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if self
                    .socket
                    .send(WsMessage::Close(Some(frame)))
                    .await
                    .is_ok()
                {
                    loop {
                        match self.socket.next().await {
                            Some(Ok(WsMessage::Close(_))) => break,
                            Some(Ok(_)) => {}
                            // Unreadable (the frame that ended it was too
                            // big): give the peer time to read our close
                            // before the reset that unread input causes.
                            None | Some(Err(_)) => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                break;
                            }
                        }
                    }
                }
            })
            .await;
        }
    }
}

fn broker_down(e: BrokerError) -> End {
    close_with(
        close::BROKER_UNAVAILABLE,
        format!("broker unavailable, reconnect and resume: {e}"),
    )
}

fn read_error(e: &tokio_tungstenite::tungstenite::Error) -> End {
    match e {
        tokio_tungstenite::tungstenite::Error::Capacity(_) => {
            close_with(close::TOO_BIG, "frame over the size limit")
        }
        _ => End::Gone,
    }
}

/// A close reason is at most 123 bytes (RFC 6455 5.5: 125 minus the code).
fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123);
        assert!(long.starts_with(cut));
        assert_eq!(truncate_reason("short"), "short");
    }
}
