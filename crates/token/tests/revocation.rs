//! The revocation list, on memory:// and on a private redis-server: a revoked token fails
//! verification, the entry expires with the token, and a store outage is a 503.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use common::{AUD, ISS};
use statehouse_store::{Store, StoreConfig, open};
use statehouse_testkit::{shared_redis, unique_prefix};
use statehouse_token::{
    IssuerConfig, KeyRing, ManualClock, RevocationList, TokenError, TokenIssuer, TokenVerifier,
    VerifierConfig,
};

async fn memory() -> Store {
    open(StoreConfig::new("memory://")).await.unwrap()
}

async fn redis(test: &str) -> Store {
    open(StoreConfig::new(shared_redis().url()).prefix(unique_prefix(test)))
        .await
        .expect("open the private redis-server")
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(#[tokio::test] async fn $name() { super::$name(super::memory().await).await })*
        }
        mod redis_store {
            $(#[tokio::test] async fn $name() {
                super::$name(super::redis(stringify!($name)).await).await
            })*
        }
    };
}

on_both_stores!(
    a_revoked_token_fails_and_others_pass,
    an_entry_expires_with_its_token,
    tokens_past_expiry_need_no_entry,
);

fn setup(store: &Store) -> (TokenIssuer, TokenVerifier, RevocationList) {
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let issuer = TokenIssuer::new(ring.clone(), IssuerConfig::new(ISS, AUD)).unwrap();
    let list = RevocationList::new(store.clone());
    let verifier =
        TokenVerifier::new(ring, VerifierConfig::new(ISS, AUD)).with_revocations(list.clone());
    (issuer, verifier, list)
}

async fn a_revoked_token_fails_and_others_pass(store: Store) {
    let (issuer, verifier, list) = setup(&store);
    let (token, claims) = issuer.issue_access("user-1", Default::default()).unwrap();
    let (other, _) = issuer.issue_access("user-1", Default::default()).unwrap();
    assert!(verifier.verify(&token).await.is_ok());

    list.revoke_claims(&claims).await.unwrap();
    assert!(list.is_revoked(&claims.jti).await.unwrap());
    let err = verifier.verify(&token).await.unwrap_err();
    assert!(matches!(err, TokenError::Revoked), "{err:?}");
    assert_eq!(err.into_response().status(), StatusCode::UNAUTHORIZED);
    assert!(
        verifier.verify(&other).await.is_ok(),
        "only that jti is revoked"
    );

    // Revoking twice is harmless.
    list.revoke(&claims.jti, claims.exp).await.unwrap();
    assert!(matches!(
        verifier.verify(&token).await,
        Err(TokenError::Revoked)
    ));
}

async fn an_entry_expires_with_its_token(store: Store) {
    // The list's clock stands 300 ms before a token's exp + leeway: the entry gets a 300 ms TTL.
    // This test waits for that real TTL to run out (the store's TTL is what it tests).
    let exp = common::T0;
    let leeway = Duration::from_secs(30);
    let clock = ManualClock::at_unix_secs(exp + 30);
    clock.rewind(Duration::from_millis(300));
    let list = RevocationList::new(store)
        .with_leeway(leeway)
        .with_clock(clock.clock());
    list.revoke("jti-short", exp).await.unwrap();
    assert!(list.is_revoked("jti-short").await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while list.is_revoked("jti-short").await.unwrap() {
        assert!(Instant::now() < deadline, "entry outlived its TTL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn tokens_past_expiry_need_no_entry(store: Store) {
    let clock = ManualClock::at_unix_secs(common::T0);
    let list = RevocationList::new(store).with_clock(clock.clock());
    // Expired 31 s ago: beyond the 30 s leeway, no verifier accepts it, nothing is written.
    list.revoke("old", common::T0 - 31).await.unwrap();
    assert!(!list.is_revoked("old").await.unwrap());
    // Expired 29 s ago: still inside the leeway, so it must be listed.
    list.revoke("recent", common::T0 - 29).await.unwrap();
    assert!(list.is_revoked("recent").await.unwrap());
}

#[tokio::test]
async fn a_revocation_store_outage_is_a_503() {
    let mut server = tokio::task::spawn_blocking(statehouse_testkit::RedisServer::start)
        .await
        .unwrap()
        .unwrap();
    let store = open(StoreConfig::new(server.url())).await.unwrap();
    let (issuer, verifier, _) = setup(&store);
    let (token, _) = issuer.issue_access("user-1", Default::default()).unwrap();
    assert!(verifier.verify(&token).await.is_ok());
    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    let err = verifier.verify(&token).await.unwrap_err();
    assert!(matches!(err, TokenError::Unavailable(_)), "{err:?}");
    let response = err.into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    drop(server);
}

#[tokio::test]
async fn the_revocation_check_runs_only_after_the_signature_is_good() {
    // A forged token must not cost a store round trip: verification order puts the GET last.
    // Shown with a store that is down: a forged token is still a plain 401.
    let mut server = tokio::task::spawn_blocking(statehouse_testkit::RedisServer::start)
        .await
        .unwrap()
        .unwrap();
    let store = open(StoreConfig::new(server.url())).await.unwrap();
    let (_, verifier, _) = setup(&store);
    let other = KeyRing::generate_ed25519("k").unwrap();
    let (forged, _) = TokenIssuer::new(other, IssuerConfig::new(ISS, AUD))
        .unwrap()
        .issue_access("user-1", Default::default())
        .unwrap();
    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    assert!(matches!(
        verifier.verify(&forged).await,
        Err(TokenError::BadSignature)
    ));
    assert!(matches!(
        verifier.verify("garbage").await,
        Err(TokenError::Malformed(_))
    ));
    drop(server);
}

/// Regression: with a fail-open store, a revocation check during an outage
/// used to read "absent" and let a revoked token through. Security checks
/// fail closed whatever the store's read policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_store_does_not_let_revoked_tokens_through() {
    use statehouse_store::{OnStoreDown, Policy};
    let redis = statehouse_testkit::RedisServer::start().unwrap();
    let proxy = statehouse_testkit::FaultProxy::start(redis.addr())
        .await
        .unwrap();
    let policy = Policy::fail_closed()
        .with_on_down(OnStoreDown::FailOpen)
        .with_timeout(Duration::from_millis(300));
    let store = open(StoreConfig::new(format!("redis://{}", proxy.addr())).policy(policy))
        .await
        .unwrap();
    let (issuer, verifier, list) = setup(&store);
    let (token, claims) = issuer.issue_access("user-1", Default::default()).unwrap();
    list.revoke_claims(&claims).await.unwrap();
    proxy.cut();
    let err = verifier.verify(&token).await.unwrap_err();
    assert!(matches!(err, TokenError::Unavailable(_)), "{err:?}");
    assert_eq!(
        err.into_response().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}
