//! The conformance suite: written once, run unchanged on every backend.
//!
//! Each backend's test file calls [`conformance_suite!`](crate::conformance_suite)
//! with an async function that opens a fresh, isolated store (its own key
//! prefix or database) on a real server. Every check here is a plain async
//! function so a failure points at one behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;

use crate::{
    Condition, Conflict, Existence, FieldCondition, MapPatch, Store, StoreError, Versioned,
};

/// Expands to one `#[tokio::test]` per conformance check. `$open` is the path
/// of an `async fn(&str) -> Store` that opens an isolated store for the named
/// test.
#[macro_export]
macro_rules! conformance_suite {
    ($open:path) => {
        $crate::conformance_suite!(@tests $open;
            kv_roundtrip, kv_conditions, kv_versions_not_reused, kv_ttl, kv_binary_values,
            map_roundtrip, map_conditions_all_or_nothing, map_existence, map_incr,
            map_ttl, map_max_bytes, counters, namespaces_are_separate, limits_rejected_before_sending,
            concurrent_field_writes_lose_nothing, concurrent_increments_exact,
            concurrent_compare_and_set_exact);
    };
    (@tests $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $open(stringify!($name)).await;
                $crate::conformance::$name(&store).await;
            }
        )*
    };
}

fn conflict(e: StoreError) -> Conflict {
    match e {
        StoreError::Conflict(c) => c,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Waits past a TTL. The wait *is* the behaviour under test (expiry), not a
/// stand-in for synchronisation.
async fn wait_past(ttl: Duration) {
    tokio::time::sleep(ttl + Duration::from_millis(150)).await;
}

pub async fn kv_roundtrip(store: &Store) {
    assert_eq!(store.get("k").await.unwrap().into_inner(), None);
    let v1 = store.put("k", "one", None, Condition::Any).await.unwrap();
    let got = store.get("k").await.unwrap().into_inner().unwrap();
    assert_eq!(
        got,
        Versioned {
            value: Bytes::from("one"),
            version: v1
        }
    );
    let v2 = store.put("k", "two", None, Condition::Any).await.unwrap();
    assert!(v2 > v1, "versions increase: {v1} then {v2}");
    assert_eq!(store.get("k").await.unwrap().value.unwrap().value, "two");
    assert!(store.delete("k", Condition::Any).await.unwrap());
    assert_eq!(store.get("k").await.unwrap().into_inner(), None);
    assert!(!store.delete("k", Condition::Any).await.unwrap());
}

pub async fn kv_conditions(store: &Store) {
    let v1 = store
        .put("c", "a", None, Condition::IfAbsent)
        .await
        .unwrap();
    assert_eq!(
        conflict(
            store
                .put("c", "b", None, Condition::IfAbsent)
                .await
                .unwrap_err()
        ),
        Conflict::AlreadyExists
    );
    assert_eq!(
        conflict(
            store
                .put("c", "b", None, Condition::IfVersion(v1 + 1000))
                .await
                .unwrap_err()
        ),
        Conflict::VersionMismatch { field: None }
    );
    let v2 = store
        .put("c", "b", None, Condition::IfVersion(v1))
        .await
        .unwrap();
    assert_eq!(
        conflict(
            store
                .put("absent", "x", None, Condition::IfVersion(v2))
                .await
                .unwrap_err()
        ),
        Conflict::NotFound
    );
    assert_eq!(
        conflict(
            store
                .delete("c", Condition::IfVersion(v1))
                .await
                .unwrap_err()
        ),
        Conflict::VersionMismatch { field: None }
    );
    assert_eq!(store.get("c").await.unwrap().value.unwrap().value, "b");
    assert!(store.delete("c", Condition::IfVersion(v2)).await.unwrap());
    assert!(store.delete("c", Condition::IfAbsent).await.is_err());
}

pub async fn kv_versions_not_reused(store: &Store) {
    let v1 = store.put("r", "a", None, Condition::Any).await.unwrap();
    store.delete("r", Condition::Any).await.unwrap();
    let v2 = store
        .put("r", "b", None, Condition::IfAbsent)
        .await
        .unwrap();
    assert!(
        v2 > v1,
        "a recreated key gets a newer version ({v1} -> {v2})"
    );
    assert!(
        store
            .put("r", "c", None, Condition::IfVersion(v1))
            .await
            .is_err(),
        "an old version must not match a recreated key (ABA)"
    );
}

pub async fn kv_ttl(store: &Store) {
    let ttl = Duration::from_millis(250);
    store
        .put("t", "x", Some(ttl), Condition::Any)
        .await
        .unwrap();
    assert!(store.get("t").await.unwrap().is_some());
    wait_past(ttl).await;
    assert_eq!(
        store.get("t").await.unwrap().into_inner(),
        None,
        "a value past its TTL is never returned"
    );
    assert!(!store.touch("t", ttl).await.unwrap(), "touch on expired");
    assert!(
        store
            .put("t", "y", None, Condition::IfVersion(1))
            .await
            .is_err(),
        "an expired key cannot satisfy a version condition"
    );
    store
        .put("t", "y", Some(ttl), Condition::IfAbsent)
        .await
        .expect("an expired key counts as absent");
    assert!(store.touch("t", Duration::from_secs(30)).await.unwrap());
    wait_past(ttl).await;
    assert_eq!(
        store.get("t").await.unwrap().value.unwrap().value,
        "y",
        "touch extended the TTL"
    );
    store.put("t", "z", None, Condition::Any).await.unwrap();
    wait_past(ttl).await;
    assert!(
        store.get("t").await.unwrap().is_some(),
        "a put without TTL clears the old expiry"
    );
}

pub async fn kv_binary_values(store: &Store) {
    let weird: Vec<u8> = (0u8..=255).chain([b':', 0, 0xff, b'\n']).collect();
    store
        .put("bin", weird.clone(), None, Condition::Any)
        .await
        .unwrap();
    assert_eq!(store.get("bin").await.unwrap().value.unwrap().value, weird);
    store.put("empty", "", None, Condition::Any).await.unwrap();
    assert_eq!(store.get("empty").await.unwrap().value.unwrap().value, "");
    let odd_key = "ключ {tag} with spaces:and:colons";
    store.put(odd_key, "v", None, Condition::Any).await.unwrap();
    assert_eq!(store.get(odd_key).await.unwrap().value.unwrap().value, "v");
}

pub async fn map_roundtrip(store: &Store) {
    assert_eq!(store.map_read("m").await.unwrap().into_inner(), None);
    let p1 = store
        .map_patch(
            "m",
            &MapPatch::new().set("a", "1").set("b", vec![0u8, 1, 2]),
        )
        .await
        .unwrap();
    let map = store.map_read("m").await.unwrap().into_inner().unwrap();
    assert_eq!(map.version, p1.version);
    assert_eq!(map.get("a").unwrap(), "1");
    assert_eq!(map.get("b").unwrap().as_ref(), [0u8, 1, 2]);
    assert_eq!(map.fields["a"].version, p1.version);
    assert_eq!(map.expires_in, None);

    let p2 = store
        .map_patch("m", &MapPatch::new().remove("a").set("c", "3"))
        .await
        .unwrap();
    assert!(p2.version > p1.version);
    let map = store.map_read("m").await.unwrap().into_inner().unwrap();
    let names: Vec<_> = map.fields.keys().cloned().collect();
    assert_eq!(names, ["b", "c"]);
    assert_eq!(
        map.fields["b"].version, p1.version,
        "untouched field keeps its version"
    );
    assert_eq!(map.fields["c"].version, p2.version);
    assert!(store.map_delete("m").await.unwrap());
    assert_eq!(store.map_read("m").await.unwrap().into_inner(), None);
    assert!(!store.map_delete("m").await.unwrap());
}

pub async fn map_conditions_all_or_nothing(store: &Store) {
    let p1 = store
        .map_patch("mc", &MapPatch::new().set("x", "1"))
        .await
        .unwrap();
    let err = store
        .map_patch(
            "mc",
            &MapPatch::new()
                .set("y", "2")
                .require("x", FieldCondition::Absent),
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflict(err),
        Conflict::VersionMismatch {
            field: Some("x".into())
        }
    );
    let err = store
        .map_patch(
            "mc",
            &MapPatch::new()
                .set("y", "2")
                .incr("n", 1)
                .require("x", FieldCondition::Version(p1.version + 1)),
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    let map = store.map_read("mc").await.unwrap().into_inner().unwrap();
    assert!(
        map.get("y").is_none() && map.get("n").is_none(),
        "nothing applied"
    );
    assert_eq!(
        map.version, p1.version,
        "a failed patch does not bump the version"
    );

    store
        .map_patch(
            "mc",
            &MapPatch::new()
                .set("x", "2")
                .require("x", FieldCondition::Version(p1.version))
                .require("z", FieldCondition::Absent),
        )
        .await
        .unwrap();
    let err = store
        .map_patch(
            "mc",
            &MapPatch::new()
                .set("x", "3")
                .require("x", FieldCondition::Version(p1.version)),
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "the old version no longer matches");
}

pub async fn map_existence(store: &Store) {
    let err = store
        .map_patch(
            "me",
            &MapPatch::new()
                .set("a", "1")
                .existence(Existence::MustExist),
        )
        .await
        .unwrap_err();
    assert_eq!(conflict(err), Conflict::NotFound);
    assert_eq!(
        store.map_read("me").await.unwrap().into_inner(),
        None,
        "a failed MustExist patch creates nothing"
    );
    store
        .map_patch(
            "me",
            &MapPatch::new()
                .set("a", "1")
                .existence(Existence::MustNotExist),
        )
        .await
        .unwrap();
    let err = store
        .map_patch(
            "me",
            &MapPatch::new()
                .set("a", "2")
                .existence(Existence::MustNotExist),
        )
        .await
        .unwrap_err();
    assert_eq!(conflict(err), Conflict::AlreadyExists);
    store
        .map_patch(
            "me",
            &MapPatch::new()
                .set("b", "2")
                .existence(Existence::MustExist),
        )
        .await
        .unwrap();
    // Logout: after the delete, no late write may bring the map back.
    assert!(store.map_delete("me").await.unwrap());
    let err = store
        .map_patch(
            "me",
            &MapPatch::new()
                .set("c", "3")
                .existence(Existence::MustExist),
        )
        .await
        .unwrap_err();
    assert_eq!(conflict(err), Conflict::NotFound);
    assert_eq!(store.map_read("me").await.unwrap().into_inner(), None);
}

pub async fn map_incr(store: &Store) {
    for expected in 1..=3 {
        let out = store
            .map_patch("mi", &MapPatch::new().incr("n", 1))
            .await
            .unwrap();
        assert_eq!(out.counters, [expected]);
    }
    let out = store
        .map_patch(
            "mi",
            &MapPatch::new().incr("n", 10).incr("n", -4).incr("m", 7),
        )
        .await
        .unwrap();
    assert_eq!(out.counters, [13, 9, 7]);
    let map = store.map_read("mi").await.unwrap().into_inner().unwrap();
    assert_eq!(map.counter("n"), Some(9));
    assert_eq!(map.counter("m"), Some(7));

    store
        .map_patch("mi", &MapPatch::new().set("text", "not a number"))
        .await
        .unwrap();
    let err = store
        .map_patch("mi", &MapPatch::new().set("other", "1").incr("text", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    let map = store.map_read("mi").await.unwrap().into_inner().unwrap();
    assert!(map.get("other").is_none(), "nothing applied");
}

/// The time left that a read of the live map `key` reports.
async fn map_expires_in(store: &Store, key: &str) -> Option<Duration> {
    let read = store.map_read(key).await.unwrap();
    read.value.expect("the map is live").expires_in
}

pub async fn map_ttl(store: &Store) {
    let ttl = Duration::from_millis(250);
    store
        .map_patch("mt", &MapPatch::new().set("a", "1").ttl(ttl))
        .await
        .unwrap();
    let map = store.map_read("mt").await.unwrap().into_inner().unwrap();
    let left = map.expires_in.expect("map has a TTL");
    assert!(left <= ttl && left > Duration::ZERO, "expires_in {left:?}");
    store
        .map_patch("mt", &MapPatch::new().set("b", "2"))
        .await
        .unwrap();
    assert!(
        map_expires_in(store, "mt").await.is_some(),
        "a patch without TTL keeps the expiry"
    );
    wait_past(ttl).await;
    assert_eq!(store.map_read("mt").await.unwrap().into_inner(), None);
    let err = store
        .map_patch(
            "mt",
            &MapPatch::new()
                .set("c", "3")
                .existence(Existence::MustExist),
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflict(err),
        Conflict::NotFound,
        "expired counts as absent"
    );
    assert!(!store.map_touch("mt", ttl).await.unwrap());

    store
        .map_patch("mt", &MapPatch::new().set("fresh", "1").ttl(ttl))
        .await
        .unwrap();
    let map = store.map_read("mt").await.unwrap().into_inner().unwrap();
    assert_eq!(
        map.fields.keys().collect::<Vec<_>>(),
        ["fresh"],
        "fields of an expired map do not come back"
    );
    assert!(
        store
            .map_touch("mt", Duration::from_secs(30))
            .await
            .unwrap()
    );
    let left = map_expires_in(store, "mt")
        .await
        .expect("a touched map has a TTL");
    assert!(
        left > ttl && left <= Duration::from_secs(30),
        "expires_in after the touch {left:?}"
    );
    wait_past(ttl).await;
    assert!(
        store.map_read("mt").await.unwrap().is_some(),
        "touch extended it"
    );
    // A patch without TTL keeps the touched expiry, as the read reports it.
    store
        .map_patch("mt", &MapPatch::new().set("after", "1"))
        .await
        .unwrap();
    let left = map_expires_in(store, "mt")
        .await
        .expect("the touched TTL is kept");
    assert!(left > ttl, "expires_in after a patch without TTL {left:?}");
}

pub async fn map_max_bytes(store: &Store) {
    // Size = Σ (name + value) bytes: "a"+"1234" = 5, "bb"+"xy" = 4.
    store
        .map_patch(
            "mb",
            &MapPatch::new()
                .set("a", "1234")
                .set("bb", "xy")
                .max_bytes(9),
        )
        .await
        .expect("9 bytes fit in 9");
    let err = store
        .map_patch("mb", &MapPatch::new().set("c", "z").max_bytes(9))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                what: "map",
                size: 11,
                limit: 9
            }
        ),
        "{err:?}"
    );
    let map = store.map_read("mb").await.unwrap().into_inner().unwrap();
    assert!(map.get("c").is_none(), "nothing applied");
    // Replacing and removing count what the map holds afterwards.
    store
        .map_patch(
            "mb",
            &MapPatch::new()
                .set("a", "1")
                .remove("bb")
                .set("c", "z")
                .max_bytes(4),
        )
        .await
        .expect("a1 + cz = 4 bytes");
    // Counters count their decimal digits.
    let err = store
        .map_patch("mb", &MapPatch::new().incr("n", 100).max_bytes(6))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { size: 8, .. }),
        "{err:?}"
    );
    store
        .map_patch("mb", &MapPatch::new().incr("n", 9).max_bytes(6))
        .await
        .expect("n9 = 2 bytes, 6 in all");
    // Without a limit nothing is checked, and the size stays tracked.
    store
        .map_patch("mb", &MapPatch::new().set("big", vec![b'x'; 100]))
        .await
        .unwrap();
    let err = store
        .map_patch("mb", &MapPatch::new().remove("c").max_bytes(100))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { size: 107, .. }),
        "{err:?}"
    );
    store
        .map_patch("mb", &MapPatch::new().remove("big").max_bytes(100))
        .await
        .expect("back under the limit");
}

