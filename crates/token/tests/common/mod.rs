//! Helpers shared by the integration tests: fixture keys and hand-made tokens.
#![allow(dead_code, unreachable_pub)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use statehouse_token::{Key, KeyRing, SigningAlg};

pub const ISS: &str = "https://issuer.test";
pub const AUD: &str = "shop";
/// A fixed "now" for tests that pass time explicitly: 2023-11-14T22:13:20Z.
pub const T0: u64 = 1_700_000_000;

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

pub fn rsa_key(kid: &str) -> Key {
    Key::from_private_pem(
        kid,
        SigningAlg::RS256,
        &fixture("test-only-rs256-private.pem"),
    )
    .unwrap()
}

pub fn es_key(kid: &str) -> Key {
    Key::from_private_pem(
        kid,
        SigningAlg::ES256,
        &fixture("test-only-es256-private.pem"),
    )
    .unwrap()
}

pub fn hs_key(kid: &str) -> Key {
    Key::hmac(kid, b"0123456789abcdef0123456789abcdef-test-only").unwrap()
}

pub fn ring_of(keys: Vec<Key>) -> KeyRing {
    keys.into_iter()
        .fold(KeyRing::new(), |ring, key| ring.with_key(key).unwrap())
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with exactly this header and payload JSON, and `sign(header.payload)` as signature.
pub fn forge(header: &str, payload: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let signature = sign(message.as_bytes());
    format!("{message}.{}", b64(&signature))
}

/// HMAC-SHA256 with an arbitrary secret, through jsonwebtoken's own signer.
pub fn hmac_sha256(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    move |message| {
        let sig =
            jsonwebtoken::crypto::sign(message, &key, jsonwebtoken::Algorithm::HS256).unwrap();
        URL_SAFE_NO_PAD.decode(sig).unwrap()
    }
}

/// Claims that pass every check at `T0`.
pub fn good_claims() -> serde_json::Value {
    serde_json::json!({
        "iss": ISS, "sub": "user-1", "aud": AUD,
        "exp": T0 + 300, "nbf": T0, "iat": T0, "jti": "jti-1"
    })
}
