//! The policy layer against a real Redis that goes away: cut off through a
//! fault-injecting TCP proxy, hung (blackholed), or killed with SIGKILL and
//! restarted. For each `OnStoreDown` policy:
//! - reads during the outage behave exactly as documented;
//! - no write is acknowledged that the store did not take;
//! - calls succeed again within 1 s of the store's return (a documented
//!   deadline of the policy: 200 ms open circuit + ≤100 ms reconnect backoff,
//!   not a benchmark);
//! - writes go on succeeding afterwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use statehouse_store::{
    BreakerConfig, Condition, OnStoreDown, Policy, ReadState, StoreConfig, StoreError,
    UnavailableKind, open,
};
use statehouse_testkit::{FaultProxy, RedisServer};
use tokio::time::Instant;

/// How long the store stays away (PRODUCT.md: "store down for 5 s").
const OUTAGE: Duration = Duration::from_secs(5);
const RECOVERY_DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The proxy drops every connection and refuses new ones.
    Cut,
    /// The proxy holds connections open and forwards nothing.
    Blackhole,
    /// The Redis process is killed with SIGKILL, then started again.
    Kill,
}

struct Rig {
    redis: RedisServer,
    proxy: FaultProxy,
}

impl Rig {
    fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::Cut => self.proxy.cut(),
            Fault::Blackhole => self.proxy.blackhole(),
            Fault::Kill => self.redis.kill(),
        }
    }

    fn heal(&mut self, fault: Fault) {
        match fault {
            Fault::Cut | Fault::Blackhole => self.proxy.heal(),
            Fault::Kill => {
                tokio::task::block_in_place(|| self.redis.restart()).expect("restart redis-server")
            }
        }
    }
}

/// One write of the background writer: when it started, when it finished,
/// and whether the store acknowledged it.
#[derive(Debug, Clone)]
struct Attempt {
    key: String,
    started: Instant,
    finished: Instant,
    acked: bool,
}

fn policy(on_down: OnStoreDown) -> Policy {
    Policy {
        timeout: Duration::from_millis(300),
        breaker: BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_millis(200),
        },
        on_down,
    }
}

