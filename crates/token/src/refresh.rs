//! Rotating refresh tokens, stored by family, with reuse detection.
//!
//! A login starts a *family*. The family is one field map in the store, `rt:{family}`:
//!
//! | field     | value                                              |
//! |-----------|----------------------------------------------------|
//! | `sub`     | the subject                                        |
//! | `gen`     | the current generation, decimal                    |
//! | `hash`    | SHA-256 of the current secret, base64url           |
//! | `revoked` | `0`, or `1` once the family is revoked             |
//! | `created` | when the family started, seconds since the epoch   |
//!
//! The token the client holds is `{family}.{generation}.{secret}` (family: 128 random bits,
//! secret: 256 random bits, both base64url). Only the hash of the secret is stored, so a copy of
//! the store does not hold usable tokens.
//!
//! Rotating a token is one `map_patch` that requires the `gen` and `revoked` fields to still
//! carry the versions read (compare-and-set), so of two refreshes presenting the same token at
//! the same moment exactly one wins. Every token is single-use: presenting a token that is no
//! longer current — an older generation, a wrong secret, or the loser of such a race — is
//! treated as theft and revokes the family, including its newest token (OAuth 2.0 Security
//! BCP, refresh token rotation). Clients must therefore not refresh concurrently with one token.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use statehouse_store::{
    Conflict, Existence, FieldCondition, FieldMap, MapPatch, ReadState, Store, StoreError,
    UnavailableKind,
};

use crate::clock::Clock;
use crate::error::RefreshError;
use crate::random;

const FAMILY_BYTES: usize = 16;
const SECRET_BYTES: usize = 32;
/// Length of the base64url text of `FAMILY_BYTES` and `SECRET_BYTES`.
const FAMILY_CHARS: usize = 22;
const SECRET_CHARS: usize = 43;

/// How long refresh tokens live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshConfig {
    /// A family unused for this long expires (the store TTL, renewed on every rotation).
    pub idle_lifetime: Duration,
    /// A family older than this is refused however recently it was used: the user logs in again.
    pub absolute_lifetime: Duration,
}

