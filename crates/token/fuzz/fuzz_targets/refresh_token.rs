//! Arbitrary bytes as a refresh token presented for rotation and for logout, against memory://
//! holding one real family. Any outcome but a panic is fine.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use statehouse_store::{StoreConfig, open};
use statehouse_token::{RefreshConfig, RefreshTokens};

fn setup() -> &'static (RefreshTokens, tokio::runtime::Runtime) {
    static SETUP: OnceLock<(RefreshTokens, tokio::runtime::Runtime)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
        let tokens = runtime.block_on(async {
            let store = open(StoreConfig::new("memory://"))
                .await
                .expect("memory store");
            let tokens = RefreshTokens::new(store, RefreshConfig::new());
            tokens.issue("fuzz").await.expect("one family");
            tokens
        });
        (tokens, runtime)
    })
}

fuzz_target!(|data: &[u8]| {
    let (tokens, runtime) = setup();
    let token = String::from_utf8_lossy(data);
    runtime.block_on(async {
        let _ = tokens.rotate(&token).await;
        let _ = tokens.revoke(&token).await;
    });
});