async fn scenario(on_down: OnStoreDown, fault: Fault) {
    let redis = RedisServer::start().expect("start redis-server");
    let proxy = FaultProxy::start(redis.addr()).await.expect("start proxy");
    let url = format!("redis://{}", proxy.addr());
    let mut rig = Rig { redis, proxy };
    let store = open(StoreConfig::new(url).policy(policy(on_down)))
        .await
        .expect("open through the proxy");

    // Read once before the outage, so the stale cache (if any) holds it.
    store
        .put("seen", "before", None, Condition::Any)
        .await
        .unwrap();
    assert_eq!(
        store.get("seen").await.unwrap().value.unwrap().value,
        "before"
    );

    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let writer = {
        let store = store.clone();
        let attempts = attempts.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{i}");
                let started = Instant::now();
                let acked = store
                    .put(&key, "x", None, Condition::IfAbsent)
                    .await
                    .is_ok();
                let finished = Instant::now();
                attempts.lock().unwrap().push(Attempt {
                    key,
                    started,
                    finished,
                    acked,
                });
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.inject(fault);
    let down_since = Instant::now();

    // Reads during the outage, early and late.
    let mut saw_circuit_open = false;
    for pause in [
        Duration::from_millis(700),
        OUTAGE - Duration::from_millis(1200),
    ] {
        tokio::time::sleep(pause).await;
        let seen = store.get("seen").await;
        let unseen = store.get("never-read").await;
        let write = store.put("during", "x", None, Condition::Any).await;
        match write {
            Err(StoreError::Unavailable { kind, .. }) => {
                saw_circuit_open |= kind == UnavailableKind::CircuitOpen
            }
            other => panic!("{fault:?}: a write during the outage must fail, got {other:?}"),
        }
        match on_down {
            OnStoreDown::FailClosed => {
                assert!(
                    matches!(&seen, Err(e) if e.is_unavailable()),
                    "{fault:?} fail-closed: {seen:?}"
                );
                assert!(matches!(&unseen, Err(e) if e.is_unavailable()));
            }
            OnStoreDown::FailOpen => {
                let seen = seen.expect("fail-open reads succeed");
                assert_eq!(seen.state, ReadState::Degraded, "{fault:?}");
                assert_eq!(seen.value, None, "fail-open reads report absent");
                assert_eq!(unseen.unwrap().state, ReadState::Degraded);
            }
            OnStoreDown::ServeStale { max_age, .. } => {
                let cached_age = down_since.elapsed() + Duration::from_millis(300);
                if cached_age < max_age {
                    let seen = seen.expect("a recent read is served stale");
                    assert!(matches!(seen.state, ReadState::Stale { .. }), "{fault:?}");
                    assert_eq!(seen.value.unwrap().value, "before");
                } else {
                    assert!(
                        matches!(&seen, Err(e) if e.is_unavailable()),
                        "past max_age the read fails closed: {seen:?}"
                    );
                }
                assert!(
                    matches!(&unseen, Err(e) if e.is_unavailable()),
                    "nothing cached: fail closed, got {unseen:?}"
                );
            }
        }
    }
    assert!(
        saw_circuit_open,
        "{fault:?}: the breaker opened and failed calls fast"
    );
    let remaining = OUTAGE.saturating_sub(down_since.elapsed());
    tokio::time::sleep(remaining).await;

    rig.heal(fault);
    let back_at = Instant::now();
    loop {
        match store.get("seen").await {
            Ok(read) if read.state == ReadState::Fresh => break,
            _ => {
                assert!(
                    back_at.elapsed() < RECOVERY_DEADLINE,
                    "{fault:?}: calls still fail {:?} after the store returned",
                    back_at.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let recovered_after = back_at.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.notify_one();
    writer.await.unwrap();

    let attempts = attempts.lock().unwrap().clone();
    // No acknowledgement for a write that started after the store went away
    // and finished before it came back: it cannot have been stored.
    let impossible: Vec<_> = attempts
        .iter()
        .filter(|a| a.acked && a.started > down_since && a.finished < back_at)
        .collect();
    assert!(
        impossible.is_empty(),
        "{fault:?}: writes acknowledged while the store was away: {impossible:?}"
    );
    // Every acknowledged write is in the store. (After a kill, Redis without
    // persistence lost what it held before; only later writes are checked.)
    let check_from = match fault {
        Fault::Kill => back_at,
        Fault::Cut | Fault::Blackhole => down_since - Duration::from_secs(3600),
    };
    let mut checked = 0;
    for a in attempts
        .iter()
        .filter(|a| a.acked && a.started > check_from)
    {
        let got = store.get(&a.key).await.unwrap();
        assert!(
            got.is_some(),
            "{fault:?}: acknowledged write {} lost",
            a.key
        );
        checked += 1;
    }
    assert!(checked > 0, "some writes were acknowledged after recovery");
    let after = attempts
        .iter()
        .filter(|a| a.started > back_at + recovered_after);
    assert!(
        after.clone().all(|a| a.acked),
        "{fault:?}: writes fail after recovery: {:?}",
        after.filter(|a| !a.acked).collect::<Vec<_>>()
    );
    eprintln!("{on_down:?} {fault:?}: recovered {recovered_after:?} after the store returned");
}

macro_rules! scenarios {
    ($($name:ident => $policy:expr, $fault:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            scenario($policy, $fault).await;
        }
    )*};
}

const STALE_LONG: OnStoreDown = OnStoreDown::ServeStale {
    max_age: Duration::from_secs(60),
    capacity: 100,
};
const STALE_SHORT: OnStoreDown = OnStoreDown::ServeStale {
    max_age: Duration::from_secs(2),
    capacity: 100,
};

scenarios! {
    fail_closed_cut => OnStoreDown::FailClosed, Fault::Cut;
    fail_closed_blackhole => OnStoreDown::FailClosed, Fault::Blackhole;
    fail_closed_kill => OnStoreDown::FailClosed, Fault::Kill;
    fail_open_cut => OnStoreDown::FailOpen, Fault::Cut;
    fail_open_blackhole => OnStoreDown::FailOpen, Fault::Blackhole;
    fail_open_kill => OnStoreDown::FailOpen, Fault::Kill;
    serve_stale_cut => STALE_LONG, Fault::Cut;
    serve_stale_blackhole => STALE_LONG, Fault::Blackhole;
    serve_stale_kill => STALE_LONG, Fault::Kill;
    serve_stale_expires_cut => STALE_SHORT, Fault::Cut;
}

/// The same policy layer over Postgres: killed and restarted, no write is
/// acknowledged while it is down and calls succeed again quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kill_and_restart_fail_closed() {
    let mut pg = statehouse_testkit::Postgres::start().expect("start postgres");
    let url = pg.create_database("policy").unwrap();
    let store = open(StoreConfig::new(url).policy(policy(OnStoreDown::FailClosed)))
        .await
        .unwrap();
    store.put("k", "v", None, Condition::Any).await.unwrap();
    tokio::task::block_in_place(|| pg.kill());
    let err = store.put("k", "w", None, Condition::Any).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = store.get("k").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    tokio::task::block_in_place(|| pg.restart()).unwrap();
    let back_at = Instant::now();
    loop {
        match store.get("k").await {
            Ok(read) => {
                assert_eq!(
                    read.value.unwrap().value,
                    "v",
                    "the acknowledged write survived"
                );
                break;
            }
            Err(e) => {
                assert!(
                    back_at.elapsed() < RECOVERY_DEADLINE,
                    "still failing {:?} after restart: {e}",
                    back_at.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    store.put("k", "after", None, Condition::Any).await.unwrap();
}
