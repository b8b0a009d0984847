//! Forwarding: one client request to one instance, with retries where they are provably safe.
//!
//! The request goes through, top to bottom:
//! 1. the framing guard's verdict (HTTP/1): refused heads are answered 400/431 here;
//! 2. [`normalize_request`]: framing checks, hop-by-hop headers, `X-Forwarded-*`, request id;
//!    then [`normalize::check_host`]: the `Host` rules, the target's authority as `Host`;
//! 3. the body source: empty or buffered (replayable; gathered within `timeouts.idle`, else
//!    408), or the stream lent to each attempt;
//! 4. attempts: pick an instance (usable and not yet tried; failing open to any non-draining
//!    one), send on a pooled keep-alive connection — in the request's own task when the body
//!    is in hand and no upgrade is asked for, through hyper otherwise (see `upstream`) — and
//!    wait for the response head within `timeouts.upstream_response`;
//! 5. on failure, the retry rule: a **connect failure** means the request never left, so it is
//!    retried on another instance whatever its method (if the body is still in hand); any other
//!    failure (reset, timeout) may have reached the instance and is retried only with
//!    `retry.idempotent`, an idempotent method and a buffered body. Every retry spends from the
//!    budget. A POST that may have reached an instance is never sent again.
//! 6. the response: hop-by-hop headers stripped, the sticky cookie (re)set, and for a `101` the
//!    two upgraded connections spliced together. From here until its body ends the request is
//!    marked responding: the connection's watchdog cuts it if no byte moves for
//!    `timeouts.response_stall`.

mod body;
pub mod framing;
pub mod h1;
pub mod normalize;
mod retry;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub(crate) use body::BodySource;
pub use body::ProxyBody;
use body::UpstreamBody;
use framing::{ConnShared, Verdict};
use normalize::{ForwardContext, X_REQUEST_ID, normalize_request, normalize_response};
use retry::RetryBudget;
use upstream::{Lent, RawResponse, UpstreamPool};

use crate::config::{HashKey, LbConfig, PolicyKind};
use crate::discovery::{Backend, BackendSet};
use crate::health::{Outcome, record_outcome};
use crate::metrics::{LbMetrics, inc};
use crate::selection::{PinOutcome, RequestKey};

/// The error type of bodies the proxy passes on.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An instance's response, from either kind of exchange.
enum Answer {
    Hyper(Response<Incoming>, Lent),
    Raw(RawResponse),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Self::Hyper(r, _) => r.status(),
            Self::Raw(r) => r.head.status,
        }
    }
}

/// Tells spawned tunnels when to stop, and lets shutdown wait for them (dropped senders).
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    pub(crate) cut: watch::Receiver<bool>,
    pub(crate) done: mpsc::Sender<()>,
}

/// Marks a request in flight on its client connection (the idle timeout waits for zero), and
/// once its response is under way, that response (the response stall timeout watches it).
#[derive(Debug)]
pub(crate) struct ConnRequest {
    shared: Arc<ConnShared>,
    responding: bool,
}

impl ConnRequest {
    fn new(shared: &Arc<ConnShared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: Arc::clone(shared),
            responding: false,
        }
    }

    /// The instance's response is on its way to the client: from now until this guard drops
    /// (at the end of the body, or when it is abandoned), its bytes must keep moving.
    fn responding(mut self) -> Self {
        if !self.responding {
            self.responding = true;
            self.shared.response_begun();
        }
        self
    }
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        if self.responding {
            self.shared.response_ended();
        }
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One client connection's facts, shared by its requests.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub(crate) client: SocketAddr,
    pub(crate) shared: Arc<ConnShared>,
    pub(crate) lifecycle: Lifecycle,
}

/// Why the last attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    NoInstance,
    Connect,
    Timeout,
    Upstream,
}

