//! The JWKS endpoint and the JWKS client cache, against real axum servers on 127.0.0.1:0.
//! Fetches are counted on the server side.
#![cfg(feature = "jwks-client")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use common::*;
use statehouse_token::{
    IssuerConfig, JwksCache, JwksConfig, KeyRing, ManualClock, TokenError, TokenIssuer,
    TokenVerifier, VerifierConfig, jwks_handler,
};

/// A JWKS endpoint whose document the test changes, counting requests.
struct FakeIssuer {
    document: Mutex<serde_json::Value>,
    status: Mutex<StatusCode>,
    /// Delay before answering, to make concurrent misses overlap with the fetch in flight.
    delay: Duration,
    fetches: AtomicUsize,
}

impl FakeIssuer {
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn publish(&self, ring: &KeyRing) {
        *self.document.lock().unwrap() = ring.jwks();
    }
}

async fn fake_jwks(State(issuer): State<Arc<FakeIssuer>>) -> axum::response::Response {
    issuer.fetches.fetch_add(1, Ordering::SeqCst);
    if !issuer.delay.is_zero() {
        tokio::time::sleep(issuer.delay).await;
    }
    let status = *issuer.status.lock().unwrap();
    let body = issuer.document.lock().unwrap().to_string();
    (status, body).into_response()
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

async fn fake_issuer(ring: &KeyRing, delay: Duration) -> (Arc<FakeIssuer>, String) {
    let issuer = Arc::new(FakeIssuer {
        document: Mutex::new(ring.jwks()),
        status: Mutex::new(StatusCode::OK),
        delay,
        fetches: AtomicUsize::new(0),
    });
    let router = Router::new()
        .route("/jwks", get(fake_jwks))
        .with_state(issuer.clone());
    let addr = serve(router).await;
    (issuer, format!("http://{addr}/jwks"))
}

fn token(ring: &KeyRing, kid: &str) -> String {
    let ring = ring
        .keys()
        .filter(|k| k.kid() != kid)
        .fold(ring.clone(), |r, k| r.without(k.kid()));
    TokenIssuer::new(ring, IssuerConfig::new(ISS, AUD))
        .unwrap()
        .issue_access("user", Default::default())
        .unwrap()
        .0
}

fn verifier_for(url: &str, clock: &ManualClock) -> TokenVerifier {
    let cache = JwksCache::new(url, JwksConfig::new())
        .unwrap()
        .with_clock(clock.clock());
    TokenVerifier::new(cache, VerifierConfig::new(ISS, AUD)).with_clock(clock.clock())
}

#[tokio::test]
async fn the_endpoint_serves_public_keys_with_cache_control() {
    let ring = ring_of(vec![
        statehouse_token::Key::generate_ed25519("ed").unwrap(),
        rsa_key("rs"),
        hs_key("hs"),
    ]);
    let addr = serve(Router::new().route("/.well-known/jwks.json", get(jwks_handler(&ring)))).await;
    let response = reqwest::get(format!("http://{addr}/.well-known/jwks.json"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["cache-control"], "public, max-age=300");
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body, ring.jwks());
    let kids: Vec<&str> = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["ed", "rs"], "the HS256 secret is never served");
}

