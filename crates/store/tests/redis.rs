//! The conformance suite on a real, private redis-server, plus what only
//! Redis can show: corrupt bytes written behind the store's back, and clear
//! errors for a wrong address.

use std::time::Duration;

use statehouse_store::{Condition, MapPatch, Policy, Store, StoreConfig, StoreError, open};
use statehouse_testkit::{RedisServer, shared_redis, unique_prefix};

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

/// Opening a store on a server that accepts connections but never answers
/// (frozen with SIGSTOP: the kernel still completes the handshake) fails
/// with a clear error; it does not hang. The store's connection gives its
/// commands no timeout of their own (the policy bounds every call), so what
/// opening waits for is bounded separately: redis-rs's handshake by the
/// connect timeout (that is what ends this case), the opening PING by the
/// same timeout in case a server answers the handshake and then stops.
#[tokio::test]
async fn opening_on_a_frozen_server_fails_within_the_timeout() {
    let redis = RedisServer::start().expect("start redis-server");
    redis.pause().unwrap();
    let opening = open(
        StoreConfig::new(redis.url())
            .policy(Policy::fail_closed().with_timeout(Duration::from_millis(300))),
    );
    // Connect and PING are each bounded by 300 ms; 10 s means "hangs".
    let result = tokio::time::timeout(Duration::from_secs(10), opening).await;
    redis.resume().unwrap();
    let err = result.expect("open hung on a frozen server").unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(
        err.to_string().contains(&redis.url()),
        "names the store: {err}"
    );
}

/// A store on `redis` whose calls time out after 200 ms, holding `k{i}` =
/// `v{i}` for `i` in `0..keys`.
async fn store_with_keys(redis: &RedisServer, keys: usize) -> Store {
    let store = open(
        StoreConfig::new(redis.url())
            .policy(Policy::fail_closed().with_timeout(Duration::from_millis(200))),
    )
    .await
    .unwrap();
    for i in 0..keys {
        store
            .put(&format!("k{i}"), format!("v{i}"), None, Condition::Any)
            .await
            .unwrap();
    }
    store
}

/// A read cut short by the policy's timeout while the server is frozen
/// (SIGSTOP) must not leave its late reply for a later read; and reads from
/// many tasks at once each get their own key's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_read_never_hands_its_late_reply_to_another() {
    let redis = RedisServer::start().expect("start redis-server");
    let store = store_with_keys(&redis, 32).await;
    let value = |read: statehouse_store::Read<Option<statehouse_store::Versioned>>| {
        read.value.map(|v| v.value)
    };
    assert_eq!(value(store.get("k0").await.unwrap()), Some("v0".into()));

    for round in 0..3 {
        redis.pause().unwrap();
        // Several reads time out at once, holding several connections.
        let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
        let frozen = futures::future::join_all(keys.iter().map(|k| store.get(k))).await;
        for result in frozen {
            let err = result.unwrap_err();
            assert!(err.is_unavailable(), "round {round}: {err:?}");
        }
        redis.resume().unwrap();
        // The server now answers the abandoned reads too; none of those
        // replies may reach these.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in (6..32).rev() {
            let read = loop {
                match store.get(&format!("k{i}")).await {
                    Ok(read) => break read,
                    // The circuit may still be open for a moment.
                    Err(e) if e.is_unavailable() => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(e) => panic!("round {round}: k{i}: {e:?}"),
                }
            };
            assert_eq!(value(read), Some(format!("v{i}").into()), "round {round}");
        }
    }

    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..200 {
                    let i = (t + n) % 32;
                    let read = store.get(&format!("k{i}")).await.unwrap();
                    assert_eq!(value(read), Some(format!("v{i}").into()));
                    let map = store.map_read(&format!("m{i}")).await.unwrap();
                    assert!(map.value.is_none());
                    assert_eq!(store.counter(&format!("c{i}")).await.unwrap().value, None);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The URL's password and database are used: what the store wrote in
/// database 3 of a password-protected server, it reads back, and it is in
/// database 3.
#[tokio::test]
async fn the_urls_password_and_database_are_used() {
    let redis = RedisServer::start().expect("start redis-server");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://:s3cret@{}/3", redis.addr());
    let store = open(StoreConfig::new(&url)).await.unwrap();
    store
        .put("k", "in db 3", None, Condition::Any)
        .await
        .unwrap();
    let read = store.get("k").await.unwrap();
    assert_eq!(read.value.map(|v| v.value), Some("in db 3".into()));

    let admin = redis::Client::open(format!("redis://:s3cret@{}/3", redis.addr())).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        keys,
        ["v:sh:k"],
        "the store's key (default prefix `sh:`) is in database 3"
    );

    // The direct connections authenticate and select the database too.
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for _ in 0..200 {
        if !direct_connections(&mut admin).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let read = store.get("k").await.unwrap();
    assert_eq!(read.value.map(|v| v.value), Some("in db 3".into()));
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        list.lines().any(|l| l.contains(" name=statehouse-direct ")
            && l.contains(" db=3 ")
            && l.contains(" cmd=get ")),
        "a direct connection in database 3 answered the GET: {list}"
    );
}