/// The forwarding half of the balancer: one per worker, sharing everything but the pool of
/// connections to the instances.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) set: Arc<BackendSet>,
    pub(crate) metrics: Arc<LbMetrics>,
    /// This worker's keep-alive pool. Not shared between workers: a pooled connection is
    /// driven by a task on the worker that opened it, so sharing would hand every request
    /// across threads.
    pool: Arc<UpstreamPool>,
    config: Arc<LbConfig>,
    budget: Arc<RetryBudget>,
}

impl Proxy {
    pub(crate) fn new(set: Arc<BackendSet>, config: Arc<LbConfig>) -> Self {
        let budget = RetryBudget::new(config.retry.budget_ratio, config.retry.budget_min_per_sec);
        Self {
            set,
            metrics: Arc::default(),
            pool: upstream_pool(&config),
            config,
            budget: Arc::new(budget),
        }
    }

    /// A proxy for another worker: the same instances, metrics and retry budget, its own pool.
    pub(crate) fn for_worker(&self) -> Self {
        Self {
            set: Arc::clone(&self.set),
            metrics: Arc::clone(&self.metrics),
            pool: upstream_pool(&self.config),
            config: Arc::clone(&self.config),
            budget: Arc::clone(&self.budget),
        }
    }

    /// Serves one client request from hyper. Never fails: every failure is an HTTP answer.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnCtx>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let conn_req = ConnRequest::new(&conn.shared);
        if req.version() <= Version::HTTP_11
            && let Some(Verdict::Reject(status, reason)) = conn.shared.next_verdict()
        {
            return Ok(self.reject(status, reason, req.version()));
        }
        let (mut parts, body) = req.into_parts();
        // The framing guard stops following an HTTP/1 connection at a request that may upgrade
        // it (any `Upgrade` header, or CONNECT in any case): the bytes after it may be a tunnel.
        // Answered with anything but a 101, the connection would go on with requests the guard
        // no longer judges, so it closes after that answer instead.
        let guard_let_go = parts.version <= Version::HTTP_11
            && (parts.headers.contains_key(header::UPGRADE)
                || parts.method.as_str().eq_ignore_ascii_case("CONNECT"));
        let norm = match self.prepare(&mut parts, &conn) {
            Ok(n) => n,
            Err(r) => return Ok(self.reject(r.status().as_u16(), r.reason(), parts.version)),
        };
        let client_upgrade = if norm.upgrade.is_some() {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        let retry_cfg = &self.config.retry;
        let source = if body.is_end_stream() {
            BodySource::Full(Bytes::new())
        } else if retry_cfg.idempotent
            && is_idempotent(&parts.method)
            && body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= retry_cfg.buffer_body_bytes)
        {
            // Buffered so that it can be sent again; it must all arrive within the idle
            // timeout (the watchdog's idle rule waits for requests in flight, as this one is).
            match tokio::time::timeout(self.config.timeouts.idle, body.collect()).await {
                Ok(Ok(c)) => BodySource::Full(c.to_bytes()),
                Ok(Err(_)) => {
                    return Ok(self.reject(400, "request body ended early", parts.version));
                }
                Err(_) => return Ok(self.reject(408, "request body too slow", parts.version)),
            }
        } else {
            BodySource::streamed(body)
        };
        let mut resp = self
            .forward(parts, norm, source, client_upgrade, conn_req, &conn)
            .await;
        if guard_let_go && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    /// Serves one plain HTTP/1.1 request read by the lb's own connection loop (`h1_server`):
    /// its body whole in hand, no upgrade.
    pub(crate) async fn handle_plain(
        &self,
        mut parts: http::request::Parts,
        body: Bytes,
        conn: &Arc<ConnCtx>,
    ) -> Response<ProxyBody> {
        let conn_req = ConnRequest::new(&conn.shared);
        match self.prepare(&mut parts, conn) {
            Ok(norm) => {
                let source = BodySource::Full(body);
                self.forward(parts, norm, source, None, conn_req, conn)
                    .await
            }
            Err(r) => self.reject(r.status().as_u16(), r.reason(), parts.version),
        }
    }

