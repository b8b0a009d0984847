//! Signing keys and the key ring.
//!
//! A [`Key`] is one JOSE key: a `kid`, exactly one algorithm, the private part when this process
//! may sign with it, and the public part (or the shared secret, for HS256) to verify with. A
//! [`KeyRing`] is an ordered list of keys: the newest key that has a private part signs, and every
//! key verifies. Keys are never chosen by the token: the verifier looks the token's `kid` up in
//! its own ring and requires the token's `alg` to equal that key's algorithm.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use crate::random;

/// The algorithms this crate signs and verifies with. `none` is not one of them, and neither is
/// anything else a token may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigningAlg {
    /// Ed25519 signatures (RFC 8037). The default: small keys, fast, deterministic.
    EdDSA,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256; keys of at least 2048 bits.
    RS256,
    /// HMAC-SHA-256 with a shared secret of at least 32 bytes. Only for a closed set of services
    /// that all hold the secret: an HS256 key is never published in a JWKS.
    HS256,
}

impl SigningAlg {
    /// The JOSE name (`"EdDSA"`, `"ES256"`, `"RS256"`, `"HS256"`).
    pub fn name(self) -> &'static str {
        match self {
            SigningAlg::EdDSA => "EdDSA",
            SigningAlg::ES256 => "ES256",
            SigningAlg::RS256 => "RS256",
            SigningAlg::HS256 => "HS256",
        }
    }

    /// The algorithm for a JOSE name. Names are case-sensitive (RFC 7515 §4.1.1), so `"hs256"`
    /// and `"none"` are `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "EdDSA" => Some(SigningAlg::EdDSA),
            "ES256" => Some(SigningAlg::ES256),
            "RS256" => Some(SigningAlg::RS256),
            "HS256" => Some(SigningAlg::HS256),
            _ => None,
        }
    }

    /// True for HS256, whose verification key is the signing secret.
    pub fn is_symmetric(self) -> bool {
        self == SigningAlg::HS256
    }

    pub(crate) fn jwt(self) -> Algorithm {
        match self {
            SigningAlg::EdDSA => Algorithm::EdDSA,
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::RS256 => Algorithm::RS256,
            SigningAlg::HS256 => Algorithm::HS256,
        }
    }

    fn key_algorithm(self) -> KeyAlgorithm {
        match self {
            SigningAlg::EdDSA => KeyAlgorithm::EdDSA,
            SigningAlg::ES256 => KeyAlgorithm::ES256,
            SigningAlg::RS256 => KeyAlgorithm::RS256,
            SigningAlg::HS256 => KeyAlgorithm::HS256,
        }
    }
}

impl std::fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SigningAlg {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        SigningAlg::from_name(s).ok_or_else(|| KeyError::UnsupportedAlg(s.to_owned()))
    }
}

