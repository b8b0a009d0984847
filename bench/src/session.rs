//! `session-bench`: statehouse-session next to tower-sessions with its Redis
//! store (tower-sessions-redis-store, fred), on the same private
//! redis-server, with the same handler shapes, driven by the same HTTP
//! client in the same run.
//!
//! It measures:
//! 1. lost updates: two instances of each app share one Redis; 1,000
//!    concurrent requests (100 in flight) of one session each write a
//!    distinct field, then 1,000 concurrent requests each add 1 to one
//!    counter field; how many of the fields and increments are there after;
//! 2. throughput and latency of a session-reading and a session-writing
//!    handler, at several concurrency levels, each client with a session of
//!    its own;
//! 3. what a session read adds to a request (read handler minus a handler
//!    that never touches the session, p50 at one client), next to one raw
//!    Redis GET by `redis-benchmark -c 1` on the same server.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::{get, post};
use futures::future::join_all;
use hdrhistogram::Histogram;
use statehouse_session::{SessionConfig, SessionError, SessionKeys, SessionLayer};
use statehouse_store::{StoreConfig, open};
use statehouse_testkit::RedisServer;

use crate::driver::{Outcome, Sample, Window, Workload, closed_loop};
use crate::{BoxError, machine, redis_benchmark};

/// What a run measures and where it writes.
#[derive(Debug, Clone)]
pub struct SessionBenchConfig {
    pub concurrency: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests of the lost-update test (fields, then increments).
    pub updates: usize,
    pub out: PathBuf,
    pub command: String,
    /// Only the throughput cells (for profiling one side): no lost-update
    /// test, no read-cost comparison, no report file.
    pub throughput_only: Option<ThroughputOnly>,
}

/// A narrowed run for profiling.
#[derive(Debug, Clone)]
pub struct ThroughputOnly {
    pub statehouse: bool,
    pub tower_sessions: bool,
    pub handler: String,
}

/// The two session layers under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Statehouse,
    TowerSessions,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Statehouse => "statehouse-session",
            Side::TowerSessions => "tower-sessions + RedisStore",
        }
    }
}

/// A value no earlier write stored, so every write handler call changes the
/// session on both sides.
fn next_value() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "someone-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Durations of session reads timed inside the `/read-timed` handler, in
/// nanoseconds: what the handler waits for its session, without the HTTP
/// exchange around it.
#[derive(Clone)]
struct ReadTimer(Arc<std::sync::Mutex<Histogram<u64>>>);