    /// Normalizes the head for forwarding, or says why it must not be.
    fn prepare(
        &self,
        parts: &mut http::request::Parts,
        conn: &ConnCtx,
    ) -> Result<normalize::Normalized, normalize::HeadRejection> {
        let ctx = ForwardContext {
            client_ip: conn.client.ip(),
            proto: "http",
            new_request_id: normalize::new_request_id(),
        };
        let norm = normalize_request(&parts.method, parts.version, &mut parts.headers, &ctx)?;
        // HTTP/2 carries the host in :authority, an absolute-form target in the target; the
        // instance, spoken to in HTTP/1.1 with an origin-form target, finds it in Host.
        normalize::check_host(parts.version, parts.uri.authority(), &mut parts.headers)?;
        Ok(norm)
    }

    /// Sends the request to an instance, with retries where they are safe, and shapes the
    /// answer (see the module docs).
    async fn forward(
        &self,
        parts: http::request::Parts,
        norm: normalize::Normalized,
        source: BodySource,
        client_upgrade: Option<OnUpgrade>,
        conn_req: ConnRequest,
        conn: &Arc<ConnCtx>,
    ) -> Response<ProxyBody> {
        let idempotent = is_idempotent(&parts.method);
        let retry_cfg = &self.config.retry;

        let key_storage = self.request_key(&parts.headers, parts.uri.path());
        let key = RequestKey {
            hash_key: key_storage.0.as_deref(),
            pin: key_storage.1.as_deref(),
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if !path_and_query.as_str().starts_with('/') {
            // Asterisk-form and the like: not forwardable as an origin-form target.
            return self.reject(400, "unforwardable request target", parts.version);
        }
        let target = Uri::from(path_and_query);

        self.budget.deposit();
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let mut failure = Failure::NoInstance;
        for attempt in 0..retry_cfg.max_attempts {
            let Some(attempt_body) = source.next() else {
                break;
            };
            let Some((backend, pin)) = self.pick(&key, &tried) else {
                break;
            };
            if pin == PinOutcome::Broken {
                self.count_broken_pin(key.pin);
            }
            let guard = backend.start_request();
            inc(&backend.metrics.requests);
            let host = if parts.headers.contains_key(header::HOST) {
                None
            } else {
                // An HTTP/1.0 request may come without one; the instance's address stands in.
                match HeaderValue::from_str(backend.addr()) {
                    Ok(host) => Some(host),
                    Err(_) => {
                        return self.reject(400, "unforwardable request target", parts.version);
                    }
                }
            };
            let started = Instant::now();
            let deadline = self.config.timeouts.upstream_response;
            let result = match (&attempt_body, &norm.upgrade) {
                (UpstreamBody::Full(body), None) => {
                    let body = body.as_deref().unwrap_or_default();
                    let mut request = BytesMut::new();
                    h1::write_request_head(
                        &mut request,
                        &parts.method,
                        target.path_and_query().map_or("/", PathAndQuery::as_str),
                        &parts.headers,
                        host.as_ref(),
                        body.len(),
                    );
                    request.extend_from_slice(body);
                    let exchange = self.pool.exchange(backend.addr(), &parts.method, &request);
                    tokio::time::timeout(deadline, exchange)
                        .await
                        .map(|r| r.map(Answer::Raw))
                }
                _ => {
                    let mut up = Request::new(attempt_body);
                    *up.method_mut() = parts.method.clone();
                    *up.version_mut() = Version::HTTP_11;
                    *up.headers_mut() = parts.headers.clone();
                    *up.uri_mut() = target.clone();
                    if let Some(host) = host {
                        up.headers_mut().insert(header::HOST, host);
                    }
                    tokio::time::timeout(deadline, self.pool.send(backend.addr(), up))
                        .await
                        .map(|r| r.map(|(resp, lent)| Answer::Hyper(resp, lent)))
                }
            };
            let (outcome, may_retry) = match result {
                Ok(Ok(answer)) => {
                    let rtt = started.elapsed();
                    backend.metrics.observe_latency(rtt);
                    if self.config.policy == PolicyKind::P2cEwma {
                        // Only P2C reads the estimate; the lock is not worth taking otherwise.
                        backend.observe_latency(rtt, self.config.p2c.decay);
                    }
                    let outcome = if answer.status().is_server_error() {
                        Outcome::ServerError
                    } else {
                        Outcome::Success
                    };
                    if outcome != Outcome::Success {
                        inc(&backend.metrics.errors);
                    }
                    record_outcome(&self.set, &backend, outcome, &self.config.passive);
                    let (mut rparts, body) = match answer {
                        Answer::Raw(raw) => {
                            let mut r = Response::new(());
                            *r.status_mut() = raw.head.status;
                            *r.headers_mut() = raw.head.headers;
                            let (rparts, ()) = r.into_parts();
                            let guards = (guard, conn_req.responding(), None);
                            (rparts, ProxyBody::raw(raw.body, guards))
                        }
                        Answer::Hyper(mut resp, lent) => {
                            let server_upgrade = resp.extensions_mut().remove::<OnUpgrade>();
                            let (rparts, rbody) = resp.into_parts();
                            if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
                                // The connection is the tunnel's now; it never goes back to
                                // the pool.
                                lent.discard();
                                match (client_upgrade, server_upgrade) {
                                    (Some(c), Some(s)) => {
                                        spawn_tunnel(c, s, guard, conn.lifecycle.clone());
                                    }
                                    // An instance answering 101 to a request that is not an
                                    // upgrade.
                                    _ => {
                                        return self.reject_status(
                                            StatusCode::BAD_GATEWAY,
                                            "unexpected 101",
                                        );
                                    }
                                }
                                (rparts, ProxyBody::full(Bytes::new()))
                            } else {
                                let guards = (guard, conn_req.responding(), Some(lent));
                                (rparts, ProxyBody::upstream(rbody, guards))
                            }
                        }
                    };
                    normalize_response(rparts.status, &mut rparts.headers);
                    rparts.version = parts.version;
                    rparts.headers.insert(X_REQUEST_ID, norm.request_id.clone());
                    if matches!(pin, PinOutcome::New | PinOutcome::Broken) {
                        self.set_pin_cookie(&mut rparts.headers, &backend);
                    }
                    return Response::from_parts(rparts, body);
                }
                Ok(Err(e)) if e.is_connect() => {
                    failure = Failure::Connect;
                    tracing::debug!(instance = backend.name(), error = %e, "connect failed");
                    // Never sent: safe to retry for any method, if the body is still in hand
                    // (checked by `source.next()` at the top of the loop).
                    (Outcome::ConnectFailure, true)
                }
                Ok(Err(e)) => {
                    failure = Failure::Upstream;
                    tracing::debug!(instance = backend.name(), error = %e, "upstream failed");
                    (
                        Outcome::OtherFailure,
                        retry_cfg.idempotent && idempotent && source.is_replayable(),
                    )
                }
                Err(_) => {
                    failure = Failure::Timeout;
                    (
                        Outcome::OtherFailure,
                        retry_cfg.idempotent && idempotent && source.is_replayable(),
                    )
                }
            };
            inc(&backend.metrics.errors);
            record_outcome(&self.set, &backend, outcome, &self.config.passive);
            tried.push(backend);
            if !may_retry || attempt + 1 >= retry_cfg.max_attempts {
                break;
            }
            if !self.budget.withdraw() {
                inc(&self.metrics.budget_exhausted);
                break;
            }
            if let Some(b) = tried.last() {
                inc(&b.metrics.retries);
            }
        }
        let (status, msg) = match failure {
            Failure::NoInstance => {
                inc(&self.metrics.no_instance);
                (StatusCode::SERVICE_UNAVAILABLE, "no instance available")
            }
            Failure::Connect => (StatusCode::BAD_GATEWAY, "could not connect to an instance"),
            Failure::Upstream => (StatusCode::BAD_GATEWAY, "the instance failed to answer"),
            Failure::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "the instance did not answer in time",
            ),
        };
        self.reject_status(status, msg)
    }

    /// Picks an instance not yet tried: a usable one if any, else (fail open) any that is not
    /// draining.
    fn pick(
        &self,
        key: &RequestKey<'_>,
        tried: &[Arc<Backend>],
    ) -> Option<(Arc<Backend>, PinOutcome)> {
        let snap = self.set.snapshot_ref();
        let untried = |b: &Backend| !tried.iter().any(|t| std::ptr::eq(Arc::as_ptr(t), b));
        let strict = |b: &Backend| b.is_usable() && untried(b);
        if let Some(p) = snap.selector.select(&snap.backends, key, &strict) {
            return Some((Arc::clone(&snap.backends[p.index]), p.pin));
        }
        let lenient = |b: &Backend| !b.is_draining() && untried(b);
        let p = snap.selector.select(&snap.backends, key, &lenient)?;
        inc(&self.metrics.fail_open);
        Some((Arc::clone(&snap.backends[p.index]), p.pin))
    }

    fn count_broken_pin(&self, pin: Option<&str>) {
        inc(&self.metrics.broken_pins);
        if let Some(b) = pin.and_then(|p| {
            self.set
                .backends()
                .iter()
                .find(|b| b.sticky_id() == p)
                .cloned()
        }) {
            inc(&b.metrics.broken_pins);
        }
    }

    fn set_pin_cookie(&self, headers: &mut HeaderMap, backend: &Backend) {
        let v = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Lax",
            self.config.sticky.cookie,
            backend.sticky_id()
        );
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.append(header::SET_COOKIE, v);
        }
    }

    /// The hash key and the sticky pin of a request, as owned bytes.
    fn request_key(&self, headers: &HeaderMap, path: &str) -> (Option<Vec<u8>>, Option<String>) {
        match self.config.policy {
            PolicyKind::Hash => {
                let k = match &self.config.hash.key {
                    Some(HashKey::Header(h)) => headers.get(h).map(|v| v.as_bytes().to_vec()),
                    Some(HashKey::Cookie(c)) => cookie(headers, c).map(|v| v.as_bytes().to_vec()),
                    Some(HashKey::Path) => Some(path.as_bytes().to_vec()),
                    None => None,
                };
                (k, None)
            }
            PolicyKind::Sticky => (
                None,
                cookie(headers, &self.config.sticky.cookie).map(str::to_owned),
            ),
            PolicyKind::RoundRobin | PolicyKind::P2cEwma => (None, None),
        }
    }

    fn reject(&self, status: u16, reason: &str, version: Version) -> Response<ProxyBody> {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        match status.as_u16() {
            431 => inc(&self.metrics.rejected_431),
            _ => inc(&self.metrics.rejected_400),
        }
        let mut r = self.reject_status(status, reason);
        if version <= Version::HTTP_11 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    fn reject_status(&self, status: StatusCode, reason: &str) -> Response<ProxyBody> {
        let mut r = Response::new(ProxyBody::full(format!("{reason}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }
}

/// Whether a request may be sent again after it may have reached an instance (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A worker's keep-alive connections to the instances.
fn upstream_pool(config: &LbConfig) -> Arc<UpstreamPool> {
    let t = &config.timeouts;
    Arc::new(UpstreamPool::new(t.connect, t.upstream_idle))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Splices a client's upgraded connection to the instance's, in a task that holds the
/// instance's in-flight count until either side closes, or shutdown cuts it.
fn spawn_tunnel(
    client: OnUpgrade,
    server: OnUpgrade,
    guard: crate::discovery::InFlight,
    mut life: Lifecycle,
) {
    tokio::spawn(async move {
        let _guard = guard;
        let _done = life.done.clone();
        let splice = async {
            let (c, s) = tokio::try_join!(client, server)?;
            let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
            tokio::io::copy_bidirectional(&mut c, &mut s)
                .await
                .map_err(|e| {
                    tracing::debug!(error = %e, "tunnel closed");
                    e
                })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        tokio::select! {
            _ = splice => {}
            () = crate::until_set(&mut life.cut) => {}
        }
    });
}
