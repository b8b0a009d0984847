//! Publishing keys as a JWKS, and a client cache of another issuer's JWKS.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::keys::KeyRing;

/// How long clients may cache the JWKS response. Key rotation publishes a new key before it
/// signs anything (see the crate docs), and clients refetch on an unknown `kid`, so this bounds
/// only how long a *removed* key stays trusted by HTTP caches.
pub const JWKS_CACHE_CONTROL: &str = "public, max-age=300";

/// An axum handler serving `keys.jwks()` — public keys only, never an HS256 secret or a private
/// part — as `application/json` with `Cache-Control: public, max-age=300`.
///
/// ```
/// use axum::{Router, routing::get};
/// use statehouse_token::{KeyRing, jwks_handler};
///
/// let ring = KeyRing::generate_ed25519("dev-1").unwrap();
/// let app: Router = Router::new().route("/.well-known/jwks.json", get(jwks_handler(&ring)));
/// ```
pub fn jwks_handler(
    keys: &KeyRing,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    // The ring is immutable, so the document is rendered once.
    let body = bytes_of(&keys.jwks());
    move || {
        std::future::ready(
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    ),
                    (
                        header::CACHE_CONTROL,
                        HeaderValue::from_static(JWKS_CACHE_CONTROL),
                    ),
                ],
                body.clone(),
            )
                .into_response(),
        )
    }
}

fn bytes_of(document: &serde_json::Value) -> axum::body::Bytes {
    // Serializing a `serde_json::Value` cannot fail: its map keys are strings.
    axum::body::Bytes::from(serde_json::to_vec(document).unwrap_or_default())
}

#[cfg(feature = "jwks-client")]
pub use client::{JwksCache, JwksConfig, JwksError, PlainHttp};

#[cfg(feature = "jwks-client")]
mod client {
    use std::collections::HashMap;
    use std::net::IpAddr;
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use reqwest::Url;

    use crate::clock::Clock;
    use crate::error::TokenError;
    use crate::keys::Key;