impl ReadTimer {
    fn new() -> Result<Self, BoxError> {
        // 1 ns to 60 s: `saturating_record` clamps rather than resizes.
        let histogram = Histogram::new_with_bounds(1, 60_000_000_000, 3)?;
        Ok(Self(Arc::new(std::sync::Mutex::new(histogram))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Times `read` and records it.
    async fn time<T>(&self, read: impl Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = read.await;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lock().saturating_record(nanos);
        out
    }

    fn reset(&self) {
        self.lock().reset();
    }

    fn p50_micros(&self) -> Option<f64> {
        let h = self.lock();
        (!h.is_empty()).then(|| h.value_at_quantile(0.5) as f64 / 1000.0)
    }
}

/// The statehouse app: the handler shapes every measurement uses.
fn statehouse_app(store: statehouse_store::Store, timer: ReadTimer) -> Router {
    use statehouse_session::Session;
    let keys = SessionKeys::new([("bench", vec![3u8; 32])]).expect("fixed bench key");
    let config = SessionConfig::new(keys).insecure_cookie_for_local_dev();
    Router::new()
        .route("/noop", get(|| async { "ok" }))
        .route(
            "/read",
            get(|s: Session| async move {
                let name: Option<String> = s.get("name").await?;
                Ok::<_, SessionError>(name.unwrap_or_default())
            }),
        )
        .route(
            "/read-timed",
            get(move |s: Session| {
                let timer = timer.clone();
                async move {
                    let name: Option<String> = timer.time(s.get("name")).await?;
                    Ok::<_, SessionError>(name.unwrap_or_default())
                }
            }),
        )
        .route(
            "/write",
            // A new value every time: a layer may skip saving an unchanged
            // value, and this handler is here to measure a write.
            post(|s: Session| async move {
                s.insert("name", &next_value())?;
                Ok::<_, SessionError>("ok")
            }),
        )
        .route(
            "/field/{i}",
            post(|s: Session, Path(i): Path<usize>| async move {
                s.insert(&format!("f{i}"), &i)?;
                Ok::<_, SessionError>("ok")
            })
            .get(|s: Session, Path(i): Path<usize>| async move {
                let v: Option<usize> = s.get(&format!("f{i}")).await?;
                Ok::<_, SessionError>(v.map(|v| v.to_string()).unwrap_or_default())
            }),
        )
        .route(
            "/incr",
            post(|s: Session| async move {
                Ok::<_, SessionError>(s.increment("n", 1).await?.to_string())
            })
            .get(|s: Session| async move {
                let n: Option<i64> = s.get("n").await?;
                Ok::<_, SessionError>(n.unwrap_or_default().to_string())
            }),
        )
        .layer(SessionLayer::new(store, config))
}

/// The tower-sessions app, handler for handler. Its `Session` loads the
/// whole record and saves the whole record after a change: that is the
/// design the lost-update test exposes.
fn tower_sessions_app(pool: fred::prelude::Pool, timer: ReadTimer) -> Router {
    use tower_sessions::{Session, SessionManagerLayer};
    use tower_sessions_redis_store::RedisStore;
    type Failure = (axum::http::StatusCode, String);
    fn fail(e: impl std::fmt::Display) -> Failure {
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
    let layer = SessionManagerLayer::new(RedisStore::new(pool)).with_secure(false);
    Router::new()
        .route("/noop", get(|| async { "ok" }))
        .route(
            "/read",
            get(|s: Session| async move {
                let name: Option<String> = s.get("name").await.map_err(fail)?;
                Ok::<_, Failure>(name.unwrap_or_default())
            }),
        )
        .route(
            "/read-timed",
            get(move |s: Session| {
                let timer = timer.clone();
                async move {
                    let name: Option<String> = timer.time(s.get("name")).await.map_err(fail)?;
                    Ok::<_, Failure>(name.unwrap_or_default())
                }
            }),
        )
        .route(
            "/write",
            post(|s: Session| async move {
                s.insert("name", next_value()).await.map_err(fail)?;
                Ok::<_, Failure>("ok")
            }),
        )
        .route(
            "/field/{i}",
            post(|s: Session, Path(i): Path<usize>| async move {
                s.insert(&format!("f{i}"), i).await.map_err(fail)?;
                Ok::<_, Failure>("ok")
            })
            .get(|s: Session, Path(i): Path<usize>| async move {
                let v: Option<usize> = s.get(&format!("f{i}")).await.map_err(fail)?;
                Ok::<_, Failure>(v.map(|v| v.to_string()).unwrap_or_default())
            }),
        )
        .route(
            "/incr",
            // Read-modify-write, as an application does with a whole-record
            // session: there is no atomic increment to call.
            post(|s: Session| async move {
                let n: i64 = s.get("n").await.map_err(fail)?.unwrap_or(0);
                s.insert("n", n + 1).await.map_err(fail)?;
                Ok::<_, Failure>((n + 1).to_string())
            })
            .get(|s: Session| async move {
                let n: Option<i64> = s.get("n").await.map_err(fail)?;
                Ok::<_, Failure>(n.unwrap_or_default().to_string())
            }),
        )
        .layer(layer)
}

/// Two instances of one side on one Redis.
struct Pair {
    urls: [String; 2],
    /// The `/read-timed` handler's timings, of both instances.
    timer: ReadTimer,
}

async fn serve(router: Router) -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            eprintln!("bench server on {addr} stopped: {e}");
        }
    });
    Ok(format!("http://{addr}"))
}

async fn start(side: Side, redis: &RedisServer, prefix: &str) -> Result<Pair, BoxError> {
    let mut urls = Vec::new();
    let timer = ReadTimer::new()?;
    for _ in 0..2 {
        let router = match side {
            Side::Statehouse => {
                let store = open(StoreConfig::new(redis.url()).prefix(prefix)).await?;
                statehouse_app(store, timer.clone())
            }
            Side::TowerSessions => {
                use fred::prelude::*;
                let config = Config::from_url(&redis.url())?;
                let pool = Builder::from_config(config).build_pool(4)?;
                pool.init().await?;
                tower_sessions_app(pool, timer.clone())
            }
        };
        urls.push(serve(router).await?);
    }
    let [a, b]: [String; 2] = urls.try_into().map_err(|_| "two instances")?;
    Ok(Pair {
        urls: [a, b],
        timer,
    })
}

fn client() -> Result<reqwest::Client, BoxError> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// The `name=value` of the session cookie a response sets.
fn set_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .next()
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
}

