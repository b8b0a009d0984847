//! Arbitrary bytes as an access token, against a verifier with a fixed key ring holding one key
//! of every algorithm. Any outcome but a panic is fine; every rejection must map to 401 or 503.
#![no_main]

use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use statehouse_token::{Key, KeyRing, SigningAlg, TokenVerifier, VerifierConfig};

/// The time the seed tokens (`seeds/verify_token`) are valid at.
const NOW: u64 = 1_700_000_100;

fn setup() -> &'static (TokenVerifier, tokio::runtime::Runtime) {
    static SETUP: OnceLock<(TokenVerifier, tokio::runtime::Runtime)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let key = |kid, alg, pem: &[u8]| Key::from_private_pem(kid, alg, pem).expect("fixture key");
        let ring = KeyRing::new()
            .with_key(key(
                "ed",
                SigningAlg::EdDSA,
                include_bytes!("../../tests/fixtures/test-only-eddsa-private.pem"),
            ))
            .and_then(|r| {
                r.with_key(key(
                    "es",
                    SigningAlg::ES256,
                    include_bytes!("../../tests/fixtures/test-only-es256-private.pem"),
                ))
            })
            .and_then(|r| {
                r.with_key(key(
                    "rs",
                    SigningAlg::RS256,
                    include_bytes!("../../tests/fixtures/test-only-rs256-private.pem"),
                ))
            })
            .and_then(|r| r.with_key(Key::hmac("hs", b"fuzz-only-secret-0123456789abcdef")?))
            .expect("fixture ring");
        let verifier = TokenVerifier::new(ring, VerifierConfig::new("https://issuer.test", "shop"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        (verifier, runtime)
    })
}

fuzz_target!(|data: &[u8]| {
    let (verifier, runtime) = setup();
    let token = String::from_utf8_lossy(data);
    if let Err(e) = runtime.block_on(verifier.verify_at(&token, NOW)) {
        let status = e.into_response().status();
        assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::SERVICE_UNAVAILABLE);
    }
});