/// Why a key could not be loaded. Messages name the key and the source, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key id {0:?} is invalid: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidKid(String),
    #[error("algorithm {0:?} is not supported (EdDSA, ES256, RS256, HS256)")]
    UnsupportedAlg(String),
    #[error("key {kid:?}: {reason}")]
    Invalid { kid: String, reason: String },
    #[error("key {kid:?}: the HS256 secret is {len} bytes; at least 32 random bytes are required")]
    WeakSecret { kid: String, len: usize },
    #[error("key id {0:?} appears twice in the key ring")]
    DuplicateKid(String),
    #[error("key spec entry {entry:?}: {reason}")]
    Spec { entry: String, reason: String },
    #[error("reading key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {0} is not set or not UTF-8")]
    MissingEnv(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }`:
/// the DER of a PKCS#8 v1 Ed25519 private key up to its 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The shortest HS256 secret accepted: as long as the hash output (RFC 7518 §3.2).
pub const MIN_HMAC_SECRET_BYTES: usize = 32;
/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// One key: its id, its one algorithm, and the parts this process holds.
pub struct Key {
    kid: String,
    alg: SigningAlg,
    /// `None` for a verify-only key (a public key, or a key fetched from a JWKS).
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    /// The public JWK with `kid`, `alg` and `use`; `None` for HS256, which has no public part.
    public_jwk: Option<Jwk>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material stays out of logs.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("can_sign", &self.can_sign())
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A fresh Ed25519 key from the operating system's random source, for development and tests.
    /// Production keys come from files or the environment ([`KeyRing::from_env`]), so that every
    /// instance of a service holds the same keys.
    pub fn generate_ed25519(kid: &str) -> Result<Key, KeyError> {
        check_kid(kid)?;
        let seed = random::bytes::<32>().map_err(|e| KeyError::Random(e.to_string()))?;
        // An Ed25519 private key is its 32-byte seed; jsonwebtoken takes it as PKCS#8 v1 DER
        // (RFC 8410 §7), which is a fixed 16-byte prefix and the seed. The public key is derived
        // from it (by ed25519-dalek, inside jsonwebtoken) in `asymmetric`.
        let mut der = Vec::with_capacity(ED25519_PKCS8_PREFIX.len() + seed.len());
        der.extend_from_slice(&ED25519_PKCS8_PREFIX);
        der.extend_from_slice(&seed);
        Self::asymmetric(kid, SigningAlg::EdDSA, EncodingKey::from_ed_der(&der))
    }

    /// A signing key from a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`; PKCS#1
    /// `RSA PRIVATE KEY` is accepted for RS256). The public part is derived from it.
    pub fn from_private_pem(kid: &str, alg: SigningAlg, pem: &[u8]) -> Result<Key, KeyError> {
        check_kid(kid)?;
        let invalid = |e: jsonwebtoken::errors::Error| KeyError::Invalid {
            kid: kid.to_owned(),
            reason: format!("not a {alg} private key in PEM form ({e})"),
        };
        let encoding = match alg {
            SigningAlg::EdDSA => EncodingKey::from_ed_pem(pem).map_err(invalid)?,
            SigningAlg::ES256 => EncodingKey::from_ec_pem(pem).map_err(invalid)?,
            SigningAlg::RS256 => EncodingKey::from_rsa_pem(pem).map_err(invalid)?,
            SigningAlg::HS256 => {
                return Err(KeyError::Invalid {
                    kid: kid.to_owned(),
                    reason: "HS256 takes a secret, not a PEM key (use Key::hmac)".into(),
                });
            }
        };
        Self::asymmetric(kid, alg, encoding)
    }

    /// A verify-only key from a PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_public_pem(kid: &str, alg: SigningAlg, pem: &[u8]) -> Result<Key, KeyError> {
        check_kid(kid)?;
        let invalid = |e: jsonwebtoken::errors::Error| KeyError::Invalid {
            kid: kid.to_owned(),
            reason: format!("not a {alg} public key in PEM form ({e})"),
        };
        let decoding = match alg {
            SigningAlg::EdDSA => DecodingKey::from_ed_pem(pem).map_err(invalid)?,
            SigningAlg::ES256 => DecodingKey::from_ec_pem(pem).map_err(invalid)?,
            SigningAlg::RS256 => DecodingKey::from_rsa_pem(pem).map_err(invalid)?,
            SigningAlg::HS256 => {
                return Err(KeyError::Invalid {
                    kid: kid.to_owned(),
                    reason: "HS256 has no public key".into(),
                });
            }
        };
        let mut jwk =
            Jwk::from_decoding_key(&decoding, Some(alg.jwt())).map_err(|e| KeyError::Invalid {
                kid: kid.to_owned(),
                reason: format!("cannot describe the public key as a JWK ({e})"),
            })?;
        label_jwk(&mut jwk, kid, alg);
        // Rebuild the decoding key from the JWK so that the checked components are what verifies.
        Self::from_jwk_checked(jwk)
    }

    /// An HS256 key from a shared secret of at least [`MIN_HMAC_SECRET_BYTES`] bytes.
    pub fn hmac(kid: &str, secret: &[u8]) -> Result<Key, KeyError> {
        check_kid(kid)?;
        if secret.len() < MIN_HMAC_SECRET_BYTES {
            return Err(KeyError::WeakSecret {
                kid: kid.to_owned(),
                len: secret.len(),
            });
        }
        Ok(Key {
            kid: kid.to_owned(),
            alg: SigningAlg::HS256,
            encoding: Some(EncodingKey::from_secret(secret)),
            decoding: DecodingKey::from_secret(secret),
            public_jwk: None,
        })
    }

    /// A verify-only key from one entry of a JWKS (a JSON object). Symmetric (`oct`) keys are
    /// refused: a shared secret never travels in a key set. `kid` is required; `alg`, when
    /// absent, is inferred from the key type (OKP/Ed25519 → EdDSA, EC/P-256 → ES256,
    /// RSA → RS256), which is unambiguous among the algorithms this crate accepts.
    pub fn from_jwk(jwk: &serde_json::Value) -> Result<Key, KeyError> {
        let kid = jwk
            .get("kid")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        check_kid(&kid)?;
        let parsed: Jwk = serde_json::from_value(jwk.clone()).map_err(|e| KeyError::Invalid {
            kid: kid.clone(),
            reason: format!("not a JWK: {e}"),
        })?;
        Self::from_jwk_checked(parsed)
    }

    fn from_jwk_checked(mut jwk: Jwk) -> Result<Key, KeyError> {
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        check_kid(&kid)?;
        let invalid = |reason: String| KeyError::Invalid {
            kid: kid.clone(),
            reason,
        };
        if let Some(usage) = &jwk.common.public_key_use
            && *usage != PublicKeyUse::Signature
        {
            return Err(invalid(format!("key use is {usage:?}, not sig")));
        }
        let inferred = match &jwk.algorithm {
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 {
                    return Err(invalid(format!("OKP curve {:?} is not Ed25519", p.curve)));
                }
                check_len(&p.x, 32, "Ed25519 x").map_err(invalid)?;
                SigningAlg::EdDSA
            }
            AlgorithmParameters::EllipticCurve(p) => {
                if p.curve != EllipticCurve::P256 {
                    return Err(invalid(format!("EC curve {:?} is not P-256", p.curve)));
                }
                check_len(&p.x, 32, "P-256 x").map_err(invalid)?;
                check_len(&p.y, 32, "P-256 y").map_err(invalid)?;
                SigningAlg::ES256
            }
            AlgorithmParameters::RSA(p) => {
                let n = decode_b64url(&p.n).map_err(|e| invalid(format!("RSA n: {e}")))?;
                let e = decode_b64url(&p.e).map_err(|e| invalid(format!("RSA e: {e}")))?;
                let n_bits = significant_bits(&n);
                if n_bits < MIN_RSA_BITS {
                    return Err(invalid(format!(
                        "RSA modulus is {n_bits} bits; at least {MIN_RSA_BITS} are required"
                    )));
                }
                if e.is_empty() || e.len() > 8 {
                    return Err(invalid("RSA exponent is empty or oversized".into()));
                }
                SigningAlg::RS256
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(invalid(
                    "symmetric (oct) keys are never accepted from a key set".into(),
                ));
            }
            _ => {
                return Err(invalid("unsupported key type".into()));
            }
        };
        if let Some(declared) = jwk.common.key_algorithm
            && declared != inferred.key_algorithm()
        {
            return Err(invalid(format!(
                "alg {declared} does not fit a {inferred}-type key"
            )));
        }
        let decoding = DecodingKey::from_jwk(&jwk)
            .map_err(|e| invalid(format!("unusable public key ({e})")))?;
        label_jwk(&mut jwk, &kid, inferred);
        Ok(Key {
            kid,
            alg: inferred,
            encoding: None,
            decoding,
            public_jwk: Some(jwk),
        })
    }

    fn asymmetric(kid: &str, alg: SigningAlg, encoding: EncodingKey) -> Result<Key, KeyError> {
        let jwk = Jwk::from_encoding_key(&encoding, alg.jwt()).map_err(|e| KeyError::Invalid {
            kid: kid.to_owned(),
            reason: format!("not a usable {alg} private key ({e})"),
        })?;
        let mut jwk = jwk;
        label_jwk(&mut jwk, kid, alg);
        let mut key = Self::from_jwk_checked(jwk)?;
        key.encoding = Some(encoding);
        key.self_test()?;
        Ok(key)
    }

    /// Signs and verifies a fixed message, so a private key that does not match its derived
    /// public key (or a P-384 key offered as ES256) fails at load time, not on the first login.
    fn self_test(&self) -> Result<(), KeyError> {
        let message = b"statehouse-token key self-test";
        let failed = |reason: String| KeyError::Invalid {
            kid: self.kid.clone(),
            reason,
        };
        let Some(encoding) = &self.encoding else {
            return Ok(());
        };
        let signature = jsonwebtoken::crypto::sign(message, encoding, self.alg.jwt())
            .map_err(|e| failed(format!("cannot sign with it ({e})")))?;
        match jsonwebtoken::crypto::verify(&signature, message, &self.decoding, self.alg.jwt()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(failed("its signature does not verify".into())),
            Err(e) => Err(failed(format!("cannot verify with it ({e})"))),
        }
    }

    /// The key id (`kid`) tokens signed with this key carry.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm this key is used with.
    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// True when this process holds the private part (or the secret) and may sign.
    pub fn can_sign(&self) -> bool {
        self.encoding.is_some()
    }

    /// The public JWK (`kty`, key parameters, `kid`, `alg`, `use: "sig"`), or `None` for HS256.
    /// Never contains private parts.
    pub fn public_jwk(&self) -> Option<serde_json::Value> {
        self.public_jwk
            .as_ref()
            .and_then(|jwk| serde_json::to_value(jwk).ok())
    }

    pub(crate) fn encoding(&self) -> Option<&EncodingKey> {
        self.encoding.as_ref()
    }

    pub(crate) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }
}

