//! The guarantees, on every backend, through real HTTP servers:
//! - two instances sharing one store, 1,000 concurrent requests writing
//!   distinct fields of one session and 1,000 concurrent increments of one
//!   field: nothing lost, exact count;
//! - a slow request spanning a logout cannot write into the destroyed
//!   session or bring it back;
//! - the store cut off: fail-closed answers 503 with Retry-After, fail-open
//!   answers flagged as degraded, and no write is acknowledged.

mod common;

use std::time::Duration;

use futures::future::join_all;
use http::StatusCode;
use statehouse_store::{OnStoreDown, Policy, Store, StoreConfig, open};
use statehouse_testkit::{FaultProxy, RedisServer};

use common::{Backend, Gate, app, client, config, open_store, prefix, serve, session_cookie};

const REQUESTS: usize = 1000;
/// Requests in flight at once (the client's own limit).
const IN_FLIGHT: usize = 100;

/// Sends request `i` for every `i` in `0..REQUESTS`, IN_FLIGHT at a time,
/// and returns `(i, status, body)` of each (a transport error reads as 599).
async fn in_waves<F, Fut>(request: F) -> Vec<(usize, StatusCode, String)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let mut out = Vec::with_capacity(REQUESTS);
    let indices: Vec<usize> = (0..REQUESTS).collect();
    for wave in indices.chunks(IN_FLIGHT) {
        let responses = join_all(wave.iter().map(|&i| request(i))).await;
        for (&i, response) in wave.iter().zip(responses) {
            out.push(match response {
                Ok(r) => {
                    let status = r.status();
                    (i, status, r.text().await.unwrap_or_default())
                }
                Err(e) => (
                    i,
                    StatusCode::from_u16(599).expect("valid code"),
                    e.to_string(),
                ),
            });
        }
    }
    out
}

/// Two store handles on one shared store, as two instances would open.
/// (The memory backend lives inside one process: both share one handle.)
async fn two_handles(backend: Backend, tag: &str) -> (Store, Store) {
    let prefix = prefix(tag);
    let first = open_store(backend, tag, &prefix).await;
    let second = match backend {
        Backend::Memory => first.clone(),
        _ => open_store(backend, tag, &prefix).await,
    };
    (first, second)
}