/// Calls of `command` the server has answered so far (INFO commandstats).
async fn calls(admin: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A map read is one HGETALL: the time to live comes from the deadline the
/// last patch or touch recorded in the map's meta field, not from a PTTL.
/// A map written before deadlines were recorded (meta `"{version}:{size}"`
/// or `"{version}"`) is still read right, with a PTTL, until its next patch
/// or touch records one.
#[tokio::test]
async fn a_map_read_is_one_command_and_older_maps_still_report_their_ttl() {
    let redis = RedisServer::start().expect("start redis-server");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let store = open(StoreConfig::new(redis.url())).await.unwrap();
    let minute = Duration::from_secs(60);

    store
        .map_patch("new", &MapPatch::new().set("a", "1").ttl(minute))
        .await
        .unwrap();
    store.map_touch("new", minute * 2).await.unwrap();
    let (hgetall, pttl) = (
        calls(&mut admin, "hgetall").await,
        calls(&mut admin, "pttl").await,
    );
    for _ in 0..5 {
        let map = store.map_read("new").await.unwrap().into_inner().unwrap();
        let left = map.expires_in.expect("the map has a TTL");
        assert!(
            left > minute && left <= minute * 2,
            "after the touch: {left:?}"
        );
    }
    assert_eq!(calls(&mut admin, "hgetall").await, hgetall + 5);
    assert_eq!(calls(&mut admin, "pttl").await, pttl, "no PTTL per read");

    // Written by an earlier version: meta without a deadline, one with an
    // expiry, one without.
    for (key, meta) in [("m:sh:old", "7:4"), ("m:sh:older", "7")] {
        redis::pipe()
            .cmd("HSET")
            .arg(key)
            .arg("")
            .arg(meta)
            .arg("f")
            .arg("7:abc")
            .ignore()
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
    }
    redis::cmd("PEXPIRE")
        .arg("m:sh:old")
        .arg(minute.as_millis() as u64)
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let read = |key: &'static str| {
        let store = store.clone();
        async move { store.map_read(key).await.unwrap().into_inner().unwrap() }
    };
    let old = read("old").await;
    assert_eq!(
        (old.version, old.get("f").unwrap().as_ref()),
        (7, &b"abc"[..])
    );
    let left = old.expires_in.expect("its expiry, from PTTL");
    assert!(left > minute / 2 && left <= minute, "{left:?}");
    assert_eq!(read("older").await.expires_in, None);

    // A patch without TTL records the expiry the map has; a touch records
    // the new one (even on a map whose size was never counted).
    store
        .map_patch("old", &MapPatch::new().set("g", "1"))
        .await
        .unwrap();
    store.map_touch("older", minute * 3).await.unwrap();
    let pttl = calls(&mut admin, "pttl").await;
    let old = read("old").await;
    let left = old.expires_in.expect("recorded by the patch");
    assert!(left > minute / 2 && left <= minute, "{left:?}");
    let older = read("older").await;
    let left = older.expires_in.expect("recorded by the touch");
    assert!(left > minute * 2 && left <= minute * 3, "{left:?}");
    assert_eq!(
        calls(&mut admin, "pttl").await,
        pttl,
        "no PTTL once recorded"
    );
    // The uncounted size is counted by the next patch, and checked.
    store
        .map_patch("older", &MapPatch::new().set("h", "22").max_bytes(7))
        .await
        .unwrap();
    let err = store
        .map_patch("older", &MapPatch::new().set("i", "3").max_bytes(7))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { size: 9, .. }),
        "{err:?}"
    );
    assert_eq!(read("older").await.fields.len(), 2);
}

