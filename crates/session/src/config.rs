//! Session settings. There is no `Default`: the signing keys are a security
//! choice the application makes, and the cookie is `Secure` unless the
//! application turns that off explicitly for local development.

use std::time::Duration;

pub use cookie::SameSite;

use crate::keys::SessionKeys;

/// The session cookie's attributes. `HttpOnly` is always set.
#[derive(Debug, Clone)]
pub struct CookieConfig {
    pub name: String,
    /// `Secure`: on unless [`SessionConfig::insecure_cookie_for_local_dev`].
    pub secure: bool,
    pub same_site: SameSite,
    pub path: String,
    pub domain: Option<String>,
}

/// Everything the session layer needs besides the store.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub keys: SessionKeys,
    pub cookie: CookieConfig,
    /// A session unused for this long expires (sliding).
    pub idle_ttl: Duration,
    /// No session lives longer than this after it was created, however
    /// active it is.
    pub absolute_ttl: Duration,
    /// The idle expiry is pushed back at most once per this fraction of
    /// `idle_ttl` (0.25: one touch per quarter of the TTL), not on every
    /// request. A request that writes refreshes it for free.
    pub touch_fraction: f64,
    /// Sum of field names and values of one session.
    pub max_session_bytes: usize,
    /// One field's serialized value.
    pub max_field_bytes: usize,
    /// Attempts of [`Session::update`](crate::Session::update) before it
    /// gives up with a conflict.
    pub update_attempts: u32,
    /// Prepended to the session id to form the store key.
    pub key_prefix: String,
}

impl SessionConfig {
    /// Secure defaults: cookie `sh_session`, `Secure`, `HttpOnly`,
    /// `SameSite=Lax`, `Path=/`; 30 min idle, 12 h absolute; 64 KiB per
    /// session, 16 KiB per field.
    pub fn new(keys: SessionKeys) -> Self {
        SessionConfig {
            keys,
            cookie: CookieConfig {
                name: "sh_session".to_owned(),
                secure: true,
                same_site: SameSite::Lax,
                path: "/".to_owned(),
                domain: None,
            },
            idle_ttl: Duration::from_secs(30 * 60),
            absolute_ttl: Duration::from_secs(12 * 3600),
            touch_fraction: 0.25,
            max_session_bytes: 64 * 1024,
            max_field_bytes: 16 * 1024,
            update_attempts: 16,
            key_prefix: "session:".to_owned(),
        }
    }

    /// Drops `Secure` so the cookie works over plain `http://localhost`.
    /// Never use it behind a real domain.
    pub fn insecure_cookie_for_local_dev(mut self) -> Self {
        self.cookie.secure = false;
        self
    }

    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = ttl;
        self
    }

    pub fn absolute_ttl(mut self, ttl: Duration) -> Self {
        self.absolute_ttl = ttl;
        self
    }

    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie.name = name.into();
        self
    }

    pub fn limits(mut self, max_session_bytes: usize, max_field_bytes: usize) -> Self {
        self.max_session_bytes = max_session_bytes;
        self.max_field_bytes = max_field_bytes;
        self
    }
}