async fn two_instances_lose_no_update(backend: Backend, tag: &str) {
    let (one, two) = two_handles(backend, tag).await;
    let a = serve(app(one, config(), Gate::default())).await;
    let b = serve(app(two, config(), Gate::default())).await;
    let http = client();
    let created = http.post(format!("{a}/set/start/1")).send().await.unwrap();
    let cookie = session_cookie(&created).expect("session created");
    let pick = |i: usize| if i.is_multiple_of(2) { &a } else { &b };
    let other = |i: usize| if i.is_multiple_of(2) { &b } else { &a };
    let send = |request: reqwest::RequestBuilder| request.header("cookie", &cookie).send();

    // Distinct fields, alternating instances, IN_FLIGHT at a time.
    let failures: Vec<String> = in_waves(|i| send(http.post(format!("{}/set/f{i}/{i}", pick(i)))))
        .await
        .into_iter()
        .filter(|(_, status, _)| *status != StatusCode::OK)
        .map(|(i, status, body)| format!("f{i}: {status} {body}"))
        .collect();
    assert!(
        failures.is_empty(),
        "{backend:?}: failed writes {failures:?}"
    );

    let failures: Vec<String> = in_waves(|i| send(http.post(format!("{}/incr/n", pick(i)))))
        .await
        .into_iter()
        .filter(|(_, status, _)| *status != StatusCode::OK)
        .map(|(i, status, body)| format!("increment {i}: {status} {body}"))
        .collect();
    assert!(
        failures.is_empty(),
        "{backend:?}: failed increments {failures:?}"
    );

    // Read every field back through the other instance.
    let lost: Vec<String> = in_waves(|i| send(http.get(format!("{}/get/f{i}", other(i)))))
        .await
        .into_iter()
        .filter(|(i, _, body)| *body != format!("\"{i}\""))
        .map(|(i, status, body)| format!("f{i}: {status} {body}"))
        .collect();
    assert!(
        lost.is_empty(),
        "{backend:?}: lost {} updates: {lost:?}",
        lost.len()
    );
    let n = http
        .get(format!("{a}/get/n"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(n, REQUESTS.to_string(), "{backend:?}: exact count");
}

async fn logout_wins_over_a_slow_request(backend: Backend, tag: &str) {
    let (one, two) = two_handles(backend, tag).await;
    let gate = Gate::default();
    let a = serve(app(one, config(), gate.clone())).await;
    let b = serve(app(two, config(), Gate::default())).await;
    let http = client();
    let login = http.post(format!("{a}/login")).send().await.unwrap();
    let cookie = session_cookie(&login).expect("logged in");

    // A slow request on instance A reads the session, then waits...
    let slow = {
        let http = http.clone();
        let cookie = cookie.clone();
        let a = a.clone();
        tokio::spawn(async move {
            http.post(format!("{a}/slow-set/late"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
        })
    };
    gate.loaded.notified().await;
    // ...while the user logs out on instance B...
    let logout = http
        .post(format!("{b}/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::OK);
    // ...then the slow request tries to write.
    gate.release.notify_one();
    let slow = slow.await.unwrap();
    assert_eq!(
        slow.status(),
        StatusCode::CONFLICT,
        "{backend:?}: the late write is refused, not acknowledged"
    );
    for base in [&a, &b] {
        for field in ["user", "late"] {
            let body = http
                .get(format!("{base}/get/{field}"))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(body, "null", "{backend:?}: {field} after logout");
        }
    }
}

macro_rules! on_every_backend {
    ($($name:ident => $backend:expr;)*) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_instances_1000_writes_and_increments_lose_nothing() {
                two_instances_lose_no_update($backend, concat!(stringify!($name), "_writes")).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn logout_wins_over_a_slow_request_spanning_it() {
                logout_wins_over_a_slow_request($backend, concat!(stringify!($name), "_logout")).await;
            }
        }
    )*};
}

on_every_backend! {
    memory_single_store => Backend::Memory;
    sqlite => Backend::Sqlite;
    redis => Backend::Redis;
    redis_cluster => Backend::RedisCluster;
    postgres => Backend::Postgres;
}

/// The store's OnStoreDown policy, visible in the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_fail_closed_is_503_with_retry_after_and_fail_open_is_flagged() {
    let redis = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let url = format!("redis://{}", proxy.addr());
    let policy = |on_down| {
        let mut p = Policy::fail_closed().with_on_down(on_down);
        p.timeout = Duration::from_millis(300);
        p
    };
    let closed = open(StoreConfig::new(&url).policy(policy(OnStoreDown::FailClosed)))
        .await
        .unwrap();
    let fail_open = open(StoreConfig::new(&url).policy(policy(OnStoreDown::FailOpen)))
        .await
        .unwrap();
    let closed = serve(app(closed, config(), Gate::default())).await;
    let fail_open = serve(app(fail_open, config(), Gate::default())).await;
    let http = client();
    let cookie = session_cookie(
        &http
            .post(format!("{closed}/set/cart/book"))
            .send()
            .await
            .unwrap(),
    )
    .unwrap();

    proxy.cut();
    let r = http
        .get(format!("{closed}/get/cart"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().get("retry-after").is_some());
    let r = http
        .post(format!("{closed}/set/cart/pen"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "write not acknowledged"
    );

    let r = http
        .get(format!("{fail_open}/get/cart"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "fail-open continues");
    assert_eq!(r.headers()["x-statehouse-session"], "degraded");
    assert_eq!(r.text().await.unwrap(), "null");
    let r = http
        .post(format!("{fail_open}/set/cart/pen"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "even fail-open never acknowledges a write the store did not take"
    );

    proxy.heal();
    let mut body = String::new();
    for _ in 0..100 {
        let r = http
            .get(format!("{closed}/get/cart"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            body = r.text().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        body, r#""book""#,
        "the write made before the outage is intact"
    );
}