impl RefreshConfig {
    /// 14 days idle, 90 days absolute.
    pub fn new() -> Self {
        RefreshConfig {
            idle_lifetime: Duration::from_secs(14 * 24 * 3600),
            absolute_lifetime: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// A refresh token handed to a client, and what it stands for.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshGrant {
    /// The opaque token for the client.
    pub token: String,
    pub family: String,
    pub generation: u64,
    pub subject: String,
    /// Until the family expires if unused.
    pub expires_in: Duration,
}

impl std::fmt::Debug for RefreshGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer secret: keep it out of logs.
        f.debug_struct("RefreshGrant")
            .field("family", &self.family)
            .field("generation", &self.generation)
            .field("subject", &self.subject)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Issues, rotates and revokes refresh tokens in a shared store.
#[derive(Debug, Clone)]
pub struct RefreshTokens {
    store: Store,
    config: RefreshConfig,
    clock: Clock,
}

impl RefreshTokens {
    pub fn new(store: Store, config: RefreshConfig) -> Self {
        RefreshTokens {
            store,
            config,
            clock: Clock::system(),
        }
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Starts a new family for `subject` (at login) and returns its first token.
    pub async fn issue(&self, subject: &str) -> Result<RefreshGrant, RefreshError> {
        if subject.is_empty() {
            return Err(RefreshError::EmptySubject);
        }
        let family = URL_SAFE_NO_PAD.encode(random::bytes::<FAMILY_BYTES>().map_err(random_error)?);
        let secret = random::bytes::<SECRET_BYTES>().map_err(random_error)?;
        let ttl = self.config.idle_lifetime.min(self.config.absolute_lifetime);
        let patch = MapPatch::new()
            .existence(Existence::MustNotExist)
            .set("sub", subject.to_owned())
            .set("gen", "0")
            .set("hash", hash(&secret))
            .set("revoked", "0")
            .set("created", self.clock.unix_secs().to_string())
            .ttl(ttl);
        self.store
            .map_patch(&family_key(&family), &patch)
            .await
            .map_err(RefreshError::from_store)?;
        Ok(grant(family, 0, &secret, subject.to_owned(), ttl))
    }

    /// Exchanges the current token of a family for the next one.
    ///
    /// `Reused` means the token had already been used (or its secret was wrong): the family is
    /// now revoked. `Unknown` means the family expired or never existed.
    pub async fn rotate(&self, token: &str) -> Result<RefreshGrant, RefreshError> {
        let presented = Presented::parse(token).ok_or(RefreshError::Malformed)?;
        let key = family_key(&presented.family);
        let family = self.read_family(&key).await?;
        if family.revoked {
            return Err(RefreshError::Revoked);
        }
        let now = self.clock.unix_secs();
        let age = Duration::from_secs(now.saturating_sub(family.created));
        if age >= self.config.absolute_lifetime {
            return Err(RefreshError::Expired);
        }
        if presented.generation != family.generation || hash(&presented.secret) != family.hash {
            self.revoke_key(&key).await?;
            return Err(RefreshError::Reused);
        }
        let next = family
            .generation
            .checked_add(1)
            .ok_or(RefreshError::Malformed)?;
        let secret = random::bytes::<SECRET_BYTES>().map_err(random_error)?;
        let ttl = self
            .config
            .idle_lifetime
            .min(self.config.absolute_lifetime - age);
        let patch = MapPatch::new()
            .existence(Existence::MustExist)
            .require("gen", FieldCondition::Version(family.gen_version))
            .require("revoked", FieldCondition::Version(family.revoked_version))
            .set("gen", next.to_string())
            .set("hash", hash(&secret))
            .ttl(ttl.max(Duration::from_secs(1)));
        match self.store.map_patch(&key, &patch).await {
            Ok(_) => Ok(grant(presented.family, next, &secret, family.subject, ttl)),
            Err(StoreError::Conflict(Conflict::NotFound)) => Err(RefreshError::Unknown),
            Err(StoreError::Conflict(Conflict::VersionMismatch { field }))
                if field.as_deref() == Some("revoked") =>
            {
                Err(RefreshError::Revoked)
            }
            Err(StoreError::Conflict(_)) => {
                // Another request rotated this very token between our read and our write: the
                // token was presented twice.
                self.revoke_key(&key).await?;
                Err(RefreshError::Reused)
            }
            Err(e) => Err(RefreshError::from_store(e)),
        }
    }

    /// Revokes the family a token belongs to (logout). A token that is not ours is `Malformed`;
    /// the secret is not checked, since revoking is what its holder asks for either way.
    /// Returns false when the family no longer exists.
    pub async fn revoke(&self, token: &str) -> Result<bool, RefreshError> {
        let presented = Presented::parse(token).ok_or(RefreshError::Malformed)?;
        self.revoke_family(&presented.family).await
    }

    /// Revokes a family by id (an administrator logging a user out everywhere keeps the ids of
    /// the user's families). Returns false when the family no longer exists.
    pub async fn revoke_family(&self, family: &str) -> Result<bool, RefreshError> {
        if !is_base64url_of(family, FAMILY_CHARS) {
            return Err(RefreshError::Malformed);
        }
        self.revoke_key(&family_key(family)).await
    }

    /// Marks the family revoked; the map keeps its TTL, so a revoked family still answers
    /// `Revoked` (not `Unknown`) until it would have expired.
    async fn revoke_key(&self, key: &str) -> Result<bool, RefreshError> {
        let patch = MapPatch::new()
            .existence(Existence::MustExist)
            .set("revoked", "1");
        match self.store.map_patch(key, &patch).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict(Conflict::NotFound)) => Ok(false),
            Err(e) => Err(RefreshError::from_store(e)),
        }
    }

    async fn read_family(&self, key: &str) -> Result<Family, RefreshError> {
        let read = self
            .store
            .map_read(key)
            .await
            .map_err(RefreshError::from_store)?;
        if read.state != ReadState::Fresh {
            // A degraded or stale answer cannot decide a rotation; the write would fail anyway.
            return Err(RefreshError::Unavailable(StoreError::Unavailable {
                store: self.store.describe().to_owned(),
                kind: UnavailableKind::Connection,
                detail: format!("refresh family read was {:?}", read.state),
            }));
        }
        let map = read.into_inner().ok_or(RefreshError::Unknown)?;
        Family::from_map(&map).ok_or_else(|| {
            RefreshError::Store(StoreError::Corrupt {
                store: self.store.describe().to_owned(),
                key: key.to_owned(),
                reason: "refresh family lacks a field or has a malformed one".into(),
            })
        })
    }
}

/// A family as read from the store.
struct Family {
    subject: String,
    generation: u64,
    gen_version: u64,
    hash: String,
    revoked: bool,
    revoked_version: u64,
    created: u64,
}

impl Family {
    fn from_map(map: &FieldMap) -> Option<Family> {
        let text = |field: &str| {
            map.get(field)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        };
        let gen_field = map.fields.get("gen")?;
        let revoked_field = map.fields.get("revoked")?;
        Some(Family {
            subject: text("sub")?,
            generation: std::str::from_utf8(&gen_field.value).ok()?.parse().ok()?,
            gen_version: gen_field.version,
            hash: text("hash")?,
            revoked: revoked_field.value.as_ref() == b"1",
            revoked_version: revoked_field.version,
            created: text("created")?.parse().ok()?,
        })
    }
}

/// A token as presented by a client.
struct Presented {
    family: String,
    generation: u64,
    secret: [u8; SECRET_BYTES],
}

impl Presented {
    fn parse(token: &str) -> Option<Presented> {
        // The longest valid token: family, two dots, 20 digits, secret.
        if token.len() > FAMILY_CHARS + SECRET_CHARS + 22 {
            return None;
        }
        let mut parts = token.split('.');
        let (Some(family), Some(generation), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !is_base64url_of(family, FAMILY_CHARS)
            || generation.is_empty()
            || !generation.bytes().all(|b| b.is_ascii_digit())
            || (generation.len() > 1 && generation.starts_with('0'))
        {
            return None;
        }
        let generation = generation.parse().ok()?;
        let secret: [u8; SECRET_BYTES] = URL_SAFE_NO_PAD.decode(secret).ok()?.try_into().ok()?;
        Some(Presented {
            family: family.to_owned(),
            generation,
            secret,
        })
    }
}

/// True if `s` is exactly the canonical base64url text of `chars` characters.
fn is_base64url_of(s: &str, chars: usize) -> bool {
    s.len() == chars
        && URL_SAFE_NO_PAD
            .decode(s)
            .is_ok_and(|bytes| URL_SAFE_NO_PAD.encode(bytes) == s)
}

fn grant(
    family: String,
    generation: u64,
    secret: &[u8],
    subject: String,
    expires_in: Duration,
) -> RefreshGrant {
    RefreshGrant {
        token: format!("{family}.{generation}.{}", URL_SAFE_NO_PAD.encode(secret)),
        family,
        generation,
        subject,
        expires_in,
    }
}

fn family_key(family: &str) -> String {
    format!("rt:{family}")
}

/// The stored form of a secret. Comparing hashes need not be constant-time: timing could at most
/// reveal how much of the SHA-256 of a guess matches the stored hash, which does not help find a
/// secret with that hash.
fn hash(secret: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(secret))
}

fn random_error(e: getrandom::Error) -> RefreshError {
    RefreshError::Random(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(family: &str, generation: &str, secret: &[u8]) -> String {
        format!("{family}.{generation}.{}", URL_SAFE_NO_PAD.encode(secret))
    }

    #[test]
    fn parses_only_canonical_tokens() {
        let family = URL_SAFE_NO_PAD.encode([7u8; FAMILY_BYTES]);
        let secret = [9u8; SECRET_BYTES];
        let ok = token(&family, "12", &secret);
        let p = Presented::parse(&ok).expect("canonical token parses");
        assert_eq!((p.family.as_str(), p.generation), (family.as_str(), 12));
        assert_eq!(p.secret, secret);

        for bad in [
            String::new(),
            "..".into(),
            token(&family, "", &secret),
            token(&family, "012", &secret),
            token(&family, "+1", &secret),
            token(&family, "-1", &secret),
            token(&family, "99999999999999999999", &secret),
            token(&family[1..], "1", &secret),
            token(&format!("{family}="), "1", &secret),
            token(&family, "1", &secret[1..]),
            format!("{ok}."),
            format!("{ok}x"),
            ok.replace('.', ","),
        ] {
            assert!(Presented::parse(&bad).is_none(), "{bad:?}");
        }
    }
}
