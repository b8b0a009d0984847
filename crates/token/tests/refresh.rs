//! Rotating refresh tokens with reuse detection, on memory:// and on a private redis-server.
//! Each scenario is written once and run on both stores.

use std::time::Duration;

use statehouse_store::{Store, StoreConfig, open};
use statehouse_testkit::{shared_redis, unique_prefix};
use statehouse_token::{ManualClock, RefreshConfig, RefreshError, RefreshTokens};

async fn memory() -> Store {
    open(StoreConfig::new("memory://")).await.unwrap()
}

async fn redis(test: &str) -> Store {
    let url = shared_redis().url();
    open(StoreConfig::new(url).prefix(unique_prefix(test)))
        .await
        .expect("open the private redis-server")
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::memory().await).await })*
        }
        mod redis_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::redis(stringify!($name)).await).await
            })*
        }
    };
}

on_both_stores!(
    rotation_hands_out_a_new_token_each_time,
    reusing_a_rotated_token_revokes_the_family,
    a_wrong_secret_for_the_current_generation_revokes_the_family,
    concurrent_refreshes_with_one_token_let_exactly_one_win,
    logout_revokes_the_family,
    families_are_independent,
    the_absolute_lifetime_ends_a_family,
    malformed_and_unknown_tokens_are_refused,
    the_family_carries_the_idle_lifetime_as_its_ttl,
);

async fn rotation_hands_out_a_new_token_each_time(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let first = tokens.issue("user-1").await.unwrap();
    assert_eq!((first.generation, first.subject.as_str()), (0, "user-1"));
    let parts: Vec<&str> = first.token.split('.').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!((parts[0].len(), parts[1], parts[2].len()), (22, "0", 43));

    let second = tokens.rotate(&first.token).await.unwrap();
    assert_eq!(second.family, first.family);
    assert_eq!(second.generation, 1);
    assert_eq!(second.subject, "user-1");
    assert_ne!(second.token, first.token);
    let third = tokens.rotate(&second.token).await.unwrap();
    assert_eq!(third.generation, 2);
}

async fn reusing_a_rotated_token_revokes_the_family(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let first = tokens.issue("user-1").await.unwrap();
    let second = tokens.rotate(&first.token).await.unwrap();
    let third = tokens.rotate(&second.token).await.unwrap();

    // A thief replays the first token.
    assert!(matches!(
        tokens.rotate(&first.token).await,
        Err(RefreshError::Reused)
    ));
    // The whole family is dead, including the newest token the legitimate client holds.
    assert!(matches!(
        tokens.rotate(&third.token).await,
        Err(RefreshError::Revoked)
    ));
    assert!(matches!(
        tokens.rotate(&second.token).await,
        Err(RefreshError::Revoked)
    ));
}

async fn a_wrong_secret_for_the_current_generation_revokes_the_family(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let grant = tokens.issue("user-1").await.unwrap();
    let (prefix, secret) = grant.token.rsplit_once('.').unwrap();
    // Same family and generation, another (well-formed) secret.
    let mut forged_secret = secret.to_owned().into_bytes();
    forged_secret[0] = if forged_secret[0] == b'A' { b'B' } else { b'A' };
    let forged = format!("{prefix}.{}", String::from_utf8(forged_secret).unwrap());
    assert!(matches!(
        tokens.rotate(&forged).await,
        Err(RefreshError::Reused)
    ));
    assert!(matches!(
        tokens.rotate(&grant.token).await,
        Err(RefreshError::Revoked)
    ));
}

async fn concurrent_refreshes_with_one_token_let_exactly_one_win(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    for round in 0..5 {
        let grant = tokens.issue("user-1").await.unwrap();
        let attempts: Vec<_> = (0..8)
            .map(|_| {
                let tokens = tokens.clone();
                let token = grant.token.clone();
                tokio::spawn(async move { tokens.rotate(&token).await })
            })
            .collect();
        let mut wins = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(next) => {
                    assert_eq!(next.generation, 1);
                    wins += 1;
                }
                Err(RefreshError::Reused | RefreshError::Revoked) => {}
                Err(other) => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one refresh succeeds");
        // The token was presented more than once, so the family is revoked.
        assert!(matches!(
            tokens.rotate(&grant.token).await,
            Err(RefreshError::Revoked)
        ));
    }
}

async fn logout_revokes_the_family(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let grant = tokens.issue("user-1").await.unwrap();
    let next = tokens.rotate(&grant.token).await.unwrap();
    assert!(tokens.revoke(&next.token).await.unwrap());
    assert!(matches!(
        tokens.rotate(&next.token).await,
        Err(RefreshError::Revoked)
    ));
    // Revoking by family id (an admin's "log out everywhere").
    let other = tokens.issue("user-1").await.unwrap();
    assert!(tokens.revoke_family(&other.family).await.unwrap());
    assert!(matches!(
        tokens.rotate(&other.token).await,
        Err(RefreshError::Revoked)
    ));
    assert!(matches!(
        tokens.revoke_family("not-a-family").await,
        Err(RefreshError::Malformed)
    ));
}

