//! `fanout-bench`: statehouse-fanout's hub next to Socket.IO with
//! `@socket.io/redis-adapter`, same Redis, same load client, same run.
//!
//! Each side runs three server processes on one private `redis-server`:
//! three `bench-hub`s (the hub on the Redis Streams broker) or three
//! `socketio-server.mjs` (WebSocket transport only, Redis adapter). One load
//! client — this program — opens the subscribers, spread round robin over
//! the three, every one in the channel (room) `bench`, speaking either
//! protocol with the same lean code: read a text frame, find the payload,
//! take the sequence number and send time out of it. Then for each rate a
//! publisher sends `rate` messages a second for the step's duration —
//! through the broker for the hub, through `@socket.io/redis-emitter` for
//! Socket.IO — each payload `"{seq} {send time in µs} xxx…"` of the same size.
//!
//! Per rate: deliveries per second, publish-to-deliver latency (p50, p99,
//! p99.9), lost (published × subscribers − delivered, after a drain) and
//! duplicated (a sequence number at or below one already seen on that
//! connection). A rate is *sustained* when p99 is under 50 ms and nothing was
//! lost. Then the memory per idle connection: on three fresh servers, their
//! resident memory before and after opening `idle` subscribed, silent
//! connections.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use statehouse_fanout::{BrokerConfig, open};
use statehouse_testkit::RedisServer;
use statehouse_token::{IssuerConfig, Key, KeyRing, TokenIssuer};

use crate::machine::{cpu_ticks, cpu_ticks_of, cpu_us_per};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::BoxError;

pub const ISSUER: &str = "fanout-bench";
pub const AUDIENCE: &str = "bench";
const CHANNEL: &str = "bench";
/// The bar a rate must pass to count as sustained.
const P99_BAR_US: u64 = 50_000;

/// What one run measures.
#[derive(Debug, Clone)]
pub struct FanoutBenchConfig {
    pub sides: Vec<Side>,
    pub subscribers: usize,
    /// Messages per second into the one channel, in rising order.
    pub rates: Vec<u64>,
    pub step: Duration,
    /// Payload bytes.
    pub size: usize,
    /// Idle connections for the memory measurement (0: skip it).
    pub idle: usize,
    /// The `bench-hub` binary.
    pub hub: PathBuf,
    /// `bench/fanout`, with `npm ci` done.
    pub node_dir: PathBuf,
    pub out: PathBuf,
    pub command: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// statehouse-fanout's hub on the Redis Streams broker.
    Statehouse,
    /// Socket.IO with @socket.io/redis-adapter.
    SocketIo,
    /// The least a fan-out server can do: one `write` per delivery from the
    /// task that got the message, nothing else (`fanout_floor`).
    Floor,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Statehouse => "statehouse hub",
            Side::SocketIo => "Socket.IO + redis-adapter",
            Side::Floor => "floor: one write per delivery",
        }
    }
}

/// One rate's results.
#[derive(Debug, Clone)]
struct Step {
    rate: u64,
    /// Whether the publisher sent the rate's messages in time (within 20%
    /// of the step, process start included); if not, the side could not
    /// take the offered load.
    kept_up: bool,
    published: u64,
    delivered: u64,
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    lost: u64,
    duplicated: u64,
    /// CPU time per delivery (µs) of the three servers, and of this load
    /// client, over the step (from /proc: user + system).
    server_cpu_us: f64,
    client_cpu_us: f64,
}

impl Step {
    fn sustained(&self) -> bool {
        self.kept_up && self.lost == 0 && self.p99_us < P99_BAR_US
    }

    fn verdict(&self) -> &'static str {
        match (self.sustained(), self.kept_up) {
            (true, _) => "yes",
            (false, false) => "no (publisher fell behind)",
            (false, true) => "no",
        }
    }
}

#[derive(Debug, Default)]
struct SideResult {
    steps: Vec<Step>,
    /// Bytes of server memory per idle connection, and the inputs.
    memory: Option<(f64, u64, u64, usize)>,
    version: String,
}

/// What a subscriber reports at the end of a step, then resets.
#[derive(Debug)]
struct Tally {
    latencies: Histogram<u64>,
    unique: u64,
    duplicated: u64,
    /// When this connection got its first and last message of the step (µs).
    first_us: u64,
    last_us: u64,
}

