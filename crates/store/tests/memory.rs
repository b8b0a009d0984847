//! The conformance suite on the in-process memory backend.

use statehouse_store::{Store, StoreConfig, open};

async fn open_store(_test: &str) -> Store {
    open(StoreConfig::new("memory://"))
        .await
        .expect("the memory backend always opens")
}

statehouse_store::conformance_suite!(open_store);