pub async fn counters(store: &Store) {
    assert_eq!(store.counter("n").await.unwrap().into_inner(), None);
    assert_eq!(store.incr("n", 5, None).await.unwrap(), 5);
    assert_eq!(store.incr("n", -2, None).await.unwrap(), 3);
    assert_eq!(store.counter("n").await.unwrap().into_inner(), Some(3));
    let ttl = Duration::from_millis(250);
    assert_eq!(store.incr("w", 1, Some(ttl)).await.unwrap(), 1);
    assert_eq!(
        store
            .incr("w", 1, Some(Duration::from_secs(60)))
            .await
            .unwrap(),
        2
    );
    wait_past(ttl).await;
    assert_eq!(
        store.counter("w").await.unwrap().into_inner(),
        None,
        "a live counter keeps the expiry it was created with"
    );
    assert_eq!(
        store.incr("w", 1, Some(ttl)).await.unwrap(),
        1,
        "new window"
    );
}

pub async fn namespaces_are_separate(store: &Store) {
    store
        .put("same", "value", None, Condition::Any)
        .await
        .unwrap();
    store
        .map_patch("same", &MapPatch::new().set("f", "map"))
        .await
        .unwrap();
    store.incr("same", 7, None).await.unwrap();
    assert_eq!(
        store.get("same").await.unwrap().value.unwrap().value,
        "value"
    );
    assert_eq!(
        store
            .map_read("same")
            .await
            .unwrap()
            .value
            .unwrap()
            .get("f")
            .unwrap(),
        "map"
    );
    assert_eq!(store.counter("same").await.unwrap().into_inner(), Some(7));
}

