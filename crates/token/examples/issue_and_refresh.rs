// Run with: cargo run -p statehouse-token --example issue_and_refresh
//
// Log in, call an API with the access token, refresh it (rotation), and watch reuse detection
// revoke the family when an old refresh token is replayed. Everything against memory://.

use statehouse_store::{StoreConfig, open};
use statehouse_token::{
    IssuerConfig, KeyRing, RefreshConfig, RefreshError, RefreshTokens, TokenIssuer, TokenVerifier,
    VerifierConfig,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Dev keys: in production, `KeyRing::from_env("STATEHOUSE_TOKEN_KEYS")` on every instance.
    let ring = KeyRing::generate_ed25519("dev-1")?;
    let issuer = TokenIssuer::new(
        ring.clone(),
        IssuerConfig::new("https://shop.example", "shop"),
    )?;
    let verifier = TokenVerifier::new(ring, VerifierConfig::new("https://shop.example", "shop"));
    let store = open(StoreConfig::new("memory://")).await?;
    let refresh = RefreshTokens::new(store, RefreshConfig::new());

    // Login: a short access token and the first refresh token of a new family.
    let (access, claims) = issuer.issue_access("user-42", Default::default())?;
    let login = refresh.issue("user-42").await?;
    println!(
        "access token ({} bytes), expires at {}",
        access.len(),
        claims.exp
    );
    println!(
        "refresh family {} generation {}",
        login.family, login.generation
    );

    // Any instance verifies the access token without a round trip.
    let seen = verifier.verify(&access).await?;
    println!("verified: sub={} jti={}", seen.sub, seen.jti);

    // Refresh: the old refresh token is exchanged for the next one, plus a new access token.
    let next = refresh.rotate(&login.token).await?;
    let (access2, _) = issuer.issue_access(&next.subject, Default::default())?;
    println!(
        "refreshed: generation {} and a new access token ({} bytes)",
        next.generation,
        access2.len()
    );

    // A thief replays the first refresh token: reuse is detected and the family revoked...
    match refresh.rotate(&login.token).await {
        Err(RefreshError::Reused) => println!("replayed old token: reuse detected, family revoked"),
        other => println!("unexpected: {other:?}"),
    }
    // ...so the legitimate client's newest token is dead too: the user logs in again.
    match refresh.rotate(&next.token).await {
        Err(RefreshError::Revoked) => println!("newest token after the replay: family revoked"),
        other => println!("unexpected: {other:?}"),
    }
    Ok(())
}
