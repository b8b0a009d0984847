//! The session layer's behaviour, handler by handler, without sockets
//! (`oneshot` on the router), on the memory store wrapped in a counter of
//! store calls.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use statehouse_session::SessionConfig;
use statehouse_store::memory::MemoryBackend;
use statehouse_store::{
    Backend, Condition, FieldMap, MapPatch, PatchOutcome, Store, StoreConfig, Versioned,
};
use tower::ServiceExt;

use common::{Gate, app, config};

/// The memory backend, counting calls by kind.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryBackend,
    reads: AtomicUsize,
    writes: AtomicUsize,
    touches: AtomicUsize,
}

#[async_trait::async_trait]
impl Backend for Counting {
    fn describe(&self) -> &str {
        "counting+memory://"
    }
    async fn get(&self, key: &str) -> statehouse_store::Result<Option<Versioned>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> statehouse_store::Result<u64> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.put(key, value, ttl, condition).await
    }
    async fn delete(&self, key: &str, condition: Condition) -> statehouse_store::Result<bool> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(key, condition).await
    }
    async fn touch(&self, key: &str, ttl: Duration) -> statehouse_store::Result<bool> {
        self.touches.fetch_add(1, Ordering::SeqCst);
        self.inner.touch(key, ttl).await
    }
    async fn map_read(&self, key: &str) -> statehouse_store::Result<Option<FieldMap>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.map_read(key).await
    }
    async fn map_patch(
        &self,
        key: &str,
        patch: &MapPatch,
    ) -> statehouse_store::Result<PatchOutcome> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.map_patch(key, patch).await
    }
    async fn map_delete(&self, key: &str) -> statehouse_store::Result<bool> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.map_delete(key).await
    }
    async fn map_touch(&self, key: &str, ttl: Duration) -> statehouse_store::Result<bool> {
        self.touches.fetch_add(1, Ordering::SeqCst);
        self.inner.map_touch(key, ttl).await
    }
    async fn incr(
        &self,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> statehouse_store::Result<i64> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.incr(key, delta, ttl).await
    }
    async fn counter(&self, key: &str) -> statehouse_store::Result<Option<i64>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.counter(key).await
    }
}

impl Counting {
    fn calls(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
            + self.writes.load(Ordering::SeqCst)
            + self.touches.load(Ordering::SeqCst)
    }
}

struct Harness {
    router: axum::Router,
    backend: Arc<Counting>,
    store: Store,
}

fn harness(config: SessionConfig) -> Harness {
    let backend = Arc::new(Counting::default());
    let store = Store::with_backend(backend.clone(), &StoreConfig::new("memory://"));
    Harness {
        router: app(store.clone(), config, Gate::default()),
        backend,
        store,
    }
}

struct Reply {
    status: StatusCode,
    set_cookie: Option<String>,
    body: String,
    headers: http::HeaderMap,
}

impl Harness {
    async fn call(&self, method: &str, path: &str, cookie: Option<&str>) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let set_cookie = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("sh_session="))
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        Reply {
            status,
            set_cookie,
            body: String::from_utf8_lossy(&body).into_owned(),
            headers,
        }
    }
}

fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn a_request_that_never_touches_the_session_makes_no_store_call() {
    let h = harness(config());
    let first = h.call("POST", "/set/a/1", None).await;
    let cookie = pair(&first.set_cookie.unwrap());
    let before = h.backend.calls();
    let reply = h.call("GET", "/noop", Some(&cookie)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(h.backend.calls(), before, "lazy: no store call");
    assert!(reply.set_cookie.is_none());
}

#[tokio::test]
async fn new_session_cookie_has_secure_defaults() {
    let h = harness(config());
    let reply = h.call("POST", "/set/a/1", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let set = reply.set_cookie.expect("a new session sets the cookie");
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(set.contains(attribute), "{attribute} missing in {set}");
    }
    let cookie = pair(&set);
    let reply = h.call("GET", "/get/a", Some(&cookie)).await;
    assert_eq!(reply.body, r#""1""#);
    assert!(
        reply.set_cookie.is_none(),
        "an existing session keeps its cookie"
    );

    let local = harness(config().insecure_cookie_for_local_dev());
    let set = local
        .call("POST", "/set/a/1", None)
        .await
        .set_cookie
        .unwrap();
    assert!(!set.contains("Secure"), "only when asked explicitly: {set}");
}

#[tokio::test]
async fn bad_cookies_mean_no_session_never_a_500() {
    let h = harness(config());
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    let value = cookie.trim_start_matches("sh_session=").to_owned();
    let mut flipped = value.clone().into_bytes();
    flipped[5] = if flipped[5] == b'x' { b'y' } else { b'x' };
    let flipped = String::from_utf8(flipped).unwrap();
    let foreign = {
        let other = statehouse_session::SessionKeys::new([("test", vec![9u8; 32])]).unwrap();
        let h2 = harness(SessionConfig::new(other));
        pair(&h2.call("POST", "/set/a/1", None).await.set_cookie.unwrap())
    };
    let cases = [
        format!("sh_session={flipped}"),
        format!("sh_session={}", &value[..value.len() - 4]),
        foreign,
        "sh_session=".to_owned(),
        "sh_session=....".to_owned(),
        format!("sh_session={}", "A".repeat(5000)),
        "sh_session=%%%; other=1".to_owned(),
    ];
    for bad in cases {
        let reply = h.call("GET", "/get/a", Some(&bad)).await;
        assert_eq!(reply.status, StatusCode::OK, "{bad}");
        assert_eq!(reply.body, "null", "no session for {bad}");
    }
    // The valid cookie still works, even next to a tossed duplicate.
    let reply = h
        .call(
            "GET",
            "/get/a",
            Some(&format!("sh_session=forged; {cookie}")),
        )
        .await;
    assert_eq!(reply.body, r#""1""#);
}

#[tokio::test]
async fn expired_cookie_is_refused_without_a_store_call() {
    let h = harness(config().absolute_ttl(Duration::from_secs(3600)));
    // A validly signed cookie created two hours ago.
    let old = statehouse_session::testing::sign_cookie(
        &common::keys(),
        "sh_session",
        statehouse_session::testing::now_secs() - 7200,
    );
    let before = h.backend.calls();
    let reply = h
        .call("GET", "/get/a", Some(&format!("sh_session={old}")))
        .await;
    assert_eq!(reply.body, "null");
    assert_eq!(h.backend.calls(), before, "refused before any store call");
}

#[tokio::test]
async fn a_session_past_its_absolute_lifetime_is_gone() {
    let h = harness(config().absolute_ttl(Duration::from_secs(3600)));
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    // Age the stored session behind the layer's back.
    let key = statehouse_session::testing::store_key(&config(), &cookie);
    h.store
        .map_patch(
            &key,
            &MapPatch::new().set(
                "_sh.created",
                (statehouse_session::testing::now_secs() - 7200).to_string(),
            ),
        )
        .await
        .unwrap();
    let reply = h.call("GET", "/get/a", Some(&cookie)).await;
    assert_eq!(reply.body, "null");
    assert!(
        reply.set_cookie.unwrap().contains("Max-Age=0"),
        "the dead cookie is cleared"
    );
    assert!(h.store.map_read(&key).await.unwrap().is_none(), "deleted");
}

#[tokio::test]
async fn size_limits_answer_413_and_store_nothing() {
    let h = harness(config().limits(1000, 300));
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    let reply = h.call("POST", "/big/f/400", Some(&cookie)).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    for i in 0..3 {
        let reply = h
            .call("POST", &format!("/big/f{i}/250"), Some(&cookie))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let reply = h.call("POST", "/big/f9/250", Some(&cookie)).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "whole session over 1000"
    );
    assert_eq!(h.call("GET", "/get/f9", Some(&cookie)).await.body, "null");
}

#[tokio::test]
async fn login_rotates_the_id_and_the_old_one_stops_working() {
    let h = harness(config());
    let before = pair(
        &h.call("POST", "/set/cart/book", None)
            .await
            .set_cookie
            .unwrap(),
    );
    let reply = h.call("POST", "/login", Some(&before)).await;
    let after = pair(&reply.set_cookie.expect("login sets a new cookie"));
    assert_ne!(before, after);
    assert_eq!(
        h.call("GET", "/get/cart", Some(&after)).await.body,
        r#""book""#
    );
    assert_eq!(
        h.call("GET", "/get/user", Some(&after)).await.body,
        r#""alice""#
    );
    assert_eq!(
        h.call("GET", "/get/cart", Some(&before)).await.body,
        "null",
        "the pre-login id is dead (fixation)"
    );
}

#[tokio::test]
async fn logout_clears_the_cookie_and_the_session() {
    let h = harness(config());
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    let reply = h.call("POST", "/logout", Some(&cookie)).await;
    assert!(reply.set_cookie.unwrap().contains("Max-Age=0"));
    assert_eq!(h.call("GET", "/get/a", Some(&cookie)).await.body, "null");
    // A late blind write with the old cookie starts a *new* session; the old
    // id never comes back.
    let reply = h.call("POST", "/set/b/2", Some(&cookie)).await;
    let new = pair(&reply.set_cookie.expect("a new session"));
    assert_ne!(new, cookie);
    assert_eq!(h.call("GET", "/get/b", Some(&cookie)).await.body, "null");
}

#[tokio::test]
async fn update_and_increment_write_at_once_and_read_back() {
    let h = harness(config());
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    assert_eq!(h.call("POST", "/incr/n", Some(&cookie)).await.body, "1");
    assert_eq!(h.call("POST", "/incr/n", Some(&cookie)).await.body, "2");
    assert_eq!(h.call("POST", "/update/u", Some(&cookie)).await.body, "1");
    assert_eq!(h.call("POST", "/update/u", Some(&cookie)).await.body, "2");
    assert_eq!(h.call("GET", "/get/n", Some(&cookie)).await.body, "2");
    // Increment on a request without a session creates one.
    let reply = h.call("POST", "/incr/n", None).await;
    assert_eq!(reply.body, "1");
    assert!(reply.set_cookie.is_some());
}

/// Sliding expiry: one touch per `touch_fraction` of the idle TTL, not one
/// per request. The memory store runs on tokio's clock, paused here.
#[tokio::test(start_paused = true)]
async fn sliding_refresh_costs_one_touch_per_fraction_of_the_ttl() {
    let mut config = config().idle_ttl(Duration::from_secs(100));
    config.touch_fraction = 0.25;
    let h = harness(config);
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(2)).await;
        h.call("GET", "/get/a", Some(&cookie)).await;
    }
    assert_eq!(h.backend.touches.load(Ordering::SeqCst), 0, "20 s < 25 s");
    tokio::time::advance(Duration::from_secs(6)).await;
    h.call("GET", "/get/a", Some(&cookie)).await;
    assert_eq!(h.backend.touches.load(Ordering::SeqCst), 1);
    for _ in 0..5 {
        h.call("GET", "/get/a", Some(&cookie)).await;
    }
    assert_eq!(
        h.backend.touches.load(Ordering::SeqCst),
        1,
        "refreshed already"
    );
    // Idle for longer than the TTL: gone.
    tokio::time::advance(Duration::from_secs(101)).await;
    assert_eq!(h.call("GET", "/get/a", Some(&cookie)).await.body, "null");
}

#[tokio::test]
async fn reserved_field_names_are_refused() {
    let h = harness(config());
    let reply = h.call("POST", "/set/_sh.created/0", None).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(reply.headers.get(header::SET_COOKIE).is_none());
}

/// Rejected cookies are counted by reason in
/// `statehouse_session_cookie_rejected_total`.
#[test]
fn rejected_cookies_are_counted_by_reason() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // A current-thread runtime keeps the layer on this thread, where the
        // local recorder is installed.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let h = harness(config());
            let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
            let mut forged = cookie.clone().into_bytes();
            let last = forged.len() - 2;
            forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
            let forged = String::from_utf8(forged).unwrap();
            h.call("GET", "/get/a", Some(&forged)).await;
            h.call("GET", "/get/a", Some(&forged)).await;
            h.call("GET", "/get/a", Some("sh_session=garbage")).await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let counted = |reason: &str| {
        snapshot
            .iter()
            .find_map(|(key, _, _, value)| {
                let key = key.key();
                let matches = key.name() == "statehouse_session_cookie_rejected_total"
                    && key
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == reason);
                match (matches, value) {
                    (true, DebugValue::Counter(n)) => Some(*n),
                    _ => None,
                }
            })
            .unwrap_or(0)
    };
    assert_eq!(counted("bad_signature"), 2);
    assert_eq!(counted("malformed"), 1);
}

/// A handler that only writes costs one store round trip: the deltas go out
/// as one patch that checks existence and the size limit itself.
#[tokio::test]
async fn a_blind_write_is_one_store_call() {
    let h = harness(config());
    let cookie = pair(&h.call("POST", "/set/a/1", None).await.set_cookie.unwrap());
    let (reads, writes) = (
        h.backend.reads.load(Ordering::SeqCst),
        h.backend.writes.load(Ordering::SeqCst),
    );
    let reply = h.call("POST", "/set/b/2", Some(&cookie)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(h.backend.reads.load(Ordering::SeqCst), reads, "no read");
    assert_eq!(
        h.backend.writes.load(Ordering::SeqCst),
        writes + 1,
        "one patch"
    );
    assert_eq!(h.call("GET", "/get/b", Some(&cookie)).await.body, r#""2""#);
}
