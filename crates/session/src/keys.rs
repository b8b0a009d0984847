//! The session cookie: an opaque random id, signed with a key ring.
//!
//! Wire format (all ASCII, URL-safe):
//!
//! ```text
//! {id: 22 chars base64url of 16 random bytes}.{created: unix seconds}.{kid}.{mac: 43 chars}
//! mac = HMAC-SHA256(key[kid], "statehouse-session/v1|{cookie name}|{id}.{created}.{kid}")
//! ```
//!
//! The newest key signs; every key in the ring verifies, so keys rotate
//! without logging anybody out: add a new key in front, deploy, and remove
//! the old one once `absolute_ttl` has passed. The cookie name is bound into
//! the MAC so a value cannot be replayed under another cookie. `created` lets
//! a cookie older than the absolute lifetime be refused without a store call.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Minimum secret length: 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;
/// No cookie value longer than this is even parsed.
const MAX_COOKIE_VALUE: usize = 160;

/// An id's text: 16 bytes in unpadded base64url.
const ID_CHARS: usize = 22;
/// An HMAC-SHA256 tag's text: 32 bytes in unpadded base64url.
const TAG_CHARS: usize = 43;

/// An opaque 128-bit session id. It is a bearer secret: it is never logged
/// (its `Debug` is redacted) and never exposed to handlers. Held as its
/// text, inline: a request's copies of it allocate nothing.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct SessionId([u8; ID_CHARS]);

impl SessionId {
    pub(crate) fn random() -> Self {
        let mut bytes = [0u8; 16];
        // The OS random source failing is not recoverable and must not be
        // papered over with a weaker id.
        getrandom::fill(&mut bytes).expect("the OS random number generator is available");
        let mut text = [0u8; ID_CHARS];
        let written = URL_SAFE_NO_PAD
            .encode_slice(bytes, &mut text)
            .expect("16 bytes are 22 characters of base64");
        debug_assert_eq!(written, ID_CHARS);
        SessionId(text)
    }

    /// The id whose text is `text`: exactly 22 characters of canonical
    /// base64url that decode to 16 bytes.
    fn parse(text: &str) -> Option<Self> {
        let chars: [u8; ID_CHARS] = text.as_bytes().try_into().ok()?;
        // Room for base64's estimate of 22 characters (18 bytes).
        let mut bytes = [0u8; 18];
        match URL_SAFE_NO_PAD.decode_slice(chars, &mut bytes) {
            Ok(16) => Some(SessionId(chars)),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only `random` and `parse` build one, both from base64url text.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

/// One signing key.
#[derive(Clone)]
struct Key {
    kid: String,
    /// HMAC keyed with the key's secret, the domain prefix absorbed: each
    /// cookie's MAC starts from a copy of it, so the secret's inner and
    /// outer pads are hashed once per ring, not once per request (and the
    /// secret itself is not kept).
    keyed: HmacSha256,
}

/// What every cookie MAC starts with: the format's domain separation.
const MAC_DOMAIN: &[u8] = b"statehouse-session/v1|";

impl Key {
    /// Checks the key id and the secret's length, and keys the HMAC.
    fn new(kid: String, secret: &[u8]) -> Result<Key, KeyError> {
        if kid.is_empty()
            || kid.len() > 16
            || !kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(KeyError(format!(
                "key id {kid:?} must be 1-16 characters of [A-Za-z0-9_-]"
            )));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError(format!(
                "key {kid:?} is {} bytes; at least {MIN_SECRET_BYTES} are required",
                secret.len()
            )));
        }
        let mut keyed = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        keyed.update(MAC_DOMAIN);
        Ok(Key { kid, keyed })
    }
}

/// The key ring for session cookies: newest first.
#[derive(Clone)]
pub struct SessionKeys {
    keys: Vec<Key>,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("SessionKeys").field("kids", &kids).finish()
    }
}

/// Why a key ring could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session keys: {}", self.0)
    }
}

impl std::error::Error for KeyError {}

impl SessionKeys {
    /// A ring from `(kid, secret)` pairs, newest first. Key ids are 1–16
    /// characters of `[A-Za-z0-9_-]`; secrets at least 32 bytes.
    pub fn new<I, K, S>(keys: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = (K, S)>,
        K: Into<String>,
        S: Into<Vec<u8>>,
    {
        let keys = keys
            .into_iter()
            .map(|(kid, secret)| Key::new(kid.into(), &secret.into()))
            .collect::<Result<Vec<Key>, KeyError>>()?;
        if keys.is_empty() {
            return Err(KeyError("the ring needs at least one key".into()));
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.kid == key.kid) {
                return Err(KeyError(format!("key id {:?} appears twice", key.kid)));
            }
        }
        Ok(SessionKeys { keys })
    }

