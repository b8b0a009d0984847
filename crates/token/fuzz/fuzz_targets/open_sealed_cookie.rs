//! Arbitrary bytes as a sealed cookie value, and as a whole `Cookie` header. Anything may open
//! to `None`; nothing may panic.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use statehouse_token::{Clock, CookieKeys, ManualClock, SealedCookie, SealedCookieConfig};

fn cookie() -> &'static SealedCookie {
    static COOKIE: OnceLock<SealedCookie> = OnceLock::new();
    COOKIE.get_or_init(|| {
        let keys = CookieKeys::new()
            .with_key(1, [1; 32])
            .and_then(|k| k.with_key(2, [2; 32]))
            .expect("fixed keys");
        // Seeds (`seeds/open_sealed_cookie`) were sealed to expire after this time.
        let clock: Clock = ManualClock::at_unix_secs(1_700_000_000).clock();
        SealedCookie::new(
            "cart",
            keys,
            SealedCookieConfig::new(Duration::from_secs(3600)),
        )
        .expect("valid name")
        .with_clock(clock)
    })
}

fuzz_target!(|data: &[u8]| {
    let cookie = cookie();
    let text = String::from_utf8_lossy(data);
    let _ = cookie.open(&text);
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, value);
        let _ = cookie.open_request(&headers);
    }
});