/// The store's direct connections (named `statehouse-direct`), as
/// `CLIENT LIST` shows them: id and last command.
async fn direct_connections(admin: &mut redis::aio::MultiplexedConnection) -> Vec<(u64, String)> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(admin)
        .await
        .unwrap();
    list.lines()
        .filter(|line| line.contains(" name=statehouse-direct "))
        .map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap()
                    .to_owned()
            };
            (field("id=").parse().unwrap(), field("cmd="))
        })
        .collect()
}

/// A call made while no other is in flight sends its command on a direct
/// connection (the calling task writes it and reads the reply, no driver
/// task between): the server sees the GETs there. A call cut short by the
/// policy's timeout closes its direct connection, so the late reply is read
/// by nobody, and later calls get their own values, first on the shared
/// connection, then on a new direct one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_calls_use_a_direct_connection_closed_when_a_call_is_cut_short() {
    let redis = RedisServer::start().expect("start redis-server");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let store = store_with_keys(&redis, 8).await;
    let get = |i: usize| {
        let store = store.clone();
        async move {
            let read = store.get(&format!("k{i}")).await?;
            Ok::<_, StoreError>(read.value.map(|v| v.value))
        }
    };
    // The first call found the pool empty and had one opened in the
    // background.
    let direct = loop {
        let conns = direct_connections(&mut admin).await;
        if let Some(first) = conns.first() {
            break first.0;
        }
        get(0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for i in 0..8 {
        assert_eq!(get(i).await.unwrap(), Some(format!("v{i}").into()));
    }
    let conns = direct_connections(&mut admin).await;
    assert!(
        conns.contains(&(direct, "get".to_owned())),
        "the lone GETs went to the direct connection: {conns:?}"
    );

    redis.pause().unwrap();
    let err = get(1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    redis.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..20 {
        for i in (2..8).rev() {
            let value = loop {
                match get(i).await {
                    Ok(value) => break value,
                    // The circuit may still be open for a moment.
                    Err(e) if e.is_unavailable() => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(e) => panic!("round {round}: k{i}: {e:?}"),
                }
            };
            assert_eq!(value, Some(format!("v{i}").into()), "round {round}");
        }
    }
    let conns = direct_connections(&mut admin).await;
    assert!(
        conns.iter().all(|(id, _)| *id != direct),
        "the connection whose reply was abandoned is closed: {conns:?}"
    );
    assert!(
        conns.iter().any(|(_, cmd)| cmd == "get"),
        "a new direct connection serves lone calls again: {conns:?}"
    );
}

/// A direct connection whose opening was cut short (its runtime shut down
/// while the server was frozen) gives its place back: once the server is
/// back, lone calls from another runtime get a direct connection again.
#[test]
fn a_direct_connection_whose_opening_was_cut_short_is_opened_again() {
    let redis = RedisServer::start().expect("start redis-server");
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let store = first.block_on(async {
        let store = store_with_keys(&redis, 1).await;
        // Let any opening started by `put` finish, then close that
        // connection so the next lone call starts another.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        for (id, _) in direct_connections(&mut admin).await {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async::<()>(&mut admin)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // With the server frozen, a lone call finds the pool empty and has
        // a connection opened, which cannot finish its handshake; the call
        // times out, and the runtime goes with the opening still pending.
        redis.pause().unwrap();
        let err = store.get("k0").await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        store
    });
    drop(first);
    redis.resume().unwrap();

    runtime().block_on(async {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        for _ in 0..200 {
            // The shared connection's driver died with the first runtime:
            // its first calls here may fail while it reconnects.
            let _ = store.get("k0").await;
            if !direct_connections(&mut admin).await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no direct connection was opened again");
    });
}