pub async fn limits_rejected_before_sending(store: &Store) {
    let limits = *store.limits();
    let big = vec![b'x'; limits.max_value_bytes + 1];
    let err = store
        .put("big", big.clone(), None, Condition::Any)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { what: "value", .. }),
        "{err:?}"
    );
    let err = store
        .map_patch("big", &MapPatch::new().set("f", big))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err:?}");
    let long_key = "k".repeat(limits.max_key_bytes + 1);
    let err = store.get(&long_key).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { what: "key", .. }),
        "{err:?}"
    );
    let long_field = "f".repeat(limits.max_field_name_bytes + 1);
    let err = store
        .map_patch("big", &MapPatch::new().set(long_field, "v"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                what: "field name",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        store.get("").await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    assert!(matches!(
        store
            .map_patch("m", &MapPatch::new().set("", "v"))
            .await
            .unwrap_err(),
        StoreError::Invalid(_)
    ));
    assert_eq!(store.map_read("big").await.unwrap().into_inner(), None);
}

/// Runs `total` jobs with at most `width` in flight.
async fn in_waves<F, Fut>(total: usize, width: usize, job: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut next = 0;
    while next < total {
        let end = (next + width).min(total);
        join_all((next..end).map(&job)).await;
        next = end;
    }
}

pub async fn concurrent_field_writes_lose_nothing(store: &Store) {
    let total = 1000;
    in_waves(total, 100, |i| {
        let store = store.clone();
        async move {
            let store = &store;
            tokio::spawn({
                let store = store.clone();
                async move {
                    store
                        .map_patch("cw", &MapPatch::new().set(format!("f{i}"), i.to_string()))
                        .await
                        .unwrap();
                }
            })
            .await
            .unwrap();
        }
    })
    .await;
    let map = store.map_read("cw").await.unwrap().into_inner().unwrap();
    let got: BTreeSet<_> = map.fields.keys().cloned().collect();
    let want: BTreeSet<_> = (0..total).map(|i| format!("f{i}")).collect();
    assert_eq!(got.len(), total, "lost {} field writes", total - got.len());
    assert_eq!(got, want);
}

pub async fn concurrent_increments_exact(store: &Store) {
    let total = 1000;
    in_waves(total, 100, |_| {
        let store = store.clone();
        async move {
            tokio::spawn(async move {
                store
                    .map_patch("ci", &MapPatch::new().incr("n", 1))
                    .await
                    .unwrap();
                store.incr("ci", 1, None).await.unwrap();
            })
            .await
            .unwrap();
        }
    })
    .await;
    let map = store.map_read("ci").await.unwrap().into_inner().unwrap();
    assert_eq!(map.counter("n"), Some(total as i64));
    assert_eq!(
        store.counter("ci").await.unwrap().into_inner(),
        Some(total as i64)
    );
}

pub async fn concurrent_compare_and_set_exact(store: &Store) {
    store.put("cas", "0", None, Condition::Any).await.unwrap();
    let workers = 8;
    let per_worker = 25;
    let tasks = (0..workers).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut conflicts = 0u32;
            for _ in 0..per_worker {
                loop {
                    let cur = store.get("cas").await.unwrap().into_inner().unwrap();
                    let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                    match store
                        .put(
                            "cas",
                            (n + 1).to_string(),
                            None,
                            Condition::IfVersion(cur.version),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.is_conflict() => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        })
    });
    join_all(tasks).await.into_iter().for_each(|r| {
        r.unwrap();
    });
    let cur = store.get("cas").await.unwrap().into_inner().unwrap();
    assert_eq!(cur.value, (workers * per_worker).to_string());
}