fn label_jwk(jwk: &mut Jwk, kid: &str, alg: SigningAlg) {
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.key_algorithm = Some(alg.key_algorithm());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
}

/// Key ids are echoed in headers and logs; keep them short and plain.
pub(crate) fn check_kid(kid: &str) -> Result<(), KeyError> {
    let ok = (1..=64).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::InvalidKid(kid.chars().take(80).collect()))
    }
}

fn decode_b64url(s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("not base64url: {e}"))
}

fn check_len(s: &str, want: usize, what: &str) -> Result<(), String> {
    let bytes = decode_b64url(s).map_err(|e| format!("{what}: {e}"))?;
    if bytes.len() == want {
        Ok(())
    } else {
        Err(format!("{what} is {} bytes, expected {want}", bytes.len()))
    }
}

fn significant_bits(big_endian: &[u8]) -> usize {
    let Some(first) = big_endian.iter().position(|&b| b != 0) else {
        return 0;
    };
    (big_endian.len() - first) * 8 - big_endian[first].leading_zeros() as usize
}

/// An ordered set of keys: the newest key that can sign signs; every key verifies.
///
/// Cheap to clone (the keys are shared). A ring is immutable once built: rotating keys means
/// building a new ring from new configuration, which is what a rolling restart does.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Vec<Arc<Key>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter()).finish()
    }
}