impl Tally {
    fn new() -> Result<Tally, BoxError> {
        Ok(Tally {
            latencies: Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?,
            unique: 0,
            duplicated: 0,
            first_us: u64::MAX,
            last_us: 0,
        })
    }
}

/// Counters shared by every subscriber.
#[derive(Debug, Default)]
struct Shared {
    /// Unique deliveries since the run began.
    delivered: AtomicU64,
    /// The step whose tallies are wanted (bumped, then every subscriber's
    /// `Notify` is poked).
    step: AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

/// The protocol a subscriber speaks.
#[derive(Debug, Clone, Copy)]
enum Dialect {
    Statehouse,
    SocketIo,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `"{seq} {t_us} …"` → `(seq, t_us)`.
fn parse_payload(payload: &str) -> Option<(u64, u64)> {
    let mut parts = payload.splitn(3, ' ');
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((seq, sent))
}

/// The payload inside a frame, without a JSON parser: both payloads are
/// digits, spaces and `x`, so they need no unescaping.
fn frame_payload(dialect: Dialect, text: &str) -> Option<&str> {
    let start = match dialect {
        Dialect::Statehouse => {
            if !text.starts_with(r#"{"t":"msg""#) {
                return None;
            }
            text.find(r#""data":""#)? + 8
        }
        Dialect::SocketIo => {
            let rest = text.strip_prefix("42[\"m\",\"")?;
            return rest.split('"').next();
        }
    };
    text[start..].split('"').next()
}

/// The statehouse publisher (run by `bench-hub publish`, a process of its
/// own like Socket.IO's): `rate` messages a second for `duration` through
/// the broker, the messages due at each tick sent pipelined on the one
/// connection, in order; returns the last sequence number.
pub async fn publish(
    broker: &str,
    rate: u64,
    duration: Duration,
    size: usize,
    first: u64,
) -> Result<u64, BoxError> {
    let broker = open(BrokerConfig::new(broker).max_payload_bytes(size.max(64))).await?;
    let broker = &broker;
    paced(rate, duration, size, first, |batch| async move {
        let mut publishes = futures::stream::iter(batch)
            .map(|payload| broker.publish(CHANNEL, payload))
            .buffered(64);
        while let Some(published) = publishes.next().await {
            published?;
        }
        Ok(())
    })
    .await
}

/// The publishers' pacing: every 5 ms, the messages due by then (`rate` a
/// second for `duration`), each `"{seq} {send time µs} xxx…"` of `size`
/// bytes, handed to `send` in order; returns the last sequence number.
pub(crate) async fn paced<F, Fut>(
    rate: u64,
    duration: Duration,
    size: usize,
    first: u64,
    mut send: F,
) -> Result<u64, BoxError>
where
    F: FnMut(Vec<Bytes>) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let total = rate * duration.as_secs();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut sent = 0;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        let batch: Vec<Bytes> = (sent..due)
            .map(|i| {
                let mut payload = format!("{} {} ", first + i, now_us());
                while payload.len() < size {
                    payload.push('x');
                }
                Bytes::from(payload)
            })
            .collect();
        if !batch.is_empty() {
            send(batch).await?;
        }
        sent = due;
    }
    Ok(first + total - 1)
}

/// Runs a publisher process and reads its `published N last_seq L`.
async fn run_publisher(mut command: Command) -> Result<u64, BoxError> {
    let out = command.output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .find_map(|l| l.strip_prefix("published "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| format!("publisher: {text} {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(last)
}

/// A client-side WebSocket over a plain `TcpStream`, as little as a
/// subscriber needs: the upgrade handshake, masked text frames out, and
/// unmasked frames parsed in place from one buffer (many per `read` when
/// the server batched them) — no allocation per message, so the load client
/// costs far less per delivery than the servers it measures.
struct RawWs {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A complete frame at the front of the buffer: opcode and payload range
/// (past the mask key of a client frame; the floor server reads those).
pub(crate) fn parse_frame(data: &[u8]) -> Option<(u8, std::ops::Range<usize>)> {
    let [b0, b1, ..] = *data else { return None };
    let (len, at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes([*data.get(2)?, *data.get(3)?]) as usize,
            4,
        ),
        127 => {
            let bytes: [u8; 8] = data.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        n => (n as usize, 2),
    };
    // Server frames are never masked (RFC 6455 5.1); client frames always are.
    let at = if b1 & 0x80 != 0 { at + 4 } else { at };
    (data.len() >= at + len).then_some((b0 & 0x0f, at..at + len))
}

/// A final frame: masked for a client (the key is zero: a legal key, and the
/// XOR is a copy), unmasked for the floor server. Our frames are small.
pub(crate) fn encode_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.push(0x80 | opcode);
    if payload.len() < 126 {
        frame.push(mask_bit | payload.len() as u8);
    } else {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    if masked {
        frame.extend_from_slice(&[0, 0, 0, 0]);
    }
    frame.extend_from_slice(payload);
    frame
}

impl RawWs {
    async fn connect(url: &str) -> Result<RawWs, BoxError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("ws://").ok_or("ws:// URLs only")?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = RawWs {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        };
        loop {
            let n = ws.stream.read(&mut ws.buf[ws.end..]).await?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            ws.end += n;
            if let Some(at) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                if !ws.buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&ws.buf[..at]).into_owned();
                    return Err(format!("upgrade refused: {head}").into());
                }
                ws.start = at + 4;
                return Ok(ws);
            }
            if ws.end == ws.buf.len() {
                return Err("handshake response too long".into());
            }
        }
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), BoxError> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(&encode_frame(opcode, payload, true))
            .await?;
        Ok(())
    }

