//! `statehouse-token`: identity in signed tokens and small state in an encrypted cookie, so an
//! instance needs no server-side session to know who is calling.
//!
//! - [`TokenIssuer`] signs short access tokens (JWT, EdDSA by default; ES256, RS256, HS256) with
//!   the newest key of a [`KeyRing`]; [`TokenVerifier`] checks them against the ring, or against
//!   another issuer's keys through a [`JwksCache`], and optionally a [`RevocationList`].
//! - [`jwks_handler`] publishes the ring's public keys.
//! - [`RefreshTokens`] issues opaque, rotating refresh tokens stored by family, and revokes the
//!   family when a token is used twice.
//! - [`SealedCookie`] keeps small client-side state (a cart) encrypted and authenticated.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use statehouse_token::{IssuerConfig, KeyRing, TokenIssuer, TokenVerifier, VerifierConfig};
//!
//! let ring = KeyRing::generate_ed25519("dev-1")?;
//! let issuer = TokenIssuer::new(ring.clone(), IssuerConfig::new("https://shop.example", "shop"))?;
//! let verifier = TokenVerifier::new(ring, VerifierConfig::new("https://shop.example", "shop"));
//!
//! let (token, _claims) = issuer.issue_access("user-42", Default::default())?;
//! assert_eq!(verifier.verify(&token).await?.sub, "user-42");
//! # Ok(()) }
//! ```
//!
//! # Security defaults
//!
//! - **Algorithms.** EdDSA, ES256, RS256 and HS256 only. `alg: none` and every other name are
//!   refused. The verifier picks the key by the token's `kid` from *its own* ring and requires
//!   the token's `alg` to be that key's one algorithm, so a token cannot choose how it is
//!   checked (no HS256-with-the-RSA-public-key confusion). Keys embedded in a token header
//!   (`jwk`, `jku`, `x5u`, `x5c`) are ignored; a `crit` header is refused.
//! - **Claims.** `iss`, `sub`, `aud`, `exp`, `iat` and `jti` are required; `iss` must match,
//!   `aud` must contain one of ours; `exp`, `nbf` and `iat` are checked with a 30 s leeway.
//! - **Lifetimes.** Access tokens live 5 minutes. Refresh families expire after 14 days unused
//!   and 90 days in all; each refresh token is single-use.
//! - **Keys.** HS256 secrets must be at least 32 bytes and are never published; RSA keys must be
//!   at least 2048 bits; a JWKS may not supply symmetric keys. Keys come from files or
//!   environment variables named in a key spec ([`KeyRing::from_env`]), never from source code.
//! - **JWKS client.** `https://` only (plain `http://` to loopback hosts is allowed for local
//!   setups), no redirects, 5 s timeout, 256 KiB body cap, at most one refetch per 30 s however
//!   many unknown `kid`s arrive, and a refetch when the cached set is 5 minutes old so removed
//!   keys stop being trusted.
//! - **Errors.** Every rejection is a typed [`TokenError`]; as an axum response it is a 401 with
//!   `WWW-Authenticate: Bearer error="invalid_token"`, or a 503 + `Retry-After` when the
//!   revocation store or the key set is unreachable — never a panic or a 500, for any input.
//! - **Cookie.** XChaCha20-Poly1305 with the cookie name as associated data, an expiry inside
//!   the ciphertext, a 4000-byte cap, `HttpOnly; Secure; SameSite=Lax`.
//!
//! # Key rotation
//!
//! Keys rotate through configuration, and a rolling restart applies it: a ring is immutable, and
//! every instance builds the same ring from the same key spec
//! (`STATEHOUSE_TOKEN_KEYS="KID:ALG:file:PATH ..."`, oldest first; see [`KeyRing::from_spec`]).
//!
//! 1. **Publish first.** Add the new key to the spec *as a public key* (a `PUBLIC KEY` PEM makes
//!    a verify-only entry) and roll the instances. Every instance and every JWKS client can now
//!    verify tokens signed with it, but nothing signs with it yet.
//! 2. **Sign with it.** Replace that entry with the private key, at the end of the list, and roll
//!    again. The newest key that can sign is the signing key; older keys keep verifying the
//!    tokens they signed. (Skipping step 1 also works for instances sharing the spec, and JWKS
//!    clients refetch on the unknown `kid` — but a client that fetched less than a cooldown
//!    (30 s) earlier rejects the new tokens until its cooldown ends.)
//! 3. **Retire the old key** once no token it signed can still be valid: after the access-token
//!    lifetime plus the leeway (5 min + 30 s by default), plus the JWKS `Cache-Control` max-age
//!    (5 min) for remote verifiers. Refresh tokens are opaque and do not depend on signing
//!    keys, so they survive any key rotation. Drop the old key from the spec and roll.
//!
//! A key that leaked is retired at once, accepting that the tokens it signed (at most one
//! access-token lifetime's worth) fail and their users refresh.
//!
//! Cookie keys rotate the same way ([`CookieKeys::from_spec`]): add the new key last (it seals
//! from then on; older keys still open), and drop an old one after the cookie lifetime.

mod claims;
mod clock;
mod cookie;
mod error;
mod issuer;
mod jwks;
mod keys;
mod random;
mod refresh;
mod revocation;
mod verifier;

pub use claims::{Claims, RESERVED_CLAIMS};
pub use clock::{Clock, ManualClock};
pub use cookie::{
    CookieKeys, DEFAULT_MAX_ENCODED_BYTES, SEAL_OVERHEAD_BYTES, SealError, SealedCookie,
    SealedCookieConfig,
};
pub use error::{IssueError, RefreshError, TokenError};
pub use issuer::{DEFAULT_ACCESS_LIFETIME, IssuerConfig, TokenIssuer};
pub use jwks::{JWKS_CACHE_CONTROL, jwks_handler};
#[cfg(feature = "jwks-client")]
pub use jwks::{JwksCache, JwksConfig, JwksError, PlainHttp};
pub use keys::{Key, KeyError, KeyRing, MIN_HMAC_SECRET_BYTES, MIN_RSA_BITS, SigningAlg};
pub use refresh::{RefreshConfig, RefreshGrant, RefreshTokens};
pub use revocation::RevocationList;
pub use verifier::{
    DEFAULT_LEEWAY, DEFAULT_MAX_TOKEN_BYTES, TokenVerifier, VerifierConfig, VerifyingKeys,
    bearer_token,
};
