//! The conformance suite on a real, private redis-server, plus what only
//! Redis can show: corrupt bytes written behind the store's back, and clear
//! errors for a wrong address.

use statehouse_store::{Condition, MapPatch, Store, StoreConfig, StoreError, open};
use statehouse_testkit::{shared_redis, unique_prefix};

async fn open_store(test: &str) -> Store {
    let redis = shared_redis();
    open(StoreConfig::new(redis.url()).prefix(unique_prefix(test)))
        .await
        .expect("open the private redis-server")
}

statehouse_store::conformance_suite!(open_store);

async fn raw_set(key: &str, value: &[u8], hash_field: Option<&str>) {
    let client = redis::Client::open(shared_redis().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = match hash_field {
        Some(field) => {
            let mut c = redis::cmd("HSET");
            c.arg(key).arg(field);
            c
        }
        None => {
            let mut c = redis::cmd("SET");
            c.arg(key);
            c
        }
    };
    cmd.arg(value).query_async::<()>(&mut conn).await.unwrap();
}

#[tokio::test]
async fn corrupt_bytes_are_reported_not_panicked_on() {
    let prefix = unique_prefix("corrupt");
    let store = open(StoreConfig::new(shared_redis().url()).prefix(prefix.clone()))
        .await
        .unwrap();
    raw_set(&format!("v:{prefix}plain"), b"no version prefix", None).await;
    let err = store.get("plain").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let err = store
        .put("plain", "x", None, Condition::Any)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");

    raw_set(&format!("m:{prefix}map"), b"1:ok", Some("f")).await;
    let err = store.map_read("map").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { .. }),
        "no meta field: {err:?}"
    );
    raw_set(&format!("m:{prefix}map"), b"7", Some("")).await;
    raw_set(&format!("m:{prefix}map"), b"garbage", Some("g")).await;
    let err = store.map_read("map").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let err = store
        .map_patch(
            "map",
            &MapPatch::new()
                .set("h", "1")
                .require("g", statehouse_store::FieldCondition::Version(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");

    raw_set(&format!("c:{prefix}count"), b"twelve", None).await;
    let err = store.counter("count").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let err = store.incr("count", 1, None).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

#[tokio::test]
async fn unreachable_or_malformed_url_is_a_clear_config_error() {
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = open(StoreConfig::new(&url)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(text.contains(&url), "names the store: {text}");

    let err = open(StoreConfig::new("redis://user:hunter2@127.0.0.1:notaport"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(!text.contains("hunter2"), "password redacted: {text}");

    let err = open(StoreConfig::new("mongodb://x")).await.unwrap_err();
    assert!(err.to_string().contains("unknown scheme"), "{err}");
}
