//! An encrypted, authenticated cookie for small client-side state (a cart in token mode).
//!
//! The value is `base64url(key id || nonce || ciphertext)`:
//!
//! - key id: one byte naming the key of the [`CookieKeys`] ring that sealed it;
//! - nonce: 24 random bytes (XChaCha20-Poly1305's extended nonce: random nonces from any
//!   number of instances never need coordinating);
//! - ciphertext: XChaCha20-Poly1305 of `expiry (8 bytes, big-endian Unix seconds) || state`,
//!   with the cookie's *name* as associated data, so a value cannot be replayed under another
//!   cookie name; the 16-byte tag authenticates all of it.
//!
//! Anything that does not open — tampered, truncated, sealed with a key no longer in the ring,
//! under another name, expired, or garbage — is `None`: the request simply has no state.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock::Clock;
use crate::keys::{KeyError, decode_secret};
use crate::random;

const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const EXPIRY_BYTES: usize = 8;
/// Key id, nonce, expiry and tag: what a sealed value adds to the state, before base64.
pub const SEAL_OVERHEAD_BYTES: usize = 1 + NONCE_BYTES + EXPIRY_BYTES + TAG_BYTES;
/// The default cap on the encoded value; with the name and attributes it stays under the
/// 4096-byte cookie size every browser supports.
pub const DEFAULT_MAX_ENCODED_BYTES: usize = 4000;

/// A ring of 256-bit cookie keys: the newest seals, all open.
#[derive(Clone, Default)]
pub struct CookieKeys {
    /// Oldest first.
    keys: Vec<(u8, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("CookieKeys").field("ids", &ids).finish()
    }
}

