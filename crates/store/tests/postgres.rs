//! The conformance suite on a real, private Postgres (initdb in a temp dir),
//! plus clear errors for a wrong database or credentials.

use std::sync::OnceLock;

use statehouse_store::{Store, StoreConfig, StoreError, open};
use statehouse_testkit::{shared_postgres, unique_prefix};

/// One database for this test binary; tests are isolated by key prefix.
fn database_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        shared_postgres()
            .create_database("store_conformance")
            .expect("create the test database")
    })
}

async fn open_store(test: &str) -> Store {
    open(StoreConfig::new(database_url()).prefix(unique_prefix(test)))
        .await
        .expect("open the private Postgres")
}

statehouse_store::conformance_suite!(open_store);

#[tokio::test]
async fn wrong_database_is_a_clear_config_error() {
    let base = shared_postgres().url();
    let url = format!("{}/no_such_database", base.rsplit_once('/').unwrap().0);
    let err = open(StoreConfig::new(&url)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(text.contains("no_such_database"), "names what was tried: {text}");
}