#[tokio::test]
async fn rotation_is_picked_up_after_the_cooldown_and_bogus_kids_cost_nothing() {
    let old = KeyRing::generate_ed25519("old").unwrap();
    let (issuer, url) = fake_issuer(&old, Duration::ZERO).await;
    let clock = ManualClock::starting_now();
    let verifier = verifier_for(&url, &clock);

    // First use fetches; further uses of a known kid do not.
    assert!(verifier.verify(&token(&old, "old")).await.is_ok());
    assert!(verifier.verify(&token(&old, "old")).await.is_ok());
    assert_eq!(issuer.fetches(), 1);

    // The issuer rotates: a new kid appears. Within the cooldown the cache may not refetch,
    // so the new kid is unknown and the issuer sees no request.
    let rotated = old
        .clone()
        .with_key(statehouse_token::Key::generate_ed25519("new").unwrap())
        .unwrap();
    issuer.publish(&rotated);
    let new_token = token(&rotated, "new");
    assert!(matches!(
        verifier.verify(&new_token).await,
        Err(TokenError::UnknownKid)
    ));
    assert_eq!(issuer.fetches(), 1);

    // After the cooldown, the unknown kid triggers one refetch and is accepted.
    clock.advance(Duration::from_secs(31));
    assert!(verifier.verify(&new_token).await.is_ok());
    assert_eq!(issuer.fetches(), 2);
    assert!(
        verifier.verify(&token(&old, "old")).await.is_ok(),
        "old key still listed"
    );

    // A made-up kid right after: rejected, and no request reaches the issuer.
    let bogus = token(&KeyRing::generate_ed25519("bogus").unwrap(), "bogus");
    for _ in 0..20 {
        assert!(matches!(
            verifier.verify(&bogus).await,
            Err(TokenError::UnknownKid)
        ));
    }
    assert_eq!(issuer.fetches(), 2);

    // After the next cooldown the made-up kid costs one fetch, then is still unknown.
    clock.advance(Duration::from_secs(31));
    assert!(matches!(
        verifier.verify(&bogus).await,
        Err(TokenError::UnknownKid)
    ));
    assert_eq!(issuer.fetches(), 3);
}

#[tokio::test]
async fn concurrent_misses_share_one_fetch() {
    let ring = KeyRing::generate_ed25519("k1").unwrap();
    // The issuer answers after 200 ms, so all 50 verifications below are waiting while the one
    // fetch is in flight.
    let (issuer, url) = fake_issuer(&ring, Duration::from_millis(200)).await;
    let clock = ManualClock::starting_now();
    let verifier = verifier_for(&url, &clock);

    let good = token(&ring, "k1");
    let results = futures::future::join_all((0..50).map(|_| verifier.verify(&good))).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(issuer.fetches(), 1, "50 concurrent misses, one fetch");

    // A flood of different made-up kids after the cooldown: still one fetch.
    clock.advance(Duration::from_secs(31));
    let bogus: Vec<String> = (0..50)
        .map(|i| {
            token(
                &KeyRing::generate_ed25519(&format!("bogus-{i}")).unwrap(),
                &format!("bogus-{i}"),
            )
        })
        .collect();
    let results = futures::future::join_all(bogus.iter().map(|t| verifier.verify(t))).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(TokenError::UnknownKid))),
        "{results:?}"
    );
    assert_eq!(issuer.fetches(), 2, "50 made-up kids, one fetch");
}

#[tokio::test]
async fn a_key_removed_by_the_issuer_stops_verifying_after_max_age() {
    let ring = KeyRing::generate_ed25519("stays")
        .unwrap()
        .with_key(statehouse_token::Key::generate_ed25519("leaked").unwrap())
        .unwrap();
    let (issuer, url) = fake_issuer(&ring, Duration::ZERO).await;
    let clock = ManualClock::starting_now();
    let verifier = verifier_for(&url, &clock);
    let leaked = token(&ring, "leaked");
    let stays = token(&ring, "stays");
    assert!(verifier.verify(&leaked).await.is_ok());

    issuer.publish(&ring.clone().without("leaked"));
    clock.advance(Duration::from_secs(299));
    assert!(
        verifier.verify(&leaked).await.is_ok(),
        "cached set still fresh"
    );
    assert_eq!(issuer.fetches(), 1);
    clock.advance(Duration::from_secs(2));
    assert!(matches!(
        verifier.verify(&leaked).await,
        Err(TokenError::UnknownKid)
    ));
    assert_eq!(issuer.fetches(), 2);
    // The tokens are five minutes old now; check the remaining key at the issue time.
    let now = clock.unix_secs() - 301;
    assert!(verifier.verify_at(&stays, now).await.is_ok());
    assert_eq!(issuer.fetches(), 2);
}

