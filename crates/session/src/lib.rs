//! `statehouse-session`: sessions for axum that never lose an update.
//!
//! - An opaque 128-bit random id in a cookie signed with a key ring
//!   ([`SessionKeys`]; newest key signs, older keys verify), `HttpOnly`,
//!   `Secure` unless turned off for local development, `SameSite=Lax`.
//! - Lazy: a request that never touches its session makes no store call.
//! - Per-field deltas: two requests of one session on two instances that
//!   change different fields never lose each other's changes;
//!   [`Session::update`] does compare-and-set for read-modify-write of one
//!   field and [`Session::increment`] is atomic in the store.
//! - [`Session::rotate_id`] at login (fixation defence) and
//!   [`Session::destroy`] at logout: afterwards no request, in flight or
//!   late, can write into the old session or bring it back.
//! - Sliding idle expiry costing at most one touch per `touch_fraction` of
//!   the TTL, and an absolute lifetime cap.
//! - Size limits per session and per field (413); tampered, truncated,
//!   foreign-key or expired cookies mean "no session" (never a 500) and are
//!   counted in `statehouse_session_cookie_rejected_total{reason}`.
//! - The store's `OnStoreDown` policy decides what happens when the store
//!   is down: 503 with `Retry-After` (fail closed), or a degraded read
//!   flagged in the `x-statehouse-session` response header.
//!
//! # Key rotation
//!
//! Keys come from the environment or a file (`kid:base64secret,...`, newest
//! first; see [`SessionKeys::parse`]). To rotate: put a new key in front and
//! deploy; cookies signed by the old key keep working. Remove the old key
//! after `absolute_ttl`, when no cookie it signed can still be valid.

mod config;
mod error;
mod keys;
mod layer;
mod session;

pub use config::{CookieConfig, SameSite, SessionConfig};
pub use error::SessionError;
pub use keys::{KeyError, MIN_SECRET_BYTES, Rejection, SessionKeys};
pub use layer::{DEGRADED_HEADER, SessionLayer, SessionService};
pub use session::Session;

/// Helpers for this crate's tests and for applications' own tests of their
/// session handling. Not part of the stable API.
#[doc(hidden)]
pub mod testing {
    use crate::config::SessionConfig;
    use crate::keys::{SessionId, SessionKeys};

    /// A validly signed cookie value for a fresh id created at `created_secs`.
    pub fn sign_cookie(keys: &SessionKeys, cookie_name: &str, created_secs: u64) -> String {
        keys.sign(cookie_name, &SessionId::random(), created_secs)
    }

    /// Runs the layer's cookie parsing and verification on a raw `Cookie`
    /// header; true if it yields a session. For the fuzz target.
    pub fn accepts_cookie_header(config: &SessionConfig, header: &[u8]) -> bool {
        let Ok(value) = http::HeaderValue::from_bytes(header) else {
            return false;
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::COOKIE, value);
        matches!(
            crate::layer::session_from_cookies(config, &headers),
            Some(Ok(_))
        )
    }

    pub fn now_secs() -> u64 {
        crate::session::now_secs()
    }

    /// The store key of the session named by `cookie` (`name=value`).
    pub fn store_key(config: &SessionConfig, cookie: &str) -> String {
        let value = cookie.split_once('=').map_or(cookie, |(_, v)| v);
        let id = value.split('.').next().unwrap_or_default();
        format!("{}{id}", config.key_prefix)
    }
}
