//! Verifying access tokens.
//!
//! The order of checks is the security argument, so it is spelled out here:
//!
//! 1. shape: at most `max_token_bytes`, exactly three non-empty base64url segments;
//! 2. header: JSON with one `alg` and a `kid`, and no `crit`; embedded keys (`jwk`, `jku`, `x5u`,
//!    `x5c`) are ignored, never used;
//! 3. `alg` must be one this crate supports (`none` is not), else `AlgorithmMismatch`;
//! 4. the key is looked up by `kid` in *our* key ring or JWKS cache, else `UnknownKid`;
//! 5. `alg` must equal that key's one algorithm, else `AlgorithmMismatch` — this is what stops
//!    an HS256 token "signed" with an RSA public key from being checked as HMAC;
//! 6. the signature (jsonwebtoken, with only that algorithm allowed);
//! 7. claims: required ones present, `iss` and `aud` ours;
//! 8. time, with the leeway: `exp`, `nbf`, `iat`;
//! 9. the revocation list, when configured (one store GET).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;

use crate::claims::Claims;
use crate::clock::Clock;
use crate::error::TokenError;
use crate::keys::{Key, KeyRing, SigningAlg};
use crate::revocation::RevocationList;

/// The default clock-skew allowance for `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The default size limit of a token; ours are a few hundred bytes.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The longest `jti` accepted (ours are 22 characters); it becomes a store key.
const MAX_JTI_BYTES: usize = 128;