#[tokio::test]
async fn an_unreachable_key_set_is_a_503_but_known_keys_keep_working() {
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let (issuer, url) = fake_issuer(&ring, Duration::ZERO).await;
    let clock = ManualClock::starting_now();
    let verifier = verifier_for(&url, &clock);
    let good = token(&ring, "k");

    // The issuer fails on the very first fetch: the kid cannot be known, 503.
    *issuer.status.lock().unwrap() = StatusCode::INTERNAL_SERVER_ERROR;
    let err = verifier.verify(&good).await.unwrap_err();
    assert!(matches!(err, TokenError::KeysUnavailable(_)), "{err:?}");
    assert_eq!(
        err.into_response().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Failed fetches also cool down: no second request within 30 s.
    assert!(matches!(
        verifier.verify(&good).await,
        Err(TokenError::UnknownKid)
    ));
    assert_eq!(issuer.fetches(), 1);

    // The issuer recovers; after the cooldown the key is fetched.
    *issuer.status.lock().unwrap() = StatusCode::OK;
    clock.advance(Duration::from_secs(31));
    assert!(verifier.verify(&good).await.is_ok());

    // It fails again; when the cached set grows old, the failed refetch keeps the known key.
    *issuer.status.lock().unwrap() = StatusCode::SERVICE_UNAVAILABLE;
    clock.advance(Duration::from_secs(301));
    let now = clock.unix_secs() - 301 - 31;
    assert!(verifier.verify_at(&good, now).await.is_ok());
    assert_eq!(issuer.fetches(), 3);
}

#[tokio::test]
async fn bad_responses_are_refused_without_panicking() {
    let clock = ManualClock::starting_now();
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let good = token(&ring, "k");

    // Nothing listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let v = verifier_for(&format!("http://127.0.0.1:{port}/jwks"), &clock);
    assert!(matches!(
        v.verify(&good).await,
        Err(TokenError::KeysUnavailable(_))
    ));

    // Not JSON, not a key set, oversized, a redirect.
    let big = "x".repeat(300 * 1024);
    let router = Router::new()
        .route("/text", get(|| async { "not json" }))
        .route("/array", get(|| async { "[1,2,3]" }))
        .route("/big", get(move || std::future::ready(big.clone())))
        .route(
            "/redirect",
            get(|| async { axum::response::Redirect::temporary("/text") }),
        );
    let addr = serve(router).await;
    for path in ["text", "array", "big", "redirect"] {
        let v = verifier_for(&format!("http://{addr}/{path}"), &clock);
        let err = v.verify(&good).await.unwrap_err();
        assert!(
            matches!(err, TokenError::KeysUnavailable(_)),
            "{path}: {err:?}"
        );
    }

    // A key set whose only key is unusable (3-byte Ed25519 key): the kid stays unknown.
    let mut doc = ring.jwks();
    doc["keys"][0]["x"] = "AAAA".into();
    let (issuer, url) = fake_issuer(&ring, Duration::ZERO).await;
    *issuer.document.lock().unwrap() = doc;
    assert!(matches!(
        verifier_for(&url, &clock).verify(&good).await,
        Err(TokenError::UnknownKid)
    ));
}

#[tokio::test]
async fn refresh_fetches_now_and_reports_the_key_count() {
    let ring = KeyRing::generate_ed25519("a")
        .unwrap()
        .with_key(es_key("b"))
        .unwrap()
        .with_key(hs_key("c"))
        .unwrap();
    let (issuer, url) = fake_issuer(&ring, Duration::ZERO).await;
    let cache = JwksCache::new(&url, JwksConfig::new()).unwrap();
    assert_eq!(
        cache.refresh().await.unwrap(),
        2,
        "the HS256 key is not published"
    );
    assert_eq!(cache.kids(), ["a", "b"]);
    assert_eq!(
        cache.refresh().await.unwrap(),
        2,
        "refresh ignores the cooldown"
    );
    assert_eq!(issuer.fetches(), 2);
}