    /// Whether a JWKS may be fetched over plain HTTP.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PlainHttp {
        /// `https://` only, except for loopback hosts (`127.0.0.0/8`, `::1`, `localhost`), where
        /// nothing travels over a network. The default.
        LoopbackOnly,
        /// `http://` anywhere — only inside a network you trust, since whoever can alter the
        /// response can mint tokens.
        Allow,
    }

    /// How a [`JwksCache`] fetches and for how long it trusts what it fetched.
    #[derive(Debug, Clone)]
    pub struct JwksConfig {
        /// After any fetch (successful or not), no other fetch for this long: a flood of tokens
        /// with made-up `kid`s costs the issuer at most one request per cooldown. Default 30 s.
        pub cooldown: Duration,
        /// A key set older than this is refetched before use, so keys removed by the issuer stop
        /// being trusted. If that fetch fails, the old keys keep working. Default 5 min.
        pub max_age: Duration,
        /// Per-request deadline. Default 5 s.
        pub timeout: Duration,
        /// Larger responses are refused. Default 256 KiB.
        pub max_body_bytes: usize,
        pub plain_http: PlainHttp,
    }

    impl JwksConfig {
        pub fn new() -> Self {
            JwksConfig {
                cooldown: Duration::from_secs(30),
                max_age: Duration::from_secs(300),
                timeout: Duration::from_secs(5),
                max_body_bytes: 256 * 1024,
                plain_http: PlainHttp::LoopbackOnly,
            }
        }
    }

    impl Default for JwksConfig {
        fn default() -> Self {
            Self::new()
        }
    }

    /// Why a key set could not be fetched or used.
    #[derive(Debug, thiserror::Error)]
    pub enum JwksError {
        #[error("JWKS URL {url:?}: {reason}")]
        Url { url: String, reason: String },
        #[error("building the HTTP client: {0}")]
        Client(String),
        #[error("fetching {url}: {reason}")]
        Fetch { url: String, reason: String },
    }

    #[derive(Default)]
    struct Cached {
        keys: HashMap<String, Arc<Key>>,
        /// When the keys were fetched (clock time); `None` before the first success.
        fetched_at: Option<Duration>,
    }

    struct Inner {
        url: Url,
        client: reqwest::Client,
        config: JwksConfig,
        // std RwLock: held only to copy an `Arc` out or swap the map, never across an await.
        cached: RwLock<Cached>,
        /// Held (across the fetch's await, hence tokio's mutex) by the one task that fetches;
        /// holds the clock time of the last fetch attempt, for the cooldown.
        fetching: tokio::sync::Mutex<Option<Duration>>,
    }

    /// Keys of a remote issuer, fetched from its JWKS URL and cached by `kid`.
    ///
    /// A token with a `kid` not in the cache triggers a refetch, at most once per cooldown;
    /// concurrent misses wait for that one fetch instead of starting their own. Cheap to clone:
    /// clones share the cache.
    #[derive(Clone)]
    pub struct JwksCache {
        inner: Arc<Inner>,
        clock: Clock,
    }

    impl std::fmt::Debug for JwksCache {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("JwksCache")
                .field("url", &self.inner.url.as_str())
                .field("kids", &self.kids())
                .finish_non_exhaustive()
        }
    }

    impl JwksCache {
        /// A cache of the key set at `url`. Nothing is fetched until a key is needed (or
        /// [`JwksCache::refresh`] is called).
        pub fn new(url: &str, config: JwksConfig) -> Result<Self, JwksError> {
            let url_err = |reason: &str| JwksError::Url {
                url: url.to_owned(),
                reason: reason.to_owned(),
            };
            let parsed = Url::parse(url).map_err(|e| url_err(&e.to_string()))?;
            match parsed.scheme() {
                "https" => {}
                "http" if config.plain_http == PlainHttp::Allow || is_loopback(&parsed) => {}
                "http" => {
                    return Err(url_err(
                        "plain http to a non-loopback host (use https, or PlainHttp::Allow)",
                    ));
                }
                _ => return Err(url_err("the scheme must be https (or http)")),
            }
            let client = reqwest::Client::builder()
                .timeout(config.timeout)
                // The key set comes from exactly the configured URL.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| JwksError::Client(e.to_string()))?;
            Ok(JwksCache {
                inner: Arc::new(Inner {
                    url: parsed,
                    client,
                    config,
                    cached: RwLock::new(Cached::default()),
                    fetching: tokio::sync::Mutex::new(None),
                }),
                clock: Clock::system(),
            })
        }

        /// Reads time (cooldown, max age) from `clock` instead of the system clock.
        pub fn with_clock(mut self, clock: Clock) -> Self {
            self.clock = clock;
            self
        }

        /// The `kid`s currently cached.
        pub fn kids(&self) -> Vec<String> {
            let mut kids: Vec<String> = self.read().keys.keys().cloned().collect();
            kids.sort();
            kids
        }

        /// The key `kid`, fetching the key set if it is not cached (or is older than `max_age`)
        /// and the cooldown allows.
        pub async fn key(&self, kid: &str) -> Result<Arc<Key>, TokenError> {
            let now = self.clock.now();
            if let Some(key) = self.cached_key(kid, now, true) {
                return Ok(key);
            }
            let mut last_attempt = self.inner.fetching.lock().await;
            // Another task may have fetched while this one waited for the lock.
            if let Some(key) = self.cached_key(kid, now, true) {
                return Ok(key);
            }
            let cooling = last_attempt.is_some_and(|at| now < at + self.inner.config.cooldown);
            if !cooling {
                *last_attempt = Some(now);
                match self.fetch().await {
                    Ok(keys) => self.store(keys, now),
                    Err(e) => {
                        tracing::warn!(error = %e, "JWKS fetch failed");
                        drop(last_attempt);
                        return self
                            .cached_key(kid, now, false)
                            .ok_or(TokenError::KeysUnavailable(e.to_string()));
                    }
                }
            }
            drop(last_attempt);
            // Within the cooldown a stale key still serves; an unknown kid stays unknown.
            self.cached_key(kid, now, false)
                .ok_or(TokenError::UnknownKid)
        }

        /// Fetches the key set now, ignoring the cooldown, and returns how many keys it holds.
        pub async fn refresh(&self) -> Result<usize, JwksError> {
            let mut last_attempt = self.inner.fetching.lock().await;
            let now = self.clock.now();
            *last_attempt = Some(now);
            let keys = self.fetch().await?;
            let count = keys.len();
            self.store(keys, now);
            Ok(count)
        }

        fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
            // The map is replaced whole under the write lock, so a poisoned lock still guards
            // a consistent value.
            self.inner.cached.read().unwrap_or_else(|p| p.into_inner())
        }

        fn cached_key(&self, kid: &str, now: Duration, fresh_only: bool) -> Option<Arc<Key>> {
            let cached = self.read();
            let fresh = cached
                .fetched_at
                .is_some_and(|at| now < at + self.inner.config.max_age);
            if fresh_only && !fresh {
                return None;
            }
            cached.keys.get(kid).cloned()
        }

        fn store(&self, keys: HashMap<String, Arc<Key>>, now: Duration) {
            let mut cached = self.inner.cached.write().unwrap_or_else(|p| p.into_inner());
            *cached = Cached {
                keys,
                fetched_at: Some(now),
            };
        }

        async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, JwksError> {
            let url = self.inner.url.as_str();
            let fail = |reason: String| JwksError::Fetch {
                url: url.to_owned(),
                reason,
            };
            let mut response = self
                .inner
                .client
                .get(self.inner.url.clone())
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| fail(e.to_string()))?;
            if !response.status().is_success() {
                return Err(fail(format!("status {}", response.status())));
            }
            let limit = self.inner.config.max_body_bytes;
            if response.content_length().is_some_and(|n| n > limit as u64) {
                return Err(fail(format!("response over {limit} bytes")));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| fail(e.to_string()))? {
                if body.len() + chunk.len() > limit {
                    return Err(fail(format!("response over {limit} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            parse_key_set(&body).map_err(fail)
        }
    }

    /// The usable keys of a JWKS document. Keys this crate cannot or must not use (symmetric,
    /// unsupported curve, RSA under 2048 bits, no `kid`, ...) are skipped with a log line; a
    /// document that is not a key set at all is an error.
    fn parse_key_set(body: &[u8]) -> Result<HashMap<String, Arc<Key>>, String> {
        let document: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let entries = document
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("no \"keys\" array")?;
        let mut keys = HashMap::new();
        for entry in entries {
            match Key::from_jwk(entry) {
                Ok(key) => {
                    let kid = key.kid().to_owned();
                    if keys.insert(kid.clone(), Arc::new(key)).is_some() {
                        // Which of two keys with one kid is meant cannot be known: use neither.
                        tracing::warn!(%kid, "JWKS lists a kid twice; ignoring it");
                        keys.remove(&kid);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "skipping a JWKS entry"),
            }
        }
        Ok(keys)
    }

    fn is_loopback(url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        // IPv6 hosts come bracketed: `[::1]`.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn plain_http_only_to_loopback_by_default() {
            for ok in [
                "https://issuer.example/jwks",
                "http://127.0.0.1:8080/jwks",
                "http://127.9.9.9/jwks",
                "http://[::1]:1/jwks",
                "http://localhost/jwks",
            ] {
                assert!(JwksCache::new(ok, JwksConfig::new()).is_ok(), "{ok}");
            }
            for bad in [
                "http://issuer.example/jwks",
                "http://10.0.0.1/jwks",
                "ftp://127.0.0.1/jwks",
                "not a url",
            ] {
                assert!(JwksCache::new(bad, JwksConfig::new()).is_err(), "{bad}");
            }
            let allow = JwksConfig {
                plain_http: PlainHttp::Allow,
                ..JwksConfig::new()
            };
            assert!(JwksCache::new("http://issuer.example/jwks", allow).is_ok());
        }

        #[test]
        fn key_sets_skip_unusable_keys() {
            let ring = crate::KeyRing::generate_ed25519("good").unwrap();
            let good = ring.jwks()["keys"][0].clone();
            let mut short = good.clone();
            short["kid"] = "short".into();
            short["x"] = "AAAA".into(); // 3 bytes: jsonwebtoken would slice out of bounds
            let mut no_kid = good.clone();
            no_kid.as_object_mut().unwrap().remove("kid");
            let oct = serde_json::json!({"kty":"oct","kid":"hmac","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"});
            let mut wrong_alg = good.clone();
            wrong_alg["kid"] = "wrong-alg".into();
            wrong_alg["alg"] = "RS256".into();
            let mut enc = good.clone();
            enc["kid"] = "enc".into();
            enc["use"] = "enc".into();
            let doc = serde_json::json!({"keys": [good, short, no_kid, oct, wrong_alg, enc, 42]});
            let keys = parse_key_set(doc.to_string().as_bytes()).unwrap();
            assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["good"]);

            let mut twice = ring.jwks();
            let dup = twice["keys"][0].clone();
            twice["keys"].as_array_mut().unwrap().push(dup);
            assert!(
                parse_key_set(twice.to_string().as_bytes())
                    .unwrap()
                    .is_empty()
            );

            assert!(parse_key_set(b"[]").is_err());
            assert!(parse_key_set(b"{\"keys\":{}}").is_err());
            assert!(parse_key_set(b"\xff").is_err());
        }
    }
}
