//! Arbitrary bytes as one JWKS entry (what a JwksCache reads from the network). A key that
//! loads is then used to verify fixed tokens, so a key that loads but breaks the crypto provider
//! (an Ed25519 key shorter than 32 bytes used to panic inside jsonwebtoken) is found here.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use statehouse_token::{Key, KeyRing, TokenVerifier, VerifierConfig};

/// One token per algorithm with kid "fuzz" and a junk signature: enough to reach the crypto
/// provider's verifier with the fuzzed key.
const TOKENS: [&str; 3] = [
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImZ1enoifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImZ1enoifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZ1enoifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // The tokens name kid "fuzz": give the key that kid, whatever the input said.
    if let Some(object) = value.as_object_mut() {
        object.insert("kid".into(), "fuzz".into());
    }
    let Ok(key) = Key::from_jwk(&value) else {
        return;
    };
    let _ = key.public_jwk();
    let Ok(ring) = KeyRing::new().with_key(key) else {
        return;
    };
    let verifier = TokenVerifier::new(ring, VerifierConfig::new("https://issuer.test", "shop"));
    for token in TOKENS {
        let _ = runtime().block_on(verifier.verify(token));
    }
});