impl CookieKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` under `id` as the newest key (the one that seals from now on).
    pub fn with_key(mut self, id: u8, key: [u8; 32]) -> Result<Self, KeyError> {
        if self.keys.iter().any(|(existing, _)| *existing == id) {
            return Err(KeyError::DuplicateKid(id.to_string()));
        }
        self.keys.push((id, XChaCha20Poly1305::new(&key.into())));
        Ok(self)
    }

    /// A ring of one fresh random key, for development and tests.
    pub fn generate(id: u8) -> Result<Self, KeyError> {
        let key = random::bytes::<32>().map_err(|e| KeyError::Random(e.to_string()))?;
        CookieKeys::new().with_key(id, key)
    }

    /// Loads keys from the spec in environment variable `var` (see [`CookieKeys::from_spec`]).
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let spec = std::env::var(var).map_err(|_| KeyError::MissingEnv(var.to_owned()))?;
        Self::from_spec(&spec, |name| std::env::var(name).ok())
    }

    /// Loads keys from a spec: entries separated by commas or whitespace, oldest first, each
    /// `ID:env:VAR` or `ID:file:PATH` where ID is 0–255 and the variable or file holds 32 bytes
    /// in base64 (`openssl rand -base64 32`).
    pub fn from_spec(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, KeyError> {
        let mut keys = CookieKeys::new();
        for entry in spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
        {
            let spec_err = |reason: &str| KeyError::Spec {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            };
            let mut parts = entry.splitn(3, ':');
            let (Some(id), Some(kind), Some(location)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(spec_err("expected ID:env:VAR or ID:file:PATH"));
            };
            let id: u8 = id
                .parse()
                .map_err(|_| spec_err("the key id must be 0 to 255"))?;
            let text = match kind {
                "env" => env(location).ok_or_else(|| KeyError::MissingEnv(location.to_owned()))?,
                "file" => std::fs::read_to_string(location).map_err(|source| KeyError::Io {
                    path: location.into(),
                    source,
                })?,
                _ => return Err(spec_err("the source must be env:VAR or file:PATH")),
            };
            let key: [u8; 32] = decode_secret(text.trim())
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| spec_err("the key must be exactly 32 bytes, base64-encoded"))?;
            keys = keys.with_key(id, key)?;
        }
        if keys.keys.is_empty() {
            return Err(KeyError::Spec {
                entry: String::new(),
                reason: "the cookie key spec names no key".into(),
            });
        }
        Ok(keys)
    }

    fn newest(&self) -> Option<&(u8, XChaCha20Poly1305)> {
        self.keys.last()
    }

    fn get(&self, id: u8) -> Option<&XChaCha20Poly1305> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, c)| c)
    }
}

/// Limits of a sealed cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedCookieConfig {
    /// How long a sealed value stays openable (its embedded expiry), and the cookie's Max-Age.
    pub lifetime: Duration,
    /// Sealing a value whose encoded form is longer fails with [`SealError::TooLarge`]; longer
    /// values are not even decoded on open. Default [`DEFAULT_MAX_ENCODED_BYTES`].
    pub max_encoded_bytes: usize,
}

impl SealedCookieConfig {
    /// A cookie living `lifetime`, capped at [`DEFAULT_MAX_ENCODED_BYTES`].
    pub fn new(lifetime: Duration) -> Self {
        SealedCookieConfig {
            lifetime,
            max_encoded_bytes: DEFAULT_MAX_ENCODED_BYTES,
        }
    }
}

/// Why a value could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The sealed value would be `size` bytes, over the cap. Keep less state in the cookie, or
    /// move it to the store.
    #[error("sealed cookie would be {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the cookie key ring is empty")]
    NoKey,
    #[error("could not encode the state: {0}")]
    Encode(String),
    #[error("encryption failed")]
    Encrypt,
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// One named cookie whose value is sealed with a [`CookieKeys`] ring.
#[derive(Debug, Clone)]
pub struct SealedCookie {
    name: String,
    keys: CookieKeys,
    config: SealedCookieConfig,
    clock: Clock,
}

impl SealedCookie {
    /// `name` must be a cookie-name token (letters, digits and ``!#$%&'*+-.^_`|~``).
    pub fn new(
        name: impl Into<String>,
        keys: CookieKeys,
        config: SealedCookieConfig,
    ) -> Result<Self, KeyError> {
        let name = name.into();
        let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || name.len() > 64 || !name.bytes().all(token_char) {
            return Err(KeyError::Spec {
                entry: name,
                reason: "not a valid cookie name".into(),
            });
        }
        Ok(SealedCookie {
            name,
            keys,
            config,
            clock: Clock::system(),
        })
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The largest state that fits under the size cap.
    pub fn max_state_bytes(&self) -> usize {
        // base64url without padding: 4 characters per 3 bytes, rounded down.
        (self.config.max_encoded_bytes / 4 * 3
            + (self.config.max_encoded_bytes % 4).saturating_sub(1))
        .saturating_sub(SEAL_OVERHEAD_BYTES)
    }

    /// Seals `state` with the newest key, expiring after the configured lifetime.
    pub fn seal(&self, state: &[u8]) -> Result<String, SealError> {
        let expires = self
            .clock
            .unix_secs()
            .saturating_add(self.config.lifetime.as_secs());
        self.seal_until(state, expires)
    }

    /// Seals `state` to be openable until `expires` (seconds since the Unix epoch).
    pub fn seal_until(&self, state: &[u8], expires: u64) -> Result<String, SealError> {
        let size = encoded_len(SEAL_OVERHEAD_BYTES + state.len());
        if size > self.config.max_encoded_bytes {
            return Err(SealError::TooLarge {
                size,
                limit: self.config.max_encoded_bytes,
            });
        }
        let (id, cipher) = self.keys.newest().ok_or(SealError::NoKey)?;
        let nonce = random::bytes::<NONCE_BYTES>().map_err(|e| SealError::Random(e.to_string()))?;
        let mut plaintext = Vec::with_capacity(EXPIRY_BYTES + state.len());
        plaintext.extend_from_slice(&expires.to_be_bytes());
        plaintext.extend_from_slice(state);
        let ciphertext = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: self.name.as_bytes(),
                },
            )
            .map_err(|_| SealError::Encrypt)?;
        let mut raw = Vec::with_capacity(1 + NONCE_BYTES + ciphertext.len());
        raw.push(*id);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&ciphertext);
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    /// The state sealed in `value`, or `None` if it does not open now (for any reason).
    pub fn open(&self, value: &str) -> Option<Vec<u8>> {
        if value.len() > self.config.max_encoded_bytes {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(value).ok()?;
        if raw.len() < SEAL_OVERHEAD_BYTES {
            return None;
        }
        let (id, rest) = raw.split_first()?;
        let (nonce, ciphertext) = rest.split_at_checked(NONCE_BYTES)?;
        let cipher = self.keys.get(*id)?;
        let nonce = XNonce::try_from(nonce).ok()?;
        let plaintext = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: self.name.as_bytes(),
                },
            )
            .ok()?;
        let (expiry, state) = plaintext.split_at_checked(EXPIRY_BYTES)?;
        let expires = u64::from_be_bytes(expiry.try_into().ok()?);
        (self.clock.unix_secs() < expires).then(|| state.to_vec())
    }

    /// Seals `state` as JSON.
    pub fn seal_json<T: Serialize>(&self, state: &T) -> Result<String, SealError> {
        let bytes = serde_json::to_vec(state).map_err(|e| SealError::Encode(e.to_string()))?;
        self.seal(&bytes)
    }

    /// Opens a value sealed by [`SealedCookie::seal_json`]; `None` if it does not open or does
    /// not parse as `T`.
    pub fn open_json<T: DeserializeOwned>(&self, value: &str) -> Option<T> {
        serde_json::from_slice(&self.open(value)?).ok()
    }

    /// The state in the request's `Cookie` headers: the first cookie of this name that opens.
    pub fn open_request(&self, headers: &HeaderMap) -> Option<Vec<u8>> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|h| h.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == self.name)
            .find_map(|(_, value)| self.open(value.trim_matches('"')))
    }

    /// A `Set-Cookie` value carrying `sealed`: `HttpOnly; Secure; SameSite=Lax; Path=/` and a
    /// `Max-Age` of the configured lifetime.
    pub fn set_cookie(&self, sealed: &str) -> Option<HeaderValue> {
        HeaderValue::from_str(&format!(
            "{}={sealed}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            self.name,
            self.config.lifetime.as_secs()
        ))
        .ok()
    }

    /// A `Set-Cookie` value that deletes the cookie.
    pub fn clear_cookie(&self) -> HeaderValue {
        // The name is a checked token, so the header value is always valid.
        HeaderValue::from_str(&format!(
            "{}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax",
            self.name
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
    }
}

/// Length of the unpadded base64 text of `n` bytes.
fn encoded_len(n: usize) -> usize {
    n / 3 * 4
        + match n % 3 {
            0 => 0,
            r => r + 1,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_matches_the_encoder() {
        for n in 0..100 {
            assert_eq!(encoded_len(n), URL_SAFE_NO_PAD.encode(vec![0u8; n]).len());
        }
    }

    #[test]
    fn max_state_bytes_is_exactly_what_fits() {
        for cap in [100, 101, 102, 103, 4000] {
            let cookie = SealedCookie::new(
                "c",
                CookieKeys::generate(1).unwrap(),
                SealedCookieConfig {
                    lifetime: Duration::from_secs(60),
                    max_encoded_bytes: cap,
                },
            )
            .unwrap();
            let max = cookie.max_state_bytes();
            assert!(cookie.seal(&vec![0; max]).is_ok(), "cap {cap}");
            assert!(
                matches!(
                    cookie.seal(&vec![0; max + 1]),
                    Err(SealError::TooLarge { .. })
                ),
                "cap {cap}"
            );
        }
    }
}
