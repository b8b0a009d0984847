//! Health: active checks in a background task, and passive ejection driven by live traffic.
//!
//! **Active.** Every `interval`, each instance of the current set is probed ([`HealthCheck`];
//! the standard one is an HTTP `GET` of `health.path` with `health.timeout`). `fall` consecutive
//! failures take a healthy instance out, `rise` consecutive successes bring it back. The checker
//! reads the set afresh each round, so added and removed instances need no bookkeeping.
//!
//! **Passive.** `consecutive_failures` connect failures (and 5xx answers, if `on_5xx`) in a
//! row eject an instance for `ejection_time`, unless that would put more than
//! `max_ejected_percent` of the instances out at once.
//!
//! **Fail open.** Neither takes the last instances away: when none is usable, the proxy sends
//! traffic to the non-draining ones anyway (see `proxy`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{HealthConfig, PassiveConfig};
use crate::discovery::{Backend, BackendSet};
use crate::metrics::inc;

/// Probes one instance.
pub trait HealthCheck: Send + Sync + 'static {
    /// True if the instance is healthy.
    fn check(&self, backend: &Backend) -> impl Future<Output = bool> + Send;
}

/// `GET http://{addr}{path}`; healthy on a 2xx within the timeout. A fresh connection per probe
/// (no pool), so the probe sees what a new connection would see.
#[derive(Debug, Clone)]
pub struct HttpHealthCheck {
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
    path: String,
    timeout: Duration,
}

impl HttpHealthCheck {
    /// A checker for `config.path` with `config.timeout`.
    pub fn new(config: &HealthConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            client,
            path: config.path.clone(),
            timeout: config.timeout,
        }
    }
}

impl HealthCheck for HttpHealthCheck {
    async fn check(&self, backend: &Backend) -> bool {
        let Ok(uri) = format!("http://{}{}", backend.addr(), self.path).parse::<http::Uri>() else {
            return false;
        };
        let req = http::Request::get(uri)
            .header(http::header::USER_AGENT, "statehouse-lb-health")
            .body(Empty::new())
            .expect("a GET with a parsed URI and a static header is a valid request");
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => resp.status().is_success(),
            _ => false,
        }
    }
}

/// Rise/fall counting for one instance.
#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    ok: u32,
    failed: u32,
}

/// Runs active checks until `shutdown` flips. Each round probes every instance concurrently.
pub(crate) async fn run_checker<H: HealthCheck>(
    set: Arc<BackendSet>,
    check: Arc<H>,
    config: HealthConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut streaks: HashMap<String, Streak> = HashMap::new();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let backends = set.backends();
        let mut probes = tokio::task::JoinSet::new();
        for b in backends.iter() {
            let (b, check) = (Arc::clone(b), Arc::clone(&check));
            probes.spawn(async move {
                let ok = check.check(&b).await;
                (b, ok)
            });
        }
        while let Some(done) = probes.join_next().await {
            // A probe task only panics if the checker does; treat that as a failed probe of
            // nobody in particular and keep checking the rest.
            let Ok((b, ok)) = done else { continue };
            let s = streaks.entry(b.name().to_owned()).or_default();
            if ok {
                s.ok += 1;
                s.failed = 0;
                if !b.is_healthy() && s.ok >= config.rise {
                    tracing::info!(instance = b.name(), "instance healthy again");
                    b.set_healthy(true);
                    b.reset_failures();
                }
            } else {
                s.failed += 1;
                s.ok = 0;
                if b.is_healthy() && s.failed >= config.fall {
                    tracing::warn!(instance = b.name(), "instance failed its health checks");
                    b.set_healthy(false);
                }
            }
        }
        streaks.retain(|name, _| backends.iter().any(|b| b.name() == name));
    }
}

/// What an attempt on an instance came to, as far as passive health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// An answer that is not a failure.
    Success,
    /// The connection could not be made.
    ConnectFailure,
    /// A 5xx answer.
    ServerError,
    /// Reset, timeout: counted as an error, but not towards ejection (a slow request is not
    /// evidence that the instance is gone).
    OtherFailure,
}