impl KeyRing {
    /// An empty ring; add keys with [`KeyRing::with_key`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A ring holding one fresh Ed25519 key, for development and tests.
    pub fn generate_ed25519(kid: &str) -> Result<Self, KeyError> {
        KeyRing::new().with_key(Key::generate_ed25519(kid)?)
    }

    /// Adds a key as the newest. If it can sign, it becomes the signing key.
    pub fn with_key(mut self, key: Key) -> Result<Self, KeyError> {
        if self.get(key.kid()).is_some() {
            return Err(KeyError::DuplicateKid(key.kid));
        }
        self.keys.push(Arc::new(key));
        Ok(self)
    }

    /// The ring without the key `kid` (retiring it: tokens it signed stop verifying).
    pub fn without(mut self, kid: &str) -> Self {
        self.keys.retain(|k| k.kid() != kid);
        self
    }

    /// The key new tokens are signed with: the newest key that can sign.
    pub fn signing_key(&self) -> Option<&Arc<Key>> {
        self.keys.iter().rev().find(|k| k.can_sign())
    }

    /// The key with this id.
    pub fn get(&self, kid: &str) -> Option<&Arc<Key>> {
        self.keys.iter().find(|k| k.kid() == kid)
    }

    /// All keys, oldest first.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter().map(|k| k.as_ref())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The JWKS document (`{"keys":[...]}`) of this ring: the public JWK of every asymmetric key,
    /// including verify-only ones. HS256 secrets and private parts are never included.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> =
            self.keys.iter().filter_map(|k| k.public_jwk()).collect();
        serde_json::json!({ "keys": keys })
    }

    /// Loads a ring from the key spec in environment variable `var` (see [`KeyRing::from_spec`]);
    /// secrets named there are read from other environment variables or from files.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let spec = std::env::var(var).map_err(|_| KeyError::MissingEnv(var.to_owned()))?;
        Self::from_spec(&spec, |name| std::env::var(name).ok())
    }

    /// Loads a ring from a key spec: entries separated by commas or whitespace, oldest first,
    /// each `KID:ALG:file:PATH` or `KID:ALG:env:VAR`.
    ///
    /// - For EdDSA, ES256 and RS256 the file or variable holds a PEM key: a `PRIVATE KEY` makes a
    ///   signing key, a `PUBLIC KEY` a verify-only one (a key being retired, or another
    ///   service's).
    /// - For HS256 it holds the secret in base64 (standard or URL-safe alphabet, padding
    ///   optional), at least 32 bytes once decoded — e.g. `openssl rand -base64 32`.
    ///
    /// `env` looks variables up (pass `|v| std::env::var(v).ok()`, or a map in tests). Secrets
    /// themselves never appear in the spec, so the spec can sit in ordinary configuration.
    ///
    /// ```text
    /// STATEHOUSE_TOKEN_KEYS="2025-01:EdDSA:file:/run/secrets/jwt-2025-01.pem
    ///                        2025-07:EdDSA:env:JWT_KEY_2025_07"
    /// ```
    pub fn from_spec(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, KeyError> {
        let mut ring = KeyRing::new();
        for entry in spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
        {
            ring = ring.with_key(load_entry(entry, &env)?)?;
        }
        if ring.is_empty() {
            return Err(KeyError::Spec {
                entry: String::new(),
                reason: "the key spec names no key".into(),
            });
        }
        Ok(ring)
    }
}

