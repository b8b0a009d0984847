//! Arbitrary bytes as a `Cookie` header through the session layer's parsing
//! and verification: it must never panic, and random input must never pass
//! as a valid session (the MAC is 256 bits).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use statehouse_session::{SessionConfig, SessionKeys};

static CONFIG: LazyLock<SessionConfig> = LazyLock::new(|| {
    let keys = SessionKeys::new([("new", vec![1u8; 32]), ("old", vec![2u8; 32])])
        .expect("fixed test keys are well-formed");
    SessionConfig::new(keys)
});

fuzz_target!(|data: &[u8]| {
    let accepted = statehouse_session::testing::accepts_cookie_header(&CONFIG, data);
    assert!(!accepted, "a forged cookie was accepted: {:?}", String::from_utf8_lossy(data));
});