/// Records an attempt's outcome for passive ejection; ejects when the streak is long enough and
/// the cap allows it.
pub(crate) fn record_outcome(
    set: &BackendSet,
    backend: &Backend,
    outcome: Outcome,
    config: &PassiveConfig,
) {
    let counts = match outcome {
        Outcome::Success => {
            backend.record_success();
            return;
        }
        Outcome::ConnectFailure => true,
        Outcome::ServerError => config.on_5xx,
        Outcome::OtherFailure => false,
    };
    if !counts || config.consecutive_failures == 0 {
        return;
    }
    if backend.record_failure() < config.consecutive_failures || backend.is_ejected() {
        return;
    }
    let all = set.backends();
    let ejected = all.iter().filter(|b| b.is_ejected()).count();
    // The cap: at most max_ejected_percent of the instances out at once (rounded down, so with
    // 50% and 3 instances, one may be ejected).
    let cap = all.len() * config.max_ejected_percent as usize / 100;
    if ejected + 1 > cap {
        tracing::warn!(
            instance = backend.name(),
            "passive ejection skipped: cap reached"
        );
        return;
    }
    tracing::warn!(
        instance = backend.name(),
        "instance ejected after consecutive failures"
    );
    backend.eject_until(Instant::now() + config.ejection_time);
    backend.reset_failures();
    inc(&backend.metrics.ejections);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InstanceConfig, LbConfig};

    fn set(n: usize) -> BackendSet {
        let instances: Vec<InstanceConfig> = (0..n)
            .map(|i| InstanceConfig {
                name: format!("i{i}"),
                addr: format!("127.0.0.1:{}", 1000 + i),
            })
            .collect();
        BackendSet::new(&LbConfig::from_toml_str("").unwrap(), &instances)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_connect_failures_eject_for_the_ejection_time() {
        let s = set(4);
        let cfg = PassiveConfig {
            consecutive_failures: 3,
            ..PassiveConfig::default()
        };
        let b = s.get("i0").unwrap();
        record_outcome(&s, &b, Outcome::ConnectFailure, &cfg);
        record_outcome(&s, &b, Outcome::ConnectFailure, &cfg);
        record_outcome(&s, &b, Outcome::Success, &cfg);
        record_outcome(&s, &b, Outcome::ConnectFailure, &cfg);
        record_outcome(&s, &b, Outcome::ConnectFailure, &cfg);
        assert!(!b.is_ejected(), "a success in between resets the streak");
        record_outcome(&s, &b, Outcome::ConnectFailure, &cfg);
        assert!(b.is_ejected());
        tokio::time::advance(cfg.ejection_time + Duration::from_millis(1)).await;
        assert!(!b.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_is_capped_as_a_share_of_instances() {
        let s = set(4);
        let cfg = PassiveConfig {
            consecutive_failures: 1,
            max_ejected_percent: 50,
            ..PassiveConfig::default()
        };
        for name in ["i0", "i1", "i2", "i3"] {
            record_outcome(&s, &s.get(name).unwrap(), Outcome::ServerError, &cfg);
        }
        let out = s.backends().iter().filter(|b| b.is_ejected()).count();
        assert_eq!(out, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_do_not_eject_and_5xx_only_when_configured() {
        let s = set(2);
        let cfg = PassiveConfig {
            consecutive_failures: 1,
            on_5xx: false,
            max_ejected_percent: 100,
            ..PassiveConfig::default()
        };
        let b = s.get("i0").unwrap();
        record_outcome(&s, &b, Outcome::OtherFailure, &cfg);
        record_outcome(&s, &b, Outcome::ServerError, &cfg);
        assert!(!b.is_ejected());
        record_outcome(&s, &b, Outcome::ConnectFailure, &cfg);
        assert!(b.is_ejected());
    }

    #[derive(Debug)]
    struct Scripted(std::sync::Mutex<Vec<bool>>);
    impl HealthCheck for Scripted {
        async fn check(&self, _b: &Backend) -> bool {
            self.0.lock().unwrap().remove(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rise_and_fall() {
        let s = Arc::new(set(1));
        let b = s.get("i0").unwrap();
        let script = vec![
            false, true, false, false, true, true, true, true, true, true,
        ];
        let check = Arc::new(Scripted(std::sync::Mutex::new(script)));
        let cfg = HealthConfig {
            interval: Duration::from_secs(1),
            rise: 2,
            fall: 2,
            ..HealthConfig::default()
        };
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(run_checker(Arc::clone(&s), check, cfg, rx));
        let mut seen = Vec::new();
        for _ in 0..6 {
            // The first tick fires at once; each later one after a second.
            tokio::time::sleep(Duration::from_millis(500)).await;
            seen.push(b.is_healthy());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        task.abort();
        // Probes: F (1 failure: still up), T, F, F (fall=2: down), T (1 success: still down), T (up).
        assert_eq!(seen, [true, true, true, false, false, true]);
    }
}