fn load_entry(entry: &str, env: &impl Fn(&str) -> Option<String>) -> Result<Key, KeyError> {
    let spec_err = |reason: &str| KeyError::Spec {
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let mut parts = entry.splitn(4, ':');
    let (Some(kid), Some(alg), Some(kind), Some(location)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(spec_err("expected KID:ALG:file:PATH or KID:ALG:env:VAR"));
    };
    let alg: SigningAlg = alg.parse()?;
    let material: Vec<u8> = match kind {
        "file" => std::fs::read(location).map_err(|source| KeyError::Io {
            path: PathBuf::from(location),
            source,
        })?,
        "env" => env(location)
            .ok_or_else(|| KeyError::MissingEnv(location.to_owned()))?
            .into_bytes(),
        _ => return Err(spec_err("the source must be file:PATH or env:VAR")),
    };
    if alg.is_symmetric() {
        let text = std::str::from_utf8(&material)
            .map_err(|_| spec_err("the HS256 secret must be base64 text"))?;
        let secret = decode_secret(text.trim())
            .ok_or_else(|| spec_err("the HS256 secret must be base64 text"))?;
        return Key::hmac(kid, &secret);
    }
    let is_public = String::from_utf8_lossy(&material).contains("-----BEGIN PUBLIC KEY-----");
    if is_public {
        Key::from_public_pem(kid, alg, &material)
    } else {
        Key::from_private_pem(kid, alg, &material)
    }
}

/// Base64 in either alphabet, padded or not.
pub(crate) fn decode_secret(text: &str) -> Option<Vec<u8>> {
    let lenient = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(false);
    let standard = GeneralPurpose::new(&base64::alphabet::STANDARD, lenient);
    let url = GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient);
    standard.decode(text).or_else(|_| url.decode(text)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_bits_counts_from_first_set_bit() {
        assert_eq!(significant_bits(&[]), 0);
        assert_eq!(significant_bits(&[0, 0]), 0);
        assert_eq!(significant_bits(&[0, 1]), 1);
        assert_eq!(significant_bits(&[0x80, 0]), 16);
        assert_eq!(significant_bits(&[0, 0x7f, 0xff]), 15);
    }

    #[test]
    fn kids_are_plain_and_short() {
        assert!(check_kid("2025-01_a.b").is_ok());
        assert!(check_kid("").is_err());
        assert!(check_kid(&"k".repeat(65)).is_err());
        assert!(check_kid("a/b").is_err());
        assert!(check_kid("a b").is_err());
        assert!(check_kid("é").is_err());
    }

    #[test]
    fn secrets_decode_in_either_alphabet() {
        assert_eq!(decode_secret("+/8="), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_secret("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_secret("not base64!"), None);
    }
}
