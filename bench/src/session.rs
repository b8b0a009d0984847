//! `session-bench`: statehouse-session next to tower-sessions with its Redis
//! store (tower-sessions-redis-store, fred), on the same private
//! redis-server, with the same handler shapes and signed cookies on both
//! sides, driven by the same HTTP client in the same run.
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
//!    Redis GET by `redis-benchmark -c 1` on the same server, and next to
//!    the floor under it: one GET timed in a handler with no session layer,
//!    through the store's client and on a bare socket.

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

use crate::driver::{
    Outcome, Sample, Window, Workload, closed_loop, closed_loop_with, micros_at, new_histogram,
    workers,
};
use crate::workloads::VALUE_BYTES;
use crate::{BoxError, machine, redis_benchmark};

/// What a run measures and where it writes.
#[derive(Debug, Clone)]
pub struct SessionBenchConfig {
    pub concurrency: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests of the lost-update test (fields, then increments).
    pub updates: usize,
    /// Rounds per throughput cell (see [`cell`]).
    pub rounds: usize,
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

/// The key the floor handlers read, and its value: as long as the values
/// redis-benchmark's GET reads here (`-d`).
const PROBE_KEY: &str = "probe";
const PROBE_VALUE: [u8; VALUE_BYTES] = [b'x'; VALUE_BYTES];

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
    fn new() -> Self {
        Self(Arc::new(std::sync::Mutex::new(new_histogram())))
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
        micros_at(&self.lock(), 0.5)
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
    // Signed, as statehouse-session's cookie always is (the project's
    // security default): unsigned, the peer would skip the HMAC our side
    // computes on every request. (Its cookie crate takes 64 bytes of key and
    // signs with 32 of them.)
    let key = tower_sessions::cookie::Key::from(&[3u8; 64]);
    let layer = SessionManagerLayer::new(RedisStore::new(pool))
        .with_secure(false)
        .with_signed(key);
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

/// The floor handlers, each timing one read in a handler with no session
/// layer, from the least a client can wait to the one store call a session
/// read makes: its path and what the report calls it.
const FLOOR: [(&str, &str); FLOORS] = [
    (
        "/socket-get",
        "one GET on a bare socket, RESP by hand (the least any client in a tokio handler waits)",
    ),
    (
        "/redis-rs-get",
        "one GET through redis-rs's ConnectionManager (the store's client under concurrency), no store layer",
    ),
    (
        "/store-get",
        "one GET through the statehouse store (a lone call: its direct connection, policy layer, versioned values)",
    ),
    (
        "/redis-rs-map-read",
        "HGETALL through redis-rs's ConnectionManager: a session read's command, no store layer",
    ),
    (
        "/store-map-read",
        "the store's map read: the one store call a session read makes",
    ),
];
const FLOORS: usize = 5;

/// The RESP bulk string `value` is sent and answered as.
fn bulk(value: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", value.len()).into_bytes();
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    out
}

/// One plain `GET` on a dedicated connection, RESP by hand: the request
/// written whole, then exactly the reply [`PROBE_VALUE`] is answered with.
async fn socket_get(socket: &tokio::sync::Mutex<tokio::net::TcpStream>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = [&b"*2\r\n"[..], &bulk(b"GET"), &bulk(PROBE_KEY.as_bytes())].concat();
    let expected = bulk(&PROBE_VALUE);
    let mut reply = vec![0u8; expected.len()];
    let mut socket = socket.lock().await;
    socket.write_all(&request).await?;
    socket.read_exact(&mut reply).await?;
    if reply != expected {
        return Err(std::io::Error::other("unexpected GET reply"));
    }
    Ok(())
}

/// A GET route that times `read` into `timer`.
fn timed<F, Fut, T, E>(timer: ReadTimer, read: F) -> axum::routing::MethodRouter
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
    E: std::fmt::Display,
{
    get(move || {
        let (timer, read) = (timer.clone(), read.clone());
        async move {
            match timer.time(read()).await {
                Ok(_) => Ok("ok"),
                Err(e) => Err(e.to_string()),
            }
        }
    })
}

/// The floor app ([`FLOOR`]): the same runtime, server and client as the
/// sides, one timer per handler.
async fn floor_app(redis: &RedisServer, timers: &[ReadTimer; FLOORS]) -> Result<Router, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(redis.addr()).await?;
    socket.set_nodelay(true)?;
    let set = [
        &b"*3\r\n"[..],
        &bulk(b"SET"),
        &bulk(PROBE_KEY.as_bytes()),
        &bulk(&PROBE_VALUE),
    ]
    .concat();
    socket.write_all(&set).await?;
    let mut ok = [0u8; 5];
    socket.read_exact(&mut ok).await?;
    if &ok != b"+OK\r\n" {
        return Err("SET of the probe key failed".into());
    }
    let socket = Arc::new(tokio::sync::Mutex::new(socket));
    let client = redis::aio::ConnectionManager::new(redis::Client::open(redis.url())?).await?;
    let store = open(StoreConfig::new(redis.url()).prefix("floor:")).await?;
    store
        .put(
            PROBE_KEY,
            &PROBE_VALUE[..],
            None,
            statehouse_store::Condition::Any,
        )
        .await?;
    let session_like = statehouse_store::MapPatch::new()
        .set("_sh.created", &b"1764633600"[..])
        .set("name", &b"\"v-1\""[..]);
    store.map_patch(PROBE_KEY, &session_like).await?;
    let [
        socket_timer,
        client_timer,
        get_timer,
        client_map_timer,
        map_timer,
    ] = timers.clone();
    let map_store = store.clone();
    let map_client = client.clone();
    // Where the store keeps the map: its prefix, then the map namespace.
    let map_key = format!("m:floor:{PROBE_KEY}");
    let probe: Vec<Vec<u8>> = redis::cmd("HGETALL")
        .arg(&map_key)
        .query_async(&mut client.clone())
        .await?;
    if probe.is_empty() {
        return Err(format!("the store's map is not at {map_key}").into());
    }
    Ok(Router::new()
        .route(
            FLOOR[0].0,
            timed(socket_timer, move || {
                let socket = socket.clone();
                async move { socket_get(&socket).await }
            }),
        )
        .route(
            FLOOR[1].0,
            timed(client_timer, move || {
                let mut client = client.clone();
                async move {
                    redis::cmd("GET")
                        .arg(PROBE_KEY)
                        .query_async::<Option<Vec<u8>>>(&mut client)
                        .await
                }
            }),
        )
        .route(
            FLOOR[2].0,
            timed(get_timer, move || {
                let store = store.clone();
                async move { store.get(PROBE_KEY).await }
            }),
        )
        .route(
            FLOOR[3].0,
            timed(client_map_timer, move || {
                let (mut client, key) = (map_client.clone(), map_key.clone());
                async move {
                    redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async::<Vec<Vec<u8>>>(&mut client)
                        .await
                }
            }),
        )
        .route(
            FLOOR[4].0,
            timed(map_timer, move || {
                let store = map_store.clone();
                async move { store.map_read(PROBE_KEY).await }
            }),
        ))
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
    let timer = ReadTimer::new();
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

/// What the interleaved latency run found.
struct ReadCost {
    added: Vec<Added>,
    /// p50s of the [`FLOOR`] handlers' timed reads, µs, in that order.
    floor: [Option<f64>; FLOORS],
    /// redis-benchmark's GET at one client, the median slice.
    get: redis_benchmark::PeerResult,
}

/// What a session read costs one client, seen two ways.
struct Added {
    side: Side,
    /// HTTP p50s at one client of the handler that never touches the
    /// session and of the one that reads a field, µs.
    noop_p50: Option<f64>,
    read_p50: Option<f64>,
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
    /// For statehouse-session's row of a cell: the pairs of slices in which
    /// it served more requests than tower-sessions.
    ahead: Option<SlicePairs>,
}

impl Measured {
    fn new(side: Side, handler: &'static str, concurrency: usize, sample: &Sample) -> Self {
        let m = Measured {
            side,
            handler,
            concurrency,
            ops: sample.ops_per_sec(),
            p50: sample.micros_at(0.5),
            p99: sample.micros_at(0.99),
            errors: sample.errors,
            ahead: None,
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
        m
    }
}

impl HttpCall {
    /// Calls of `handler` (`read` or `write`) on the instance at `base`,
    /// through a client of its own.
    fn new(base: &str, handler: &str) -> Result<Self, BoxError> {
        Ok(HttpCall {
            http: client()?,
            base: base.to_owned(),
            path: if handler == "write" {
                "/write"
            } else {
                "/read"
            },
            post: handler == "write",
        })
    }
}

/// A closed loop of `concurrency` clients on `handler` (`read` or `write`).
async fn sample(
    base: &str,
    handler: &'static str,
    concurrency: usize,
    window: Window,
) -> Result<Sample, BoxError> {
    closed_loop(Arc::new(HttpCall::new(base, handler)?), concurrency, window).await
}

/// A throughput round measures the two sides in turn, in slices this long:
/// this machine's speed drifts by a factor of two within minutes, and
/// alternating slices of a quarter second put both sides in the same
/// stretches of it.
const SLICE: Duration = Duration::from_millis(250);
/// Unrecorded at the start of each slice, while the clients that just
/// switched sides fill the pipeline again.
const SLICE_RAMP: Duration = Duration::from_millis(25);

/// One side of a throughput round: its clients, with their sessions and
/// connections, kept from slice to slice.
struct Contender {
    workload: Arc<HttpCall>,
    workers: Vec<String>,
}

/// One throughput cell: `rounds` rounds, each on fresh instances of both
/// sides. After a warm-up of each, a round alternates [`SLICE`]s of the two
/// until each side has been measured for `window.measure`, the side that
/// goes first in a pair of slices alternating (A B, B A, ...). Each side's
/// slices are pooled; the pairs of slices in which statehouse-session
/// served more requests are counted.
async fn cell(
    redis: &RedisServer,
    handler: &'static str,
    concurrency: usize,
    rounds: usize,
    window: Window,
) -> Result<[Measured; 2], BoxError> {
    let mut pooled: [Option<Sample>; 2] = [None, None];
    let mut ahead = SlicePairs::default();
    let slices = (window.measure.as_secs_f64() / SLICE.as_secs_f64())
        .ceil()
        .max(1.0) as usize;
    for round in 0..rounds {
        let mut sides = Vec::with_capacity(2);
        for side in [Side::Statehouse, Side::TowerSessions] {
            let pair = start(side, redis, "tp:").await?;
            let workload = Arc::new(HttpCall::new(&pair.urls[0], handler)?);
            let workers = workers(&*workload, concurrency).await?;
            let warm = Window {
                warmup: window.warmup,
                measure: Duration::ZERO,
            };
            let (_, workers) = closed_loop_with(Arc::clone(&workload), workers, warm).await?;
            sides.push(Contender { workload, workers });
        }
        for slice in 0..slices {
            let order = if (round + slice) % 2 == 0 {
                [0, 1]
            } else {
                [1, 0]
            };
            let mut rates = [0.0; 2];
            for index in order {
                let side = &mut sides[index];
                let workers = std::mem::take(&mut side.workers);
                let window = Window {
                    warmup: SLICE_RAMP,
                    measure: SLICE,
                };
                let (s, workers) =
                    closed_loop_with(Arc::clone(&side.workload), workers, window).await?;
                side.workers = workers;
                rates[index] = s.ops_per_sec();
                match &mut pooled[index] {
                    Some(total) => total.pool(s),
                    slot @ None => *slot = Some(s),
                }
            }
            ahead.pairs += 1;
            if rates[0] > rates[1] {
                ahead.won += 1;
            }
        }
    }
    let [Some(ours), Some(theirs)] = pooled else {
        return Err("a throughput cell needs at least one round".into());
    };
    let mut ours = Measured::new(Side::Statehouse, handler, concurrency, &ours);
    ours.ahead = Some(ahead);
    println!(
        "  statehouse-session served more in {} of {} pairs of slices",
        ahead.won, ahead.pairs
    );
    Ok([
        ours,
        Measured::new(Side::TowerSessions, handler, concurrency, &theirs),
    ])
}

/// Of a cell's pairs of slices, how many statehouse-session won.
#[derive(Debug, Clone, Copy, Default)]
struct SlicePairs {
    won: usize,
    pairs: usize,
}

/// One request of the interleaved latency run, with the HTTP latencies
/// its answers took.
struct Probe {
    url: String,
    cookie: Option<String>,
    latency_ns: Histogram<u64>,
}

impl Probe {
    fn new(url: String, cookie: Option<String>) -> Self {
        Probe {
            url,
            cookie,
            latency_ns: new_histogram(),
        }
    }

    fn p50_micros(&self) -> Option<f64> {
        micros_at(&self.latency_ns, 0.5)
    }
}

/// One client sends every probe's request once per round, in a new order
/// each round, for `length`: whatever the machine does meanwhile, and
/// whatever one request leaves behind for the next, falls on all of them
/// alike.
async fn interleave(
    http: &reqwest::Client,
    probes: &mut [Probe],
    length: Duration,
) -> Result<(), BoxError> {
    let until = std::time::Instant::now() + length;
    let mut order: Vec<usize> = (0..probes.len()).collect();
    // xorshift64: a fixed seed is enough to vary the order.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    while std::time::Instant::now() < until {
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        for &index in &order {
            let probe = &mut probes[index];
            let began = std::time::Instant::now();
            let mut request = http.get(&probe.url);
            if let Some(cookie) = &probe.cookie {
                request = request.header("cookie", cookie);
            }
            let response = request.send().await?;
            if !response.status().is_success() {
                return Err(format!("{}: {}", probe.url, response.status()).into());
            }
            response.bytes().await?;
            let nanos = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
            probe.latency_ns.saturating_record(nanos);
        }
    }
    Ok(())
}

/// Slices the latency run is cut into, with a redis-benchmark run between
/// each two: the GET reference sees the same stretch of the machine's
/// time as the handlers do.
const LATENCY_SLICES: usize = 4;

/// What a session read adds, measured with the handlers interleaved
/// request by request and redis-benchmark's GET run in slices between.
async fn read_cost(redis: &RedisServer, window: Window) -> Result<ReadCost, BoxError> {
    let http = client()?;
    let mut probes = Vec::new();
    let mut timers = Vec::new();
    for side in [Side::Statehouse, Side::TowerSessions] {
        let pair = start(side, redis, "rt:").await?;
        let base = &pair.urls[0];
        let first = http.post(format!("{base}/write")).send().await?;
        let cookie = set_cookie(&first).ok_or("no session cookie")?;
        for path in ["/noop", "/read", "/read-timed"] {
            probes.push(Probe::new(format!("{base}{path}"), Some(cookie.clone())));
        }
        timers.push(pair.timer);
    }
    let floor: [ReadTimer; FLOORS] = std::array::from_fn(|_| ReadTimer::new());
    let base = serve(floor_app(redis, &floor).await?).await?;
    for (path, _) in FLOOR {
        probes.push(Probe::new(format!("{base}{path}"), None));
    }

    interleave(&http, &mut probes, window.warmup).await?;
    probes.iter_mut().for_each(|p| p.latency_ns.reset());
    timers.iter().chain(&floor).for_each(ReadTimer::reset);
    redis_benchmark::prime(redis.addr()).await?;
    // Twice the cell length: each probe gets a share of the requests.
    let slice = window.measure * 2 / LATENCY_SLICES as u32;
    let mut gets = Vec::new();
    for _ in 0..LATENCY_SLICES {
        interleave(&http, &mut probes, slice).await?;
        gets.push(redis_benchmark::run(redis.addr(), "GET", 1, slice).await?);
    }
    // The median slice by p50 stands for redis-benchmark.
    gets.sort_by(|a, b| {
        a.p50_us
            .partial_cmp(&b.p50_us)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let get = gets.swap_remove(LATENCY_SLICES / 2);

    let added = [Side::Statehouse, Side::TowerSessions]
        .into_iter()
        .enumerate()
        .map(|(i, side)| Added {
            side,
            noop_p50: probes[3 * i].p50_micros(),
            read_p50: probes[3 * i + 1].p50_micros(),
            in_handler: timers[i].p50_micros(),
        })
        .collect();
    let floor = floor.each_ref().map(ReadTimer::p50_micros);
    Ok(ReadCost { added, floor, get })
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
                    let s = sample(&pair.urls[0], handler, concurrency, window).await?;
                    Measured::new(side, handler, concurrency, &s);
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

    println!(
        "throughput and latency, one instance per side, a session per client, {} rounds per cell",
        config.rounds
    );
    let mut rows = Vec::new();
    for handler in ["read", "write"] {
        for &concurrency in &config.concurrency {
            rows.extend(cell(&redis, handler, concurrency, config.rounds, window).await?);
        }
    }

    println!("what a session read adds, one client, the handlers interleaved");
    let cost = read_cost(&redis, window).await?;
    let ReadCost { added, floor, get } = &cost;
    for a in added {
        println!(
            "  {:<28} session read timed in the handler: p50 {}",
            a.side.label(),
            micros(a.in_handler)
        );
    }
    for ((_, what), p50) in FLOOR.iter().zip(*floor) {
        println!("  floor: {what}: p50 {}", micros(p50));
    }
    println!(
        "  redis-benchmark GET -c 1 (median of {LATENCY_SLICES} slices): {:.0} req/s, p50 {}",
        get.rps,
        micros(get.p50_us)
    );

    let report = render(&config, &machine, &load_before, &losses, &rows, &cost);
    std::fs::write(&config.out, &report)?;
    println!("\n{}", summary(&losses, &rows, &cost).join("\n"));
    println!("\nwrote {}", config.out.display());
    Ok(())
}

fn summary(losses: &[(Side, Losses)], rows: &[Measured], cost: &ReadCost) -> Vec<String> {
    let ReadCost { added, floor, get } = cost;
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
            let ahead = ours.ahead.map_or(String::new(), |a| {
                format!("; ahead in {} of {} pairs of slices", a.won, a.pairs)
            });
            lines.push(format!(
                "{} c={}: statehouse {:.0} req/s vs tower-sessions {:.0} req/s = {:.2}x{ahead}; p99 {} vs {}",
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
            if let (Some(t), Some(f)) = (a.in_handler, floor[0]) {
                lines.push(format!(
                    "{}: that read is {:.2}x the floor, one GET on a bare socket timed in the same place ({f:.0} µs)",
                    a.side.label(),
                    t / f
                ));
            }
            if let (Some(n), Some(r)) = (a.noop_p50, a.read_p50) {
                let add = r - n;
                lines.push(format!(
                    "{}: the read handler's HTTP p50 minus the no-session handler's: {add:.0} µs (read {r:.0} − no-session {n:.0}); ratio to the GET {:.2}",
                    a.side.label(),
                    add / get_p50
                ));
            }
        }
        for ((_, what), p50) in FLOOR.iter().zip(floor) {
            if let Some(f) = p50 {
                lines.push(format!(
                    "floor: {what}, timed in a handler with no session layer: {f:.0} µs at p50; ratio to redis-benchmark's {:.2}",
                    f / get_p50
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
    cost: &ReadCost,
) -> String {
    let ReadCost { added, floor, get } = cost;
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
    for line in summary(losses, rows, cost) {
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
        "\n## Throughput and latency\n\nOne instance per side, in this process, on the same Redis; a closed loop of HTTP/1.1 clients (reqwest, keep-alive), each with a session of its own; {} rounds per cell, each on fresh instances of both sides: {} warm-up of each, then the two sides measured in turn in slices of {} (the first {} of each unrecorded) until each has been measured for {} in that round, the side that goes first in a pair of slices alternating; a side's slices are pooled. This machine's speed drifts by up to a factor of two within minutes, so sides measured whole one after the other can land in different stretches of it; alternating slices keeps them in the same ones. `ahead` counts the pairs of slices in which statehouse-session served more requests. `read`: the handler reads one field; `write`: it sets one field. Both sides sign their session cookie (HMAC-SHA256; tower-sessions with `with_signed`), as statehouse-session always does.\n",
        config.rounds,
        humantime(config.warmup),
        humantime(SLICE),
        humantime(SLICE_RAMP),
        humantime(config.duration),
    );
    let _ = writeln!(
        md,
        "| handler | clients | side | req/s | p50 | p99 | errors | ahead |\n|---|---|---|---|---|---|---|---|"
    );
    for m in rows {
        let ahead = m
            .ahead
            .map_or(String::new(), |a| format!("{} of {}", a.won, a.pairs));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {ahead} |",
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
        "\n## What a session read adds\n\nOne client sends, in turn, a request to each handler below (both sides' no-session, read and timed-read handlers, and the floor handlers), in a new order each round, so that whatever the machine does meanwhile, and whatever one request leaves behind for the next, falls on all of them alike; `redis-benchmark -t GET -c 1 -P 1` (a C client, one round trip) runs on the same server in {LATENCY_SLICES} slices between stretches of that loop, and the median slice is quoted. Two measures: the session read timed inside the handler (`Instant` around the first `get`, which loads the session: the time the handler waits for it), and, as seen by the HTTP client, p50 of the read handler minus p50 of a handler that never touches the session. The second also counts what waiting does to the rest of the request: a runtime thread that slept on Redis comes back to cold caches, where the no-session request never sleeps. The floor rows time one read in a handler of another server in this process with no session layer, from as little as any client in a tokio handler can wait (a GET on a bare socket with RESP written by hand) to the one store call a session read makes (on a map shaped like these sessions). The redis-rs rows go through redis-rs's multiplexed connection, whose driver task each command is handed to and back from; the store sends a call made while no other is in flight on a direct connection instead (the calling task writes the command and reads the reply), so its rows can come in under redis-rs's.\n"
    );
    let _ = writeln!(
        md,
        "| side | in the handler p50 | no-session HTTP p50 | read HTTP p50 | difference |\n|---|---|---|---|---|"
    );
    for a in added {
        let add = match (a.noop_p50, a.read_p50) {
            (Some(n), Some(r)) => format!("{:.0} µs", r - n),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {add} |",
            a.side.label(),
            micros(a.in_handler),
            micros(a.noop_p50),
            micros(a.read_p50)
        );
    }
    for ((_, what), p50) in FLOOR.iter().zip(floor) {
        let _ = writeln!(md, "| floor: {what} | {} | | | |", micros(*p50));
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