    /// Parses `kid:base64secret[,kid:base64secret...]` (newest first), the
    /// format of the `STATEHOUSE_SESSION_KEYS` variable or a keys file.
    pub fn parse(spec: &str) -> Result<Self, KeyError> {
        let mut pairs = Vec::new();
        for (n, item) in spec
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let (kid, secret) = item
                .split_once(':')
                .ok_or_else(|| KeyError(format!("entry {} is not kid:base64secret", n + 1)))?;
            let secret = base64::engine::general_purpose::STANDARD
                .decode(secret.trim())
                .or_else(|_| URL_SAFE_NO_PAD.decode(secret.trim()))
                .map_err(|_| KeyError(format!("the secret of key {kid:?} is not base64")))?;
            pairs.push((kid.trim().to_owned(), secret));
        }
        Self::new(pairs)
    }

    /// Reads the ring from an environment variable.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let spec = std::env::var(var).map_err(|_| KeyError(format!("{var} is not set")))?;
        Self::parse(&spec)
    }

    /// Reads the ring from a file (same format; one key per line allowed).
    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let spec = std::fs::read_to_string(path)
            .map_err(|e| KeyError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&spec)
    }

    /// A ring with one fresh random key: for tests and local development
    /// only (every restart logs everybody out).
    pub fn generate(kid: &str) -> Self {
        let mut secret = vec![0u8; 32];
        getrandom::fill(&mut secret).expect("the OS random number generator is available");
        Self::new([(kid.to_owned(), secret)]).expect("a generated key is well-formed")
    }

    fn mac(key: &Key, cookie_name: &str, payload: &str) -> HmacSha256 {
        let mut mac = key.keyed.clone();
        mac.update(cookie_name.as_bytes());
        mac.update(b"|");
        mac.update(payload.as_bytes());
        mac
    }

    /// The cookie value for `id`, signed by the newest key.
    pub(crate) fn sign(&self, cookie_name: &str, id: &SessionId, created_secs: u64) -> String {
        let key = &self.keys[0];
        let payload = format!("{}.{created_secs}.{}", id.as_str(), key.kid);
        let tag = Self::mac(key, cookie_name, &payload)
            .finalize()
            .into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks a cookie value. Never panics, whatever the input.
    pub(crate) fn verify(&self, cookie_name: &str, value: &str) -> Result<Verified, Rejection> {
        if value.len() > MAX_COOKIE_VALUE || !value.is_ascii() {
            return Err(Rejection::Malformed);
        }
        let Some((payload, tag)) = value.rsplit_once('.') else {
            return Err(Rejection::Malformed);
        };
        let mut parts = payload.split('.');
        let (Some(id), Some(created), Some(kid), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Rejection::Malformed);
        };
        let parsed = SessionId::parse(id);
        let Ok(created_secs) = created.parse::<u64>() else {
            return Err(Rejection::Malformed);
        };
        // Decoded on the stack; room for base64's estimate of 43 characters.
        let mut tag_bytes = [0u8; 33];
        let tag = match URL_SAFE_NO_PAD.decode_slice(tag, &mut tag_bytes) {
            Ok(n) if tag.len() == TAG_CHARS => &tag_bytes[..n],
            _ => return Err(Rejection::Malformed),
        };
        let Some(id) = parsed else {
            return Err(Rejection::Malformed);
        };
        let Some(key) = self.keys.iter().find(|k| k.kid == kid) else {
            return Err(Rejection::UnknownKey);
        };
        // `verify_slice` compares in constant time.
        Self::mac(key, cookie_name, payload)
            .verify_slice(tag)
            .map_err(|_| Rejection::BadSignature)?;
        Ok(Verified { id, created_secs })
    }
}

/// A cookie that passed verification.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) id: SessionId,
    pub(crate) created_secs: u64,
}