async fn families_are_independent(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let phone = tokens.issue("user-1").await.unwrap();
    let laptop = tokens.issue("user-1").await.unwrap();
    assert_ne!(phone.family, laptop.family);
    let phone2 = tokens.rotate(&phone.token).await.unwrap();
    assert!(matches!(
        tokens.rotate(&phone.token).await,
        Err(RefreshError::Reused)
    ));
    assert!(matches!(
        tokens.rotate(&phone2.token).await,
        Err(RefreshError::Revoked)
    ));
    assert!(
        tokens.rotate(&laptop.token).await.is_ok(),
        "other family untouched"
    );
}

async fn the_absolute_lifetime_ends_a_family(store: Store) {
    let clock = ManualClock::starting_now();
    let config = RefreshConfig {
        idle_lifetime: Duration::from_secs(3600),
        absolute_lifetime: Duration::from_secs(3 * 3600),
    };
    let tokens = RefreshTokens::new(store, config).with_clock(clock.clock());
    let mut grant = tokens.issue("user-1").await.unwrap();
    // Used every 50 minutes, the family stays alive by idle time, until its absolute end.
    for _ in 0..3 {
        clock.advance(Duration::from_secs(50 * 60));
        grant = tokens.rotate(&grant.token).await.unwrap();
    }
    // 150 minutes in: the next token's idle lifetime is cut to what is left (30 minutes).
    assert_eq!(grant.expires_in, Duration::from_secs(30 * 60));
    clock.advance(Duration::from_secs(30 * 60));
    assert!(matches!(
        tokens.rotate(&grant.token).await,
        Err(RefreshError::Expired)
    ));
}

async fn malformed_and_unknown_tokens_are_refused(store: Store) {
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let grant = tokens.issue("user-1").await.unwrap();
    for bad in [
        "",
        "garbage",
        "a.b.c",
        "....",
        &format!("{}.x", grant.token),
        &grant.token.replacen('.', ".+", 1),
        &grant.token[1..],
        &format!("{}\0", grant.token),
    ] {
        assert!(
            matches!(tokens.rotate(bad).await, Err(RefreshError::Malformed)),
            "{bad:?}"
        );
    }
    // Well-formed, but no such family.
    let stranger = RefreshTokens::new(memory().await, RefreshConfig::new())
        .issue("someone")
        .await
        .unwrap();
    assert!(matches!(
        tokens.rotate(&stranger.token).await,
        Err(RefreshError::Unknown)
    ));
    assert!(!tokens.revoke(&stranger.token).await.unwrap());
    assert!(matches!(
        tokens.issue("").await,
        Err(RefreshError::EmptySubject)
    ));
    // None of this touched the real family.
    assert!(tokens.rotate(&grant.token).await.is_ok());
}

async fn the_family_carries_the_idle_lifetime_as_its_ttl(store: Store) {
    let config = RefreshConfig {
        idle_lifetime: Duration::from_secs(600),
        absolute_lifetime: Duration::from_secs(3600),
    };
    let tokens = RefreshTokens::new(store.clone(), config);
    let grant = tokens.issue("user-1").await.unwrap();
    assert_eq!(grant.expires_in, Duration::from_secs(600));
    // The family's store entry carries the idle lifetime as its TTL (the store enforces it;
    // its own conformance suite proves that expired maps are never returned).
    let map = store
        .map_read(&format!("rt:{}", grant.family))
        .await
        .unwrap()
        .into_inner()
        .unwrap();
    let ttl = map.expires_in.unwrap();
    assert!(
        ttl <= Duration::from_secs(600) && ttl > Duration::from_secs(590),
        "{ttl:?}"
    );
    assert_eq!(map.get("sub").unwrap().as_ref(), b"user-1");
    let secret = grant.token.rsplit_once('.').unwrap().1;
    assert!(
        map.fields
            .values()
            .all(|f| f.value.as_ref() != secret.as_bytes()),
        "only a hash of the secret is stored"
    );
}

#[tokio::test]
async fn a_store_outage_is_unavailable_not_a_rejection() {
    // A private server, killed halfway.
    let mut server = tokio::task::spawn_blocking(statehouse_testkit::RedisServer::start)
        .await
        .unwrap()
        .unwrap();
    let store = open(StoreConfig::new(server.url())).await.unwrap();
    let tokens = RefreshTokens::new(store, RefreshConfig::new());
    let grant = tokens.issue("user-1").await.unwrap();
    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    let err = tokens.rotate(&grant.token).await.unwrap_err();
    assert!(matches!(err, RefreshError::Unavailable(_)), "{err:?}");
    assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    drop(server);
}