/// What a verifier accepts.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The only `iss` accepted.
    pub issuer: String,
    /// Accepted audiences: the token's `aud` must contain at least one of them.
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`. Default [`DEFAULT_LEEWAY`] (30 s).
    pub leeway: Duration,
    /// Longer tokens are `Malformed` before any parsing. Default [`DEFAULT_MAX_TOKEN_BYTES`].
    pub max_token_bytes: usize,
}

impl VerifierConfig {
    /// Accept tokens from `issuer` for `audience`, with the default leeway and size limit.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        VerifierConfig {
            issuer: issuer.into(),
            audience: vec![audience.into()],
            leeway: DEFAULT_LEEWAY,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }

    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }
}

/// Where a verifier finds keys.
#[derive(Debug, Clone)]
pub enum VerifyingKeys {
    /// A key ring this process holds (the issuer's own ring, or public keys from configuration).
    Ring(KeyRing),
    /// Keys fetched from an issuer's JWKS endpoint.
    #[cfg(feature = "jwks-client")]
    Jwks(crate::jwks::JwksCache),
}

impl From<KeyRing> for VerifyingKeys {
    fn from(ring: KeyRing) -> Self {
        VerifyingKeys::Ring(ring)
    }
}

#[cfg(feature = "jwks-client")]
impl From<crate::jwks::JwksCache> for VerifyingKeys {
    fn from(cache: crate::jwks::JwksCache) -> Self {
        VerifyingKeys::Jwks(cache)
    }
}

/// Checks access tokens. Cheap to clone; every check is independent of the others.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    keys: VerifyingKeys,
    config: VerifierConfig,
    /// One jsonwebtoken `Validation` per algorithm, built once: `iss` and `aud` are checked by
    /// jsonwebtoken; time is checked here against our clock (jsonwebtoken reads the system
    /// clock, which tests could not move).
    validations: [Validation; 4],
    revocations: Option<RevocationList>,
    clock: Clock,
}

impl TokenVerifier {
    pub fn new(keys: impl Into<VerifyingKeys>, config: VerifierConfig) -> Self {
        let validation = |alg: SigningAlg| {
            let mut v = Validation::new(alg.jwt());
            v.leeway = 0;
            v.validate_exp = false;
            v.validate_nbf = false;
            v.validate_aud = true;
            // Presence of every registered claim is enforced by deserializing into `Claims`.
            v.required_spec_claims.clear();
            v.set_issuer(&[&config.issuer]);
            v.set_audience(&config.audience);
            v
        };
        TokenVerifier {
            keys: keys.into(),
            validations: [
                validation(SigningAlg::EdDSA),
                validation(SigningAlg::ES256),
                validation(SigningAlg::RS256),
                validation(SigningAlg::HS256),
            ],
            config,
            revocations: None,
            clock: Clock::system(),
        }
    }

    /// Consult `list` on every successful verification (one store GET per token).
    pub fn with_revocations(mut self, list: RevocationList) -> Self {
        self.revocations = Some(list);
        self
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The claims of `token` if it is acceptable now.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, self.clock.unix_secs()).await
    }

    /// [`TokenVerifier::verify`] as if the time were `now` (seconds since the Unix epoch).
    pub async fn verify_at(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (alg, kid) = read_header(token, self.config.max_token_bytes)?;
        let key = self.key(&kid).await?;
        if key.alg() != alg {
            return Err(TokenError::AlgorithmMismatch);
        }
        let claims = self.check(token, &key, now)?;
        if let Some(list) = &self.revocations {
            let revoked = list
                .is_revoked(&claims.jti)
                .await
                .map_err(TokenError::Unavailable)?;
            if revoked {
                return Err(TokenError::Revoked);
            }
        }
        Ok(claims)
    }

    async fn key(&self, kid: &str) -> Result<std::sync::Arc<Key>, TokenError> {
        match &self.keys {
            VerifyingKeys::Ring(ring) => ring.get(kid).cloned().ok_or(TokenError::UnknownKid),
            #[cfg(feature = "jwks-client")]
            VerifyingKeys::Jwks(cache) => cache.key(kid).await,
        }
    }

    /// Signature, claims and time; `key.alg()` equals the header's `alg`.
    fn check(&self, token: &str, key: &Key, now: u64) -> Result<Claims, TokenError> {
        let validation = &self.validations[match key.alg() {
            SigningAlg::EdDSA => 0,
            SigningAlg::ES256 => 1,
            SigningAlg::RS256 => 2,
            SigningAlg::HS256 => 3,
        }];
        let claims = jsonwebtoken::decode::<Claims>(token, key.decoding(), validation)
            .map_err(|e| map_jwt_error(e.kind()))?
            .claims;
        if claims.sub.is_empty() {
            return Err(TokenError::Malformed("empty sub"));
        }
        if claims.jti.is_empty() || claims.jti.len() > MAX_JTI_BYTES {
            return Err(TokenError::Malformed("jti empty or too long"));
        }
        let leeway = self.config.leeway.as_secs();
        if now >= claims.exp.saturating_add(leeway) {
            return Err(TokenError::Expired);
        }
        let not_before = claims.nbf.unwrap_or(0).max(claims.iat);
        if not_before > now.saturating_add(leeway) {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

fn map_jwt_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::AlgorithmMismatch
        }
        ErrorKind::Base64(_) => TokenError::Malformed("bad base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed("bad JSON or missing required claim")
        }
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => {
            // Keys are checked when loaded, so this is a key we hold that the crypto provider
            // refuses: no token can be valid with it.
            tracing::error!(error = ?kind, "a verification key was refused by the crypto provider");
            TokenError::BadSignature
        }
        _ => TokenError::Malformed("rejected by the JWT decoder"),
    }
}

/// The header fields the verifier reads. Everything else (`typ`, `cty`, embedded keys) is ignored.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

/// Steps 1–3: the token's shape, and its header's `alg` and `kid`.
fn read_header(token: &str, max_bytes: usize) -> Result<(SigningAlg, String), TokenError> {
    if token.len() > max_bytes {
        return Err(TokenError::Malformed("token too long"));
    }
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(TokenError::Malformed("not three segments"));
    };
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // An empty signature passes this step on purpose: an unsigned `alg: none` token is then
    // refused for its algorithm, and any other empty signature fails as a bad signature.
    if header.is_empty() || payload.is_empty() {
        return Err(TokenError::Malformed("empty header or payload"));
    }
    if !(base64url(header) && base64url(payload) && base64url(signature)) {
        return Err(TokenError::Malformed("segment not base64url"));
    }
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("header not base64url"))?;
    let header: RawHeader =
        serde_json::from_slice(&header).map_err(|_| TokenError::Malformed("header not JSON"))?;
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: a recipient must reject extensions it does not understand.
        return Err(TokenError::Malformed("crit header"));
    }
    let alg = SigningAlg::from_name(&header.alg).ok_or(TokenError::AlgorithmMismatch)?;
    let kid = header.kid.ok_or(TokenError::Malformed("no kid"))?;
    Ok((alg, kid))
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_shape_checks() {
        let h = |json: &str| URL_SAFE_NO_PAD.encode(json);
        let ok = format!("{}.e30.c2ln", h(r#"{"alg":"EdDSA","kid":"k"}"#));
        assert!(matches!(read_header(&ok, 1000), Ok((SigningAlg::EdDSA, k)) if k == "k"));
        assert!(matches!(
            read_header(&ok, 10),
            Err(TokenError::Malformed(_))
        ));
        for bad in [
            "", ".", "..", "a.b", "a.b.c.d", "a..c", ".b.c", "a=.b.c", "a.b.c ",
        ] {
            assert!(
                matches!(read_header(bad, 1000), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
        let dup = format!(
            "{}.e30.c2ln",
            h(r#"{"alg":"EdDSA","alg":"none","kid":"k"}"#)
        );
        assert!(matches!(
            read_header(&dup, 1000),
            Err(TokenError::Malformed(_))
        ));
        let crit = format!(
            "{}.e30.c2ln",
            h(r#"{"alg":"EdDSA","kid":"k","crit":["b64"]}"#)
        );
        assert!(matches!(
            read_header(&crit, 1000),
            Err(TokenError::Malformed(_))
        ));
        let none = format!("{}.e30.c2ln", h(r#"{"alg":"none","kid":"k"}"#));
        assert!(matches!(
            read_header(&none, 1000),
            Err(TokenError::AlgorithmMismatch)
        ));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
        headers.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