/// Why a cookie was not accepted. Each is counted in
/// `statehouse_session_cookie_rejected_total{reason}`; none is an error for
/// the client: the request simply has no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    UnknownKey,
    BadSignature,
    Expired,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnknownKey => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(kid: &str, byte: u8) -> SessionKeys {
        SessionKeys::new([(kid, vec![byte; 32])]).unwrap()
    }

    /// The tag is HMAC-SHA256(secret, "statehouse-session/v1|" + cookie
    /// name + "|" + payload), however the MAC is computed: cookies issued
    /// by earlier builds keep verifying.
    #[test]
    fn the_tag_is_the_documented_hmac() {
        let id = SessionId::random();
        let value = ring("k1", 9).sign("sid", &id, 1_764_633_600);
        let (payload, tag) = value.rsplit_once('.').unwrap();
        assert_eq!(payload, format!("{}.1764633600.k1", id.as_str()));
        let mut mac = HmacSha256::new_from_slice(&[9; 32]).unwrap();
        mac.update(format!("statehouse-session/v1|sid|{payload}").as_bytes());
        let want = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(tag, want);
    }

    #[test]
    fn signs_and_verifies() {
        let keys = ring("k1", 1);
        let id = SessionId::random();
        let value = keys.sign("sid", &id, 1_700_000_000);
        let ok = keys.verify("sid", &value).unwrap();
        assert_eq!(ok.id, id);
        assert_eq!(ok.created_secs, 1_700_000_000);
    }

    #[test]
    fn rotation_old_keys_verify_new_key_signs() {
        let old = ring("old", 1);
        let id = SessionId::random();
        let issued_before = old.sign("sid", &id, 1);
        let rotated = SessionKeys::new([("new", vec![2u8; 32]), ("old", vec![1u8; 32])]).unwrap();
        assert!(rotated.verify("sid", &issued_before).is_ok());
        let issued_after = rotated.sign("sid", &id, 1);
        assert!(issued_after.contains(".new."));
        assert_eq!(
            old.verify("sid", &issued_after).unwrap_err(),
            Rejection::UnknownKey
        );
    }

    #[test]
    fn tampered_truncated_foreign_and_garbage_are_rejected() {
        let keys = ring("k1", 1);
        let id = SessionId::random();
        let value = keys.sign("sid", &id, 5);
        // Flip one character of the id.
        let mut tampered = value.clone().into_bytes();
        tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            keys.verify("sid", &tampered).unwrap_err(),
            Rejection::BadSignature
        );
        // A later `created` (to dodge expiry) breaks the MAC too.
        let bumped = value.replacen(".5.", ".9999999999.", 1);
        assert_eq!(
            keys.verify("sid", &bumped).unwrap_err(),
            Rejection::BadSignature
        );
        // A tag cut short or lengthened is not an HMAC-SHA256 tag at all.
        assert_eq!(
            keys.verify("sid", &value[..value.len() - 3]).unwrap_err(),
            Rejection::Malformed
        );
        assert_eq!(
            keys.verify("sid", &format!("{value}A")).unwrap_err(),
            Rejection::Malformed
        );
        assert_eq!(
            keys.verify("other_cookie", &value).unwrap_err(),
            Rejection::BadSignature,
            "bound to the cookie name"
        );
        let foreign = SessionKeys::new([("k1", vec![9u8; 32])]).unwrap();
        assert_eq!(
            foreign.verify("sid", &value).unwrap_err(),
            Rejection::BadSignature
        );
        for garbage in [
            "",
            ".",
            "...",
            "a.b.c.d",
            "a.b.c.d.e",
            &"x".repeat(1000),
            "é.1.k1.x",
        ] {
            assert!(keys.verify("sid", garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn key_ring_rules() {
        assert!(SessionKeys::new(Vec::<(String, Vec<u8>)>::new()).is_err());
        assert!(
            SessionKeys::new([("k", vec![0u8; 31])]).is_err(),
            "short secret"
        );
        assert!(SessionKeys::new([("bad kid", vec![0u8; 32])]).is_err());
        assert!(SessionKeys::new([("a", vec![0u8; 32]), ("a", vec![1u8; 32])]).is_err());
        let spec = format!(
            "new:{}, old:{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
            base64::engine::general_purpose::STANDARD.encode([8u8; 40])
        );
        let keys = SessionKeys::parse(&spec).unwrap();
        assert_eq!(
            format!("{keys:?}"),
            r#"SessionKeys { kids: ["new", "old"] }"#
        );
        assert!(SessionKeys::parse("nocolon").is_err());
        assert!(SessionKeys::parse("k:!!!notbase64").is_err());
    }

    #[test]
    fn ids_are_random_and_redacted() {
        let a = SessionId::random();
        let b = SessionId::random();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "SessionId(<redacted>)");
        assert_eq!(a.as_str().len(), 22);
        assert_eq!(SessionId::parse(a.as_str()), Some(a.clone()));
    }

    #[test]
    fn only_canonical_ids_of_16_bytes_parse() {
        let id = SessionId::random();
        let text = id.as_str();
        // The last character carries 2 bits of the 16th byte and 4 unused
        // bits, which must be zero: "A" and "B" differ only in those.
        let canonical = format!("{}A", &text[..21]);
        assert!(SessionId::parse(&canonical).is_some());
        let trailing_bits = format!("{}B", &text[..21]);
        assert!(SessionId::parse(&trailing_bits).is_none());
        assert!(SessionId::parse(&text[..21]).is_none());
        assert!(SessionId::parse(&format!("{text}A")).is_none());
        assert!(SessionId::parse(&format!("{}=", &text[..21])).is_none());
        assert!(SessionId::parse(&format!("{}+", &text[..21])).is_none());
        assert!(SessionId::parse("").is_none());
    }
}