/// Results of the lost-update test on one side.
#[derive(Debug)]
struct Losses {
    fields_acked: usize,
    fields_present: usize,
    increments_acked: usize,
    counter: i64,
}

async fn lost_updates(side: Side, pair: &Pair, updates: usize) -> Result<Losses, BoxError> {
    let http = client()?;
    let first = http.post(format!("{}/write", pair.urls[0])).send().await?;
    let cookie = set_cookie(&first).ok_or("no session cookie")?;
    let in_flight = 100;
    let indices: Vec<usize> = (0..updates).collect();

    let mut fields_acked = 0;
    for wave in indices.chunks(in_flight) {
        let sends = wave.iter().map(|&i| {
            http.post(format!("{}/field/{i}", pair.urls[i % 2]))
                .header("cookie", &cookie)
                .send()
        });
        fields_acked += join_all(sends)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(r) if r.status().is_success()))
            .count();
    }
    let mut increments_acked = 0;
    for wave in indices.chunks(in_flight) {
        let sends = wave.iter().map(|&i| {
            http.post(format!("{}/incr", pair.urls[i % 2]))
                .header("cookie", &cookie)
                .send()
        });
        increments_acked += join_all(sends)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(r) if r.status().is_success()))
            .count();
    }

    let mut fields_present = 0;
    for wave in indices.chunks(in_flight) {
        let reads = wave.iter().map(|&i| {
            let http = http.clone();
            let url = format!("{}/field/{i}", pair.urls[(i + 1) % 2]);
            let cookie = cookie.clone();
            async move {
                let body = http
                    .get(url)
                    .header("cookie", cookie)
                    .send()
                    .await?
                    .text()
                    .await?;
                Ok::<_, reqwest::Error>(body == i.to_string())
            }
        });
        fields_present += join_all(reads)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(true)))
            .count();
    }
    let counter = http
        .get(format!("{}/incr", pair.urls[0]))
        .header("cookie", &cookie)
        .send()
        .await?
        .text()
        .await?
        .parse()
        .unwrap_or(-1);
    let losses = Losses {
        fields_acked,
        fields_present,
        increments_acked,
        counter,
    };
    println!("  {:<28} {losses:?}", side.label());
    Ok(losses)
}

/// One HTTP request, repeated by the closed-loop driver; each task has a
/// session (cookie) of its own.
struct HttpCall {
    http: reqwest::Client,
    base: String,
    path: &'static str,
    post: bool,
}

impl Workload for HttpCall {
    type Worker = String;

    async fn worker(&self, _index: usize) -> Result<String, BoxError> {
        let response = self
            .http
            .post(format!("{}/write", self.base))
            .send()
            .await?;
        Ok(set_cookie(&response).ok_or("no session cookie")?)
    }

