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
    assert!(
        text.contains("no_such_database"),
        "names what was tried: {text}"
    );
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_config_error() {
    let base = shared_postgres().url();
    let url = base.replacen("postgres@", "nobody:secret@", 1);
    assert_ne!(url, base, "the URL names a user: {base}");
    let err = open(StoreConfig::new(&url)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(text.contains("nobody"), "says which role failed: {text}");
    assert!(!text.contains("secret"), "password redacted: {text}");
}

#[tokio::test]
async fn corrupt_rows_are_reported_not_panicked_on() {
    let prefix = unique_prefix("corrupt");
    let store = open(StoreConfig::new(database_url()).prefix(prefix.clone()))
        .await
        .unwrap();
    shared_postgres()
        .psql(
            "store_conformance",
            &format!(
                "INSERT INTO sh_kv (key, value, version) VALUES ('{prefix}neg', '\\x00', -5); \
                 INSERT INTO sh_map (key, version) VALUES ('{prefix}m', 1); \
                 INSERT INTO sh_map_field (key, field, value, version) \
                 VALUES ('{prefix}m', 'n', 'abc', 1);"
            ),
        )
        .unwrap();
    let err = store.get("neg").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let err = store
        .map_patch("m", &statehouse_store::MapPatch::new().incr("n", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}
