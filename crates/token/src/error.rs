//! Errors callers decide on, and the HTTP answer each one becomes.
//!
//! A token that is not good enough is a 401 with `WWW-Authenticate: Bearer error="invalid_token"`
//! (RFC 6750 §3.1); a store or key set that cannot be reached is a 503 with `Retry-After`. No
//! input becomes a 500, and no answer echoes the token or says more than the category.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use statehouse_store::StoreError;

/// Why an access token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not a compact JWS we could read: wrong number of segments, bad base64url or JSON, a
    /// missing required claim (`iss`, `sub`, `aud`, `exp`, `iat`, `jti`), a `crit` header, no
    /// `kid`, or over the size limit. The reason is for logs; clients get only the category.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The `kid` names no key we hold (after a key-set refresh, when one is allowed).
    #[error("unknown key id")]
    UnknownKid,
    /// The header's `alg` is not the algorithm of the key its `kid` names (`none`, HS/RS
    /// confusion, ...).
    #[error("algorithm does not match the key")]
    AlgorithmMismatch,
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past by more than the leeway.
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future by more than the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    /// The token's `jti` is on the revocation list.
    #[error("token revoked")]
    Revoked,
    /// The revocation list could not be consulted.
    #[error("revocation list unavailable: {0}")]
    Unavailable(#[source] StoreError),
    /// The token's key is not cached and the key set (JWKS) could not be fetched.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl TokenError {
    /// The HTTP status this error answers with: 503 when a dependency is down, else 401.
    pub fn status(&self) -> StatusCode {
        match self {
            TokenError::Unavailable(_) | TokenError::KeysUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// A short description safe to send to the client.
    pub fn public_description(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed token",
            TokenError::UnknownKid => "unknown key",
            TokenError::AlgorithmMismatch => "algorithm not allowed for this key",
            TokenError::BadSignature => "bad signature",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not yet valid",
            TokenError::WrongIssuer => "wrong issuer",
            TokenError::WrongAudience => "wrong audience",
            TokenError::Revoked => "token revoked",
            TokenError::Unavailable(_) | TokenError::KeysUnavailable(_) => {
                "token check temporarily unavailable"
            }
        }
    }
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let description = self.public_description();
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                service_unavailable(description, retry_after_secs(&self))
            }
            _ => {
                let challenge =
                    format!("Bearer error=\"invalid_token\", error_description=\"{description}\"");
                unauthorized(description, challenge)
            }
        }
    }
}

fn retry_after_secs(error: &TokenError) -> u64 {
    match error {
        TokenError::Unavailable(e) => e.retry_after().map_or(1, |d| d.as_secs().max(1)),
        _ => 1,
    }
}

fn unauthorized(description: &'static str, challenge: String) -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, description).into_response();
    // The challenge is built from fixed strings only, so it is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn service_unavailable(description: &'static str, retry_after: u64) -> Response {
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, description).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// Why an access token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The key ring holds no key with a private part.
    #[error("the key ring has no signing key")]
    NoSigningKey,
    /// An extra claim tried to set a registered claim the issuer owns.
    #[error("extra claim {0:?} is reserved (iss, sub, aud, exp, nbf, iat, jti)")]
    ReservedClaim(String),
    #[error("subject is empty")]
    EmptySubject,
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// Why a refresh token was not accepted, issued or revoked.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// Not a refresh token of ours (wrong shape or encoding).
    #[error("malformed refresh token")]
    Malformed,
    /// No such family: it expired, was deleted, or never existed.
    #[error("unknown or expired refresh token")]
    Unknown,
    /// An already-rotated token (or the current one with a wrong secret) was presented. The
    /// whole family has been revoked: the holder of the newest token must log in again.
    #[error("refresh token reuse detected; the token family is revoked")]
    Reused,
    /// The family was revoked earlier (reuse, logout).
    #[error("refresh token family revoked")]
    Revoked,
    /// The family is older than the configured absolute lifetime.
    #[error("refresh token family past its absolute lifetime")]
    Expired,
    /// The store could not be reached (or answered only from a degraded read).
    #[error("refresh store unavailable: {0}")]
    Unavailable(#[source] StoreError),
    /// The store answered with something else (corrupt family, a limit).
    #[error("refresh store error: {0}")]
    Store(#[source] StoreError),
    #[error("subject is empty")]
    EmptySubject,
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

impl RefreshError {
    pub(crate) fn from_store(e: StoreError) -> Self {
        if e.is_unavailable() {
            RefreshError::Unavailable(e)
        } else {
            RefreshError::Store(e)
        }
    }

    /// The HTTP status for a refresh endpoint: 401 for a token that will not work, 503 when the
    /// store is down, 500 only for a store that answered with corrupt data or a random source
    /// that failed (neither is caused by the request).
    pub fn status(&self) -> StatusCode {
        match self {
            RefreshError::Malformed
            | RefreshError::Unknown
            | RefreshError::Reused
            | RefreshError::Revoked
            | RefreshError::Expired => StatusCode::UNAUTHORIZED,
            RefreshError::EmptySubject => StatusCode::BAD_REQUEST,
            RefreshError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RefreshError::Store(_) | RefreshError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for RefreshError {
    fn into_response(self) -> Response {
        match self.status() {
            StatusCode::UNAUTHORIZED => unauthorized(
                "invalid refresh token",
                "Bearer error=\"invalid_token\", error_description=\"invalid refresh token\""
                    .to_owned(),
            ),
            StatusCode::SERVICE_UNAVAILABLE => {
                let retry = match &self {
                    RefreshError::Unavailable(e) => {
                        e.retry_after().map_or(1, |d| d.as_secs().max(1))
                    }
                    _ => 1,
                };
                service_unavailable("refresh temporarily unavailable", retry)
            }
            status => {
                tracing::error!(error = %self, "refresh failed");
                (status, "refresh failed").into_response()
            }
        }
    }
}