    async fn call(&self, cookie: &mut String) -> Outcome {
        let url = format!("{}{}", self.base, self.path);
        let request = if self.post {
            self.http.post(url)
        } else {
            self.http.get(url)
        };
        match request.header("cookie", cookie.as_str()).send().await {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Ok(r) => Outcome::Failed(r.status().to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// What a session read costs one client, seen two ways.
struct Added {
    side: Side,
    noop: Measured,
    read: Measured,
    /// p50 of the session read timed inside the handler, µs.
    in_handler: Option<f64>,
}

#[derive(Debug)]
struct Measured {
    side: Side,
    handler: &'static str,
    concurrency: usize,
    ops: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    errors: u64,
}

async fn measure(
    side: Side,
    base: &str,
    handler: &'static str,
    concurrency: usize,
    window: Window,
) -> Result<Measured, BoxError> {
    let (path, post) = match handler {
        "read" => ("/read", false),
        "read-timed" => ("/read-timed", false),
        "write" => ("/write", true),
        _ => ("/noop", false),
    };
    let workload = Arc::new(HttpCall {
        http: client()?,
        base: base.to_owned(),
        path,
        post,
    });
    let sample: Sample = closed_loop(workload, concurrency, window).await?;
    let m = Measured {
        side,
        handler,
        concurrency,
        ops: sample.ops_per_sec(),
        p50: sample.micros_at(0.5),
        p99: sample.micros_at(0.99),
        errors: sample.errors,
    };
    println!(
        "  {:<28} {:<6} c={:<4} {:>9.0} req/s  p50 {:>8}  p99 {:>8}  errors {}",
        side.label(),
        handler,
        concurrency,
        m.ops,
        micros(m.p50),
        micros(m.p99),
        m.errors
    );
    Ok(m)
}

fn micros(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} µs"))
}

/// Runs everything and writes the report.
pub async fn run(config: SessionBenchConfig) -> Result<(), BoxError> {
    let machine = machine::describe().await;
    let load_before = machine::load_average();
    let redis = tokio::task::spawn_blocking(RedisServer::start).await??;
    let window = Window {
        warmup: config.warmup,
        measure: config.duration,
    };

    if let Some(only) = &config.throughput_only {
        let sides = [
            (Side::Statehouse, only.statehouse),
            (Side::TowerSessions, only.tower_sessions),
        ];
        let handler: &'static str = if only.handler == "write" {
            "write"
        } else {
            "read"
        };
        for &concurrency in &config.concurrency {
            for (side, wanted) in sides {
                if wanted {
                    let pair = start(side, &redis, "tp:").await?;
                    measure(side, &pair.urls[0], handler, concurrency, window).await?;
                }
            }
        }
        return Ok(());
    }

    println!(
        "lost updates: 2 instances per side, one session, {} requests",
        config.updates
    );
    let mut losses = Vec::new();
    for side in [Side::Statehouse, Side::TowerSessions] {
        let pair = start(side, &redis, "lost:").await?;
        losses.push((side, lost_updates(side, &pair, config.updates).await?));
    }

    println!("throughput and latency, one instance per side, a session per client");
    let mut rows = Vec::new();
    for handler in ["read", "write"] {
        for &concurrency in &config.concurrency {
            // Alternate sides cell by cell so both see the same machine.
            for side in [Side::Statehouse, Side::TowerSessions] {
                let pair = start(side, &redis, "tp:").await?;
                rows.push(measure(side, &pair.urls[0], handler, concurrency, window).await?);
            }
        }
    }

    println!("what a session read adds, one client");
    let mut added = Vec::new();
    for side in [Side::Statehouse, Side::TowerSessions] {
        let pair = start(side, &redis, "rt:").await?;
        let noop = measure(side, &pair.urls[0], "noop", 1, window).await?;
        let read = measure(side, &pair.urls[0], "read", 1, window).await?;
        // Only the measured window's reads count.
        let reset = {
            let timer = pair.timer.clone();
            tokio::spawn(async move {
                tokio::time::sleep(window.warmup).await;
                timer.reset();
            })
        };
        measure(side, &pair.urls[0], "read-timed", 1, window).await?;
        reset.await?;
        let in_handler = pair.timer.p50_micros();
        println!(
            "  {:<28} session read timed in the handler: p50 {}",
            side.label(),
            micros(in_handler)
        );
        added.push(Added {
            side,
            noop,
            read,
            in_handler,
        });
    }
    redis_benchmark::prime(redis.addr()).await?;
    let get = redis_benchmark::run(redis.addr(), "GET", 1, config.duration).await?;
    println!(
        "  redis-benchmark GET -c 1: {:.0} req/s, p50 {}",
        get.rps,
        micros(get.p50_us)
    );

    let report = render(
        &config,
        &machine,
        &load_before,
        &losses,
        &rows,
        &added,
        &get,
    );
    std::fs::write(&config.out, &report)?;
    println!("\n{}", summary(&losses, &rows, &added, &get).join("\n"));
    println!("\nwrote {}", config.out.display());
    Ok(())
}

fn summary(
    losses: &[(Side, Losses)],
    rows: &[Measured],
    added: &[Added],
    get: &redis_benchmark::PeerResult,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (side, l) in losses {
        lines.push(format!(
            "{}: {} of {} acknowledged field writes present ({} lost); counter {} after {} acknowledged increments ({} lost)",
            side.label(),
            l.fields_present,
            l.fields_acked,
            l.fields_acked.saturating_sub(l.fields_present),
            l.counter,
            l.increments_acked,
            l.increments_acked as i64 - l.counter
        ));
    }
    for pair in rows.chunks(2) {
        if let [ours, theirs] = pair {
            lines.push(format!(
                "{} c={}: statehouse {:.0} req/s vs tower-sessions {:.0} req/s = {:.2}x; p99 {} vs {}",
                ours.handler,
                ours.concurrency,
                ours.ops,
                theirs.ops,
                ours.ops / theirs.ops.max(1.0),
                micros(ours.p99),
                micros(theirs.p99)
            ));
        }
    }
    if let Some(get_p50) = get.p50_us {
        for a in added {
            if let Some(t) = a.in_handler {
                lines.push(format!(
                    "{}: a session read timed in the handler takes {t:.0} µs at p50; one redis-benchmark GET p50 {get_p50:.0} µs; ratio {:.2}",
                    a.side.label(),
                    t / get_p50
                ));
            }
            if let (Some(n), Some(r)) = (a.noop.p50, a.read.p50) {
                let add = r - n;
                lines.push(format!(
                    "{}: the read handler's HTTP p50 minus the no-session handler's: {add:.0} µs (read {r:.0} − no-session {n:.0}); ratio to the GET {:.2}",
                    a.side.label(),
                    add / get_p50
                ));
            }
        }
    }
    lines
}

fn render(
    config: &SessionBenchConfig,
    machine: &[(&'static str, String)],
    load_before: &str,
    losses: &[(Side, Losses)],
    rows: &[Measured],
    added: &[Added],
    get: &redis_benchmark::PeerResult,
) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(md, "# statehouse-session vs tower-sessions\n");
    let _ = writeln!(
        md,
        "Produced by `bench/src/bin/session_bench.rs`, run as:\n\n```sh\n{}\n```\n",
        config.command
    );
    let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
    for (what, value) in machine {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    let _ = writeln!(
        md,
        "| load average at start | {load_before} |\n| load average at end | {} |\n",
        machine::load_average()
    );
    let _ = writeln!(md, "## Summary\n");
    for line in summary(losses, rows, added, get) {
        let _ = writeln!(md, "- {line}");
    }
    let _ = writeln!(
        md,
        "\n## Lost updates\n\nTwo instances of each app on one private redis-server; one session; {} requests (100 in flight, alternating instances) each write a distinct field, then {} requests each add 1 to one field (statehouse: `Session::increment`; tower-sessions: get + insert, as an application must). Fields are then read back through the other instance.\n",
        config.updates, config.updates
    );
    let _ = writeln!(
        md,
        "| side | field writes acknowledged | fields present | lost | increments acknowledged | counter | lost |\n|---|---|---|---|---|---|---|"
    );
    for (side, l) in losses {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            side.label(),
            l.fields_acked,
            l.fields_present,
            l.fields_acked.saturating_sub(l.fields_present),
            l.increments_acked,
            l.counter,
            l.increments_acked as i64 - l.counter
        );
    }
    let _ = writeln!(
        md,
        "\n## Throughput and latency\n\nOne instance per side, in this process, on the same Redis; a closed loop of HTTP/1.1 clients (reqwest, keep-alive), each with a session of its own; {} warm-up, {} measured per cell; the sides alternate cell by cell. `read`: the handler reads one field; `write`: it sets one field.\n",
        humantime(config.warmup),
        humantime(config.duration)
    );
    let _ = writeln!(
        md,
        "| handler | clients | side | req/s | p50 | p99 | errors |\n|---|---|---|---|---|---|---|"
    );
    for m in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {} | {} |",
            m.handler,
            m.concurrency,
            m.side.label(),
            m.ops,
            micros(m.p50),
            micros(m.p99),
            m.errors
        );
    }
    let _ = writeln!(
        md,
        "\n## What a session read adds\n\nOne client, next to `redis-benchmark -t GET -c 1 -P 1` on the same server (a C client, one round trip). Two measures: the session read timed inside the handler (`Instant` around the first `get`, which loads the session: the time the handler waits for it), and, as seen by the HTTP client, p50 of the read handler minus p50 of a handler that never touches the session. The second also counts what waiting does to the rest of the request: a runtime thread that slept on Redis comes back to cold caches, where the no-session request never sleeps.\n"
    );
    let _ = writeln!(
        md,
        "| side | in the handler p50 | no-session HTTP p50 | read HTTP p50 | difference |\n|---|---|---|---|---|"
    );
    for a in added {
        let add = match (a.noop.p50, a.read.p50) {
            (Some(n), Some(r)) => format!("{:.0} µs", r - n),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {add} |",
            a.side.label(),
            micros(a.in_handler),
            micros(a.noop.p50),
            micros(a.read.p50)
        );
    }
    let _ = writeln!(
        md,
        "| redis-benchmark GET | {} | | | |\n",
        micros(get.p50_us)
    );
    let _ = writeln!(
        md,
        "Caveats: client, servers and Redis share this machine's two cores; latencies include time a ready task waits for a runtime thread. A tower-sessions session is saved whole, so the lost-update numbers vary from run to run; statehouse's must be 0 in every run (the test suite asserts it: `crates/session/tests/guarantees.rs`)."
    );
    md
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