    /// Reads more bytes (cancel-safe: nothing is consumed until it returns).
    async fn fill(&mut self) -> Result<(), BoxError> {
        use tokio::io::AsyncReadExt;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.end += n;
        Ok(())
    }

    /// The next complete frame in the buffer, if any.
    fn frame(&mut self) -> Option<(u8, std::ops::Range<usize>)> {
        let (opcode, range) = parse_frame(&self.buf[self.start..self.end])?;
        let range = self.start + range.start..self.start + range.end;
        self.start = range.end;
        Some((opcode, range))
    }
}

/// One subscriber: connects, subscribes, then tallies deliveries until told
/// to report (`flush`), and stops when `stop` flips.
async fn subscriber(
    url: String,
    dialect: Dialect,
    token: Option<String>,
    shared: Arc<Shared>,
    ready: mpsc::Sender<()>,
    signal: Arc<tokio::sync::Notify>,
    report: mpsc::Sender<Tally>,
) -> Result<(), BoxError> {
    const TEXT: u8 = 1;
    const CLOSE: u8 = 8;
    const PING: u8 = 9;
    const PONG: u8 = 10;
    let mut ws = RawWs::connect(&url).await?;
    if let Dialect::Statehouse = dialect {
        let hello = format!(
            r#"{{"op":"hello","token":"{}"}}"#,
            token.unwrap_or_default()
        );
        ws.send(TEXT, hello.as_bytes()).await?;
        ws.send(
            TEXT,
            format!(r#"{{"op":"sub","ch":"{CHANNEL}"}}"#).as_bytes(),
        )
        .await?;
    }
    let mut ready = Some(ready);
    let mut last = 0u64;
    let mut tally = Tally::new()?;
    let mut reported = 0;
    // One waiter kept across iterations, on a `Notify` of this task's own:
    // re-registering on a shared one per message would have a thousand
    // tasks contend for its lock.
    let mut poked = Box::pin(signal.clone().notified_owned());
    loop {
        // Every complete frame already read, then wait for more.
        let mut fresh = 0;
        let mut replies: Vec<(u8, Vec<u8>)> = Vec::new();
        while let Some((opcode, range)) = ws.frame() {
            let payload = &ws.buf[range];
            match opcode {
                TEXT => {}
                PING => {
                    replies.push((PONG, payload.to_vec()));
                    continue;
                }
                CLOSE => return Err("closed by the server".into()),
                _ => continue,
            }
            let Ok(text) = std::str::from_utf8(payload) else {
                continue;
            };
            if let Some((seq, sent)) = frame_payload(dialect, text).and_then(parse_payload) {
                if seq <= last {
                    tally.duplicated += 1;
                    continue;
                }
                last = seq;
                tally.unique += 1;
                fresh += 1;
                let now = now_us();
                tally.first_us = tally.first_us.min(now);
                tally.last_us = now;
                let _ = tally.latencies.record(now.saturating_sub(sent).max(1));
                continue;
            }
            match dialect {
                Dialect::Statehouse => {
                    if text.starts_with(r#"{"t":"subscribed""#)
                        && let Some(ready) = ready.take()
                    {
                        let _ = ready.send(()).await;
                    }
                }
                Dialect::SocketIo => {
                    if text == "2" {
                        replies.push((TEXT, b"3".to_vec()));
                    } else if text.starts_with("40") {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(()).await;
                        }
                    } else if text.starts_with('0') {
                        replies.push((TEXT, b"40".to_vec()));
                    }
                }
            }
        }
        if fresh > 0 {
            shared.delivered.fetch_add(fresh, Ordering::Relaxed);
        }
        for (opcode, payload) in replies {
            ws.send(opcode, &payload).await?;
        }
        tokio::select! {
            () = &mut poked => {
                poked = Box::pin(signal.clone().notified_owned());
                if shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let step = shared.step.load(Ordering::SeqCst);
                if step > reported {
                    reported = step;
                    let done = std::mem::replace(&mut tally, Tally::new()?);
                    let _ = report.send(done).await;
                }
            }
            read = ws.fill() => read?,
        }
    }
}

/// The servers of one side and how to reach them.
struct Servers {
    children: Vec<Child>,
    urls: Vec<String>,
    dialect: Dialect,
    token: Option<String>,
}

impl Servers {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// CPU time the servers used so far, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let (user, system) = cpu_ticks_of(&self.pids());
        user + system
    }

    /// Resident memory of the servers, in bytes.
    fn rss(&self) -> u64 {
        self.pids().iter().map(|pid| rss_of(*pid)).sum()
    }

    async fn stop(mut self) {
        for child in &mut self.children {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").arg(pid.to_string()).status().await;
            }
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `program args… PORT…` three times and waits for each to print
/// `listening PORT`.
async fn start_three(
    side: Side,
    config: &FanoutBenchConfig,
    redis: &str,
    secret: &str,
) -> Result<Servers, BoxError> {
    let mut children = Vec::new();
    let mut urls = Vec::new();
    for i in 0..3 {
        let port = free_port()?;
        let mut command = match side {
            Side::Statehouse => {
                let mut c = Command::new(&config.hub);
                c.args([port.to_string(), redis.to_owned(), format!("hub-{i}")])
                    .env("BENCH_HUB_SECRET", secret)
                    .env("RUST_LOG", "warn");
                c
            }
            Side::Floor => {
                let mut c = Command::new(&config.hub);
                c.args(["floor".to_owned(), port.to_string(), redis.to_owned()]);
                c
            }
            Side::SocketIo => {
                let mut c = Command::new("node");
                c.arg(config.node_dir.join("socketio-server.mjs")).args([
                    port.to_string(),
                    redis.to_owned(),
                    format!("sio-{i}"),
                ]);
                c
            }
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting a {} server: {e}", side.label()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("listening") {
                    return Ok::<_, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        if !matches!(ready, Ok(Ok(true))) {
            return Err(format!("a {} server did not start", side.label()).into());
        }
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        children.push(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        urls.push(match side {
            Side::Statehouse | Side::Floor => format!("ws://{addr}/ws"),
            Side::SocketIo => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
        });
    }
    let token = match side {
        Side::Statehouse => {
            let ring = KeyRing::new().with_key(Key::hmac("bench", secret.as_bytes())?)?;
            let issuer = TokenIssuer::new(
                ring,
                IssuerConfig::new(ISSUER, AUDIENCE).access_lifetime(Duration::from_secs(3600)),
            )?;
            Some(issuer.issue_access("bench", Default::default())?.0)
        }
        Side::SocketIo | Side::Floor => None,
    };
    Ok(Servers {
        children,
        urls,
        dialect: match side {
            Side::Statehouse | Side::Floor => Dialect::Statehouse,
            Side::SocketIo => Dialect::SocketIo,
        },
        token,
    })
}

/// A set of connected subscribers.
struct Subscribers {
    signals: Vec<Arc<tokio::sync::Notify>>,
    reports: mpsc::Receiver<Tally>,
    count: usize,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), BoxError>>>,
}

async fn connect(servers: &Servers, count: usize) -> Result<Subscribers, BoxError> {
    let shared = Arc::new(Shared::default());
    let mut signals = Vec::with_capacity(count);
    let (report_tx, reports) = mpsc::channel(count.max(1));
    let (ready_tx, mut ready_rx) = mpsc::channel(count.max(1));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let url = servers.urls[i % servers.urls.len()].clone();
        let signal = Arc::new(tokio::sync::Notify::new());
        signals.push(signal.clone());
        tasks.push(tokio::spawn(subscriber(
            url,
            servers.dialect,
            servers.token.clone(),
            shared.clone(),
            ready_tx.clone(),
            signal,
            report_tx.clone(),
        )));
        // Pace the handshakes a little: a burst of thousands at once only
        // measures the accept queue.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(ready_tx);
    for n in 0..count {
        let ready = tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await;
        if !matches!(ready, Ok(Some(()))) {
            let failed = tasks.iter().filter(|t| t.is_finished()).count();
            return Err(
                format!("only {n} of {count} subscribers got ready ({failed} ended)").into(),
            );
        }
    }
    Ok(Subscribers {
        signals,
        reports,
        count,
        shared,
        tasks,
    })
}

impl Subscribers {
    /// Collects every subscriber's tally for the step just ended.
    async fn collect(&mut self, step: u64) -> Result<Tally, BoxError> {
        self.shared.step.store(step, Ordering::SeqCst);
        for signal in &self.signals {
            signal.notify_one();
        }
        let mut all = Tally::new()?;
        for _ in 0..self.count {
            let tally = tokio::time::timeout(Duration::from_secs(30), self.reports.recv())
                .await
                .map_err(|_| "a subscriber did not report")?
                .ok_or("subscribers gone")?;
            all.latencies.add(&tally.latencies)?;
            all.unique += tally.unique;
            all.duplicated += tally.duplicated;
            all.first_us = all.first_us.min(tally.first_us);
            all.last_us = all.last_us.max(tally.last_us);
        }
        Ok(all)
    }

    async fn close(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for signal in &self.signals {
            signal.notify_one();
        }
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Runs the rate ladder and the memory measurement for one side.
async fn run_side(
    side: Side,
    config: &FanoutBenchConfig,
    redis: &RedisServer,
    secret: &str,
) -> Result<SideResult, BoxError> {
    let mut result = SideResult {
        version: match side {
            Side::Statehouse => format!("statehouse-fanout {}", env!("CARGO_PKG_VERSION")),
            Side::SocketIo => node_versions(&config.node_dir),
            Side::Floor => "bench-hub floor (bench/src/fanout_floor.rs)".to_owned(),
        },
        ..SideResult::default()
    };
    let redis_url = redis.url();
    let servers = start_three(side, config, &redis_url, secret).await?;
    println!(
        "-- {}: {} subscribers connecting",
        side.label(),
        config.subscribers
    );
    let mut subs = connect(&servers, config.subscribers).await?;
    println!("{}", Step::header());
    let mut seq = 1;
    let mut failures = 0;
    for (i, &rate) in config.rates.iter().enumerate() {
        let before = subs.shared.delivered.load(Ordering::Relaxed);
        let cpu_before = (servers.cpu_ticks(), cpu_ticks("self"));
        let started = Instant::now();
        let args = [
            redis_url.clone(),
            rate.to_string(),
            config.step.as_secs().to_string(),
            config.size.to_string(),
            seq.to_string(),
        ];
        let command = match side {
            Side::Statehouse => {
                let mut c = Command::new(&config.hub);
                c.arg("publish").args(&args);
                c
            }
            Side::Floor => {
                let mut c = Command::new(&config.hub);
                c.arg("floor-publish").args(&args);
                c
            }
            Side::SocketIo => {
                let mut c = Command::new("node");
                c.arg(config.node_dir.join("socketio-publisher.mjs"))
                    .args(&args);
                c
            }
        };
        let last = run_publisher(command).await?;
        let publish_time = started.elapsed();
        let published = last + 1 - seq;
        seq = last + 1;
        // Drain: until everything arrived, or 5 s without progress.
        let expected = before + published * subs.count as u64;
        let mut seen = subs.shared.delivered.load(Ordering::Relaxed);
        let mut progress = Instant::now();
        while seen < expected && progress.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = subs.shared.delivered.load(Ordering::Relaxed);
            if now > seen {
                progress = Instant::now();
                seen = now;
            }
        }
        let cpu = (
            servers.cpu_ticks().saturating_sub(cpu_before.0),
            cpu_ticks("self").saturating_sub(cpu_before.1),
        );
        let tally = subs.collect(i as u64 + 1).await?;
        let (latencies, unique, duplicated) = (&tally.latencies, tally.unique, tally.duplicated);
        // From the first delivery to the last, plus one message interval.
        let window = tally.last_us.saturating_sub(tally.first_us) as f64 / 1e6 + 1.0 / rate as f64;
        let step = Step {
            rate,
            kept_up: publish_time.as_secs_f64() <= config.step.as_secs_f64() * 1.2,
            published,
            delivered: unique,
            per_second: unique as f64 / window,
            p50_us: latencies.value_at_quantile(0.5),
            p99_us: latencies.value_at_quantile(0.99),
            p999_us: latencies.value_at_quantile(0.999),
            lost: (published * subs.count as u64).saturating_sub(unique),
            duplicated,
            server_cpu_us: cpu_us_per(cpu.0, unique),
            client_cpu_us: cpu_us_per(cpu.1, unique),
        };
        println!("{}", step.text());
        failures = if step.sustained() { 0 } else { failures + 1 };
        result.steps.push(step);
        // Two failing rates in a row: the next ones would only fail harder.
        if failures >= 2 {
            println!("   (two rates over the bar in a row: stopping this side's ladder)");
            break;
        }
    }
    subs.close().await;
    servers.stop().await;

    // The floor holds a socket per connection and nothing else: no memory to compare.
    if config.idle > 0 && side != Side::Floor {
        // On fresh servers: memory the load freed would otherwise be
        // reused by the idle connections and hide part of their cost.
        let servers = start_three(side, config, &redis_url, secret).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = servers.rss();
        println!("-- {}: {} idle connections", side.label(), config.idle);
        let idle = connect(&servers, config.idle).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = servers.rss();
        let per = after.saturating_sub(before) as f64 / config.idle as f64;
        println!(
            "   resident memory {} MiB -> {} MiB: {:.1} KiB per idle connection",
            before / (1 << 20),
            after / (1 << 20),
            per / 1024.0
        );
        result.memory = Some((per, before, after, config.idle));
        idle.close().await;
        servers.stop().await;
    }
    Ok(result)
}

fn node_versions(node_dir: &Path) -> String {
    let lock = std::fs::read_to_string(node_dir.join("package-lock.json")).unwrap_or_default();
    let version = |name: &str| -> String {
        let key = format!("\"node_modules/{name}\"");
        lock.find(&key)
            .and_then(|at| {
                let rest = &lock[at..];
                let v = rest.find("\"version\": \"")? + 12;
                Some(rest[v..].split('"').next()?.to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "socket.io {}, @socket.io/redis-adapter {}, @socket.io/redis-emitter {}, redis (node) {}, node {node}",
        version("socket.io"),
        version("@socket.io/redis-adapter"),
        version("@socket.io/redis-emitter"),
        version("redis"),
    )
}

impl Step {
    fn header() -> String {
        format!(
            "{:>7} {:>9} {:>12} {:>12} {:>9} {:>9} {:>9} {:>8} {:>6} {:>10} {:>10}  {}",
            "msg/s",
            "published",
            "delivered",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "lost",
            "dup",
            "srv µs/d",
            "cli µs/d",
            "sustained"
        )
    }

    /// The row's cells, shared by the terminal and the Markdown tables.
    fn cells(&self) -> [String; 12] {
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        [
            self.rate.to_string(),
            self.published.to_string(),
            self.delivered.to_string(),
            format!("{:.0}", self.per_second),
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            self.lost.to_string(),
            self.duplicated.to_string(),
            format!("{:.1}", self.server_cpu_us),
            format!("{:.1}", self.client_cpu_us),
            self.verdict().to_owned(),
        ]
    }

    fn text(&self) -> String {
        let c = self.cells();
        format!(
            "{:>7} {:>9} {:>12} {:>12} {:>9} {:>9} {:>9} {:>8} {:>6} {:>10} {:>10}  {}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]
        )
    }

    fn markdown(&self) -> String {
        format!("| {} |", self.cells().join(" | "))
    }
}

/// The highest deliveries/s among sustained rates.
fn best_sustained(result: &SideResult) -> Option<&Step> {
    result
        .steps
        .iter()
        .filter(|s| s.sustained())
        .max_by(|a, b| a.per_second.total_cmp(&b.per_second))
}

pub async fn run(config: FanoutBenchConfig) -> Result<(), BoxError> {
    let machine = crate::machine::describe().await;
    let load_before = crate::machine::load_average();
    let redis = RedisServer::start()?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness for the token secret: {e}"))?;
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();

    let mut results = Vec::new();
    for &side in &config.sides {
        println!("== {}", side.label());
        let result = run_side(side, &config, &redis, &secret).await?;
        results.push((side, result));
        // Each side starts on an empty Redis.
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &redis.addr().port().to_string(), "FLUSHALL"])
            .output();
    }
    let load_after = crate::machine::load_average();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# fanout-bench: statehouse hub vs Socket.IO + redis-adapter\n"
    );
    let _ = writeln!(md, "Command: `{}`\n", config.command);
    let _ = writeln!(md, "| machine | |\n|---|---|");
    for (k, v) in &machine {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "| load average before / after | {load_before} / {load_after} |\n"
    );
    let _ = writeln!(
        md,
        "Setup: one private redis-server; per side three server processes on 127.0.0.1; {} subscribers, \
         round robin over the three, all in one channel; payloads of {} bytes; {} s per rate; \
         one load client (this program) speaking either protocol with the same code. \
         A rate is sustained when the publisher kept up (sent the step's messages within 20% of the step), \
         p99 publish-to-deliver latency is under 50 ms and nothing was lost. \
         Deliveries/s is unique deliveries over the time from the first delivery to the last.\n",
        config.subscribers,
        config.size,
        config.step.as_secs()
    );
    if config.sides.contains(&Side::Floor) {
        let _ = writeln!(
            md,
            "The floor side is three `bench-hub floor` processes (`bench/src/fanout_floor.rs`) that \
             answer the hub's opening, take each message off a Redis pub/sub channel and write it to \
             every connection with one non-blocking `write`, and do nothing else: the least a \
             fan-out server does per delivery on this machine.\n"
        );
    }
    for (side, result) in &results {
        let _ = writeln!(md, "## {}\n\n{}\n", side.label(), result.version);
        let _ = writeln!(
            md,
            "| msg/s | published | delivered | deliveries/s | p50 ms | p99 ms | p99.9 ms | lost | duplicated | server CPU µs/delivery | client CPU µs/delivery | sustained |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for step in &result.steps {
            let _ = writeln!(md, "{}", step.markdown());
        }
        if let Some((per, before, after, n)) = result.memory {
            let _ = writeln!(
                md,
                "\nMemory: three fresh servers' resident memory went from {:.1} MiB to {:.1} MiB with {n} idle subscribed connections: **{:.1} KiB per idle connection**.",
                before as f64 / 1048576.0,
                after as f64 / 1048576.0,
                per / 1024.0
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Comparison\n");
    let find = |side| results.iter().find(|(s, _)| *s == side).map(|(_, r)| r);
    if let (Some(ours), Some(theirs)) = (find(Side::Statehouse), find(Side::SocketIo)) {
        let best_ours = best_sustained(ours);
        let best_theirs = best_sustained(theirs);
        let line = match (best_ours, best_theirs) {
            (Some(o), Some(t)) => format!(
                "- highest sustained: statehouse {:.0} deliveries/s (at {} msg/s) vs Socket.IO {:.0} (at {} msg/s): **{:.2}×** (goal ≥ 3×)",
                o.per_second,
                o.rate,
                t.per_second,
                t.rate,
                o.per_second / t.per_second
            ),
            (o, t) => format!(
                "- highest sustained: statehouse {:?} vs Socket.IO {:?} deliveries/s",
                o.map(|s| s.per_second as u64),
                t.map(|s| s.per_second as u64)
            ),
        };
        println!("{line}");
        let _ = writeln!(md, "{line}");
        for o in &ours.steps {
            if let Some(t) = theirs.steps.iter().find(|t| t.rate == o.rate) {
                let line = format!(
                    "- at {} msg/s: p99 {:.2} ms vs {:.2} ms (**{:.2}×** of theirs; goal ≤ 0.33×), lost {} vs {}",
                    o.rate,
                    o.p99_us as f64 / 1000.0,
                    t.p99_us as f64 / 1000.0,
                    o.p99_us as f64 / t.p99_us.max(1) as f64,
                    o.lost,
                    t.lost
                );
                println!("{line}");
                let _ = writeln!(md, "{line}");
            }
        }
        if let (Some((o, ..)), Some((t, ..))) = (ours.memory, theirs.memory) {
            let line = format!(
                "- memory per idle connection: {:.1} KiB vs {:.1} KiB (goal ≤ 4 KiB)",
                o / 1024.0,
                t / 1024.0
            );
            println!("{line}");
            let _ = writeln!(md, "{line}");
        }
    }
    if let (Some(floor), Some(theirs)) = (find(Side::Floor), find(Side::SocketIo)) {
        let ours = find(Side::Statehouse);
        for f in &floor.steps {
            let Some(t) = theirs.steps.iter().find(|t| t.rate == f.rate) else {
                continue;
            };
            let hub = ours
                .and_then(|o| o.steps.iter().find(|o| o.rate == f.rate))
                .map(|o| {
                    format!(
                        "; the hub's is {:.2}× the floor's",
                        o.p99_us as f64 / f.p99_us.max(1) as f64
                    )
                })
                .unwrap_or_default();
            let line = format!(
                "- floor at {} msg/s: p99 {:.2} ms, **{:.2}×** Socket.IO's {:.2} ms (a third of theirs is {:.2} ms){hub}",
                f.rate,
                f.p99_us as f64 / 1000.0,
                f.p99_us as f64 / t.p99_us.max(1) as f64,
                t.p99_us as f64 / 1000.0,
                t.p99_us as f64 / 3000.0,
            );
            println!("{line}");
            let _ = writeln!(md, "{line}");
        }
    }
    std::fs::write(&config.out, md)?;
    println!("\nwrote {}", config.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_in_place() {
        let mut data = vec![0x81, 5];
        data.extend_from_slice(b"hello");
        data.extend_from_slice(&[0x89, 0]);
        assert_eq!(parse_frame(&data), Some((1, 2..7)));
        assert_eq!(parse_frame(&data[7..]), Some((9, 2..2)));
        assert_eq!(parse_frame(&data[..6]), None, "incomplete");
        let mut long = vec![0x81, 126, 1, 0];
        long.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(parse_frame(&long), Some((1, 4..260)));
        let masked = [0x81, 0x82, 1, 2, 3, 4, b'4', b'0'];
        assert_eq!(parse_frame(&masked), Some((1, 6..8)));
        assert_eq!(parse_frame(&masked[..7]), None, "incomplete");
        let out = encode_frame(1, b"40", true);
        assert_eq!(out, [0x81, 0x82, 0, 0, 0, 0, b'4', b'0']);
        assert_eq!(encode_frame(1, b"ab", false), [0x81, 2, b'a', b'b']);
        let long = encode_frame(1, &[b'x'; 300], false);
        assert_eq!(&long[..4], &[0x81, 126, 1, 44]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn payloads_are_found_in_both_dialects() {
        let ours = r#"{"t":"msg","ch":"bench","off":7,"ep":"e","data":"12 1700000000000000 xxxx"}"#;
        assert_eq!(
            frame_payload(Dialect::Statehouse, ours).and_then(parse_payload),
            Some((12, 1_700_000_000_000_000))
        );
        let theirs = r#"42["m","13 1700000000000001 xx"]"#;
        assert_eq!(
            frame_payload(Dialect::SocketIo, theirs).and_then(parse_payload),
            Some((13, 1_700_000_000_000_001))
        );
        assert_eq!(frame_payload(Dialect::SocketIo, "2"), None);
        assert_eq!(
            frame_payload(Dialect::Statehouse, r#"{"t":"welcome"}"#),
            None
        );
    }
}
