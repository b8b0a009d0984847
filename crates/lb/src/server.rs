//! The accept loop, the workers, client connections and graceful shutdown.
//!
//! Threads: the caller's runtime accepts connections and runs the admin API and the health
//! checker; `workers` threads, each a single-threaded runtime, serve the client connections
//! handed to them in turn. A connection, its requests and its pooled upstream connections all
//! live on one worker, so a request never crosses threads (the shape of nginx's and HAProxy's
//! workers). Work stealing buys little here — connections are many and alike — and costs a
//! cross-thread wake-up on most hand-offs between a client connection and an upstream one.
//!
//! The one shutdown shape of the project: `run(listener, …, shutdown)`. When `shutdown`
//! resolves, the listener is dropped (new connections are refused), a broadcast tells every
//! connection to finish its in-flight requests and close, and `run` waits for them — each task
//! holds a clone of one `mpsc::Sender`, so `recv()` returning `None` means all are gone. After
//! `shutdown.drain_deadline` a second broadcast cuts whatever is left (slow responses, WebSocket
//! tunnels).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::config::LbConfig;
use crate::discovery::{BackendSet, Discovery, StaticDiscovery};
use crate::error::{ConfigError, LbError};
use crate::h1_server::End;
use crate::health::{HealthCheck, HttpHealthCheck, run_checker};
use crate::proxy::framing::{ConnShared, GuardedIo};
use crate::proxy::{ConnCtx, Lifecycle, Proxy};

/// Runs the balancer: the proxy on `listener`, the admin API on `admin`, until `shutdown`
/// resolves; then drains (see the module docs) and returns.
///
/// Instances come from `config.instances`; health checks are HTTP `GET`s of `health.path`.
///
/// # Errors
/// [`LbError::Config`] if `admin` is not on a loopback address and no admin token is
/// configured. Failures of single requests or connections are never errors of `run`.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: LbConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LbError> {
    let discovery = StaticDiscovery(config.instances.clone());
    let check = HttpHealthCheck::new(&config.health);
    run_with(listener, admin, config, discovery, check, shutdown).await
}

/// [`run`] with another source of instances and another health check.
///
/// # Errors
/// As [`run`], and whatever `discovery` fails with.
pub async fn run_with<D: Discovery, H: HealthCheck>(
    listener: TcpListener,
    admin: TcpListener,
    config: LbConfig,
    discovery: D,
    check: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LbError> {
    let admin_addr = admin
        .local_addr()
        .map_err(|e| LbError::io("admin listener address", e))?;
    if !admin_addr.ip().is_loopback() && config.admin.token.is_none() {
        return Err(ConfigError::new(
            "admin.token",
            format!("required: the admin listener {admin_addr} is not a loopback address"),
        )
        .into());
    }
    let config = Arc::new(config);
    let initial = discovery.discover().await?;
    let set = Arc::new(BackendSet::new(&config, &initial));
    let proxy = Arc::new(Proxy::new(Arc::clone(&set), Arc::clone(&config)));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (cut_tx, cut_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let life = Lifecycle {
        cut: cut_rx,
        done: done_tx,
    };

    if config.health.enabled {
        let task = run_checker(
            Arc::clone(&set),
            Arc::new(check),
            config.health.clone(),
            shutdown_rx.clone(),
        );
        tokio::spawn(task);
    }
    tokio::spawn(crate::admin::serve(
        admin,
        Arc::clone(&proxy),
        Arc::clone(&config),
        shutdown_rx.clone(),
    ));

    let builder = Arc::new(connection_builder(&config));
    let workers = (0..config.worker_count())
        .map(|i| {
            let worker = Worker {
                proxy: Arc::new(proxy.for_worker()),
                builder: Arc::clone(&builder),
                config: Arc::clone(&config),
                shutdown: shutdown_rx.clone(),
                life: life.clone(),
            };
            worker.spawn(i)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LbError::io("starting a worker thread", e))?;
    tracing::info!(addr = ?listener.local_addr().ok(), admin = %admin_addr, workers = workers.len(), "load balancer listening");
    tokio::pin!(shutdown);
    let mut next = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Round robin: connections are alike enough that counting them spreads
                    // the load.
                    let worker = &workers[next % workers.len()];
                    next = next.wrapping_add(1);
                    match stream.into_std() {
                        // A worker only goes away after its queue is closed, below.
                        Ok(stream) => { let _ = worker.send((stream, peer)); }
                        Err(e) => tracing::debug!(%peer, error = %e, "cannot hand over a connection"),
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    // Closing the queues lets each worker finish once its connections have.
    drop(workers);
    tracing::info!("shutting down: draining connections");
    // Receivers only go away when their tasks have ended; nothing to tell then.
    let _ = shutdown_tx.send(true);
    drop(life);
    if tokio::time::timeout(config.shutdown.drain_deadline, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed: cutting the remaining connections");
        let _ = cut_tx.send(true);
        done_rx.recv().await;
    }
    Ok(())
}

/// The most readiness events a worker takes from one `epoll_wait` (tokio's default is 1,024).
/// Smaller batches mean the worker runs the tasks woken so far and polls again sooner, so
/// one connection's request waits behind fewer others: under `wrk -t2 -c64` through three
/// backends, 64 gave more req/s and a lower p99 than 1,024 in each of 6 paired rounds (about
/// +7% req/s on average, mean p99 4.0 → 3.5 ms); 16 and 256 were no better.
const WORKER_IO_EVENTS_PER_TICK: usize = 64;

/// A connection accepted for a worker.
type Accepted = (std::net::TcpStream, SocketAddr);

/// What a worker thread needs to serve connections.
struct Worker {
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: Arc<LbConfig>,
    shutdown: watch::Receiver<bool>,
    life: Lifecycle,
}

impl Worker {
    /// Starts the thread; connections sent to the returned queue are served until it closes
    /// and they (and their WebSocket tunnels) have finished. Then the worker drops its
    /// `life`, which is how `run` knows it is done.
    fn spawn(self, index: usize) -> std::io::Result<mpsc::UnboundedSender<Accepted>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_io_events_per_tick(WORKER_IO_EVENTS_PER_TICK)
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("lb-worker-{index}"))
            .spawn(move || runtime.block_on(self.run(rx)))?;
        Ok(tx)
    }

    async fn run(self, mut queue: mpsc::UnboundedReceiver<Accepted>) {
        // This worker's tasks hold clones of `local.done`: the runtime (and every task on it)
        // goes away when this function returns, so it returns only when they are gone.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let local = Lifecycle {
            cut: self.life.cut.clone(),
            done: done_tx,
        };
        while let Some((stream, peer)) = queue.recv().await {
            let stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot register a connection");
                    continue;
                }
            };
            tokio::spawn(serve_connection(
                stream,
                peer,
                Arc::clone(&self.proxy),
                Arc::clone(&self.builder),
                Arc::clone(&self.config),
                self.shutdown.clone(),
                local.clone(),
            ));
        }
        drop(local);
        done_rx.recv().await;
    }
}

/// hyper's HTTP/1 default limit on request headers.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

fn connection_builder(config: &LbConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let max_head = config.limits.max_head_bytes;
    let mut h1 = b.http1();
    h1.timer(TokioTimer::new())
        // The head timeout and idle timeout are the watchdog's (hyper's would count idle
        // keep-alive time as head time).
        .header_read_timeout(None)
        .keep_alive(true)
        // The framing guard enforces the head limits first; hyper's must not be tighter.
        .max_buf_size((max_head * 2 + 4096).max(8192));
    // hyper's own limit is 100 headers, parsed into slots on the stack; any explicit limit
    // moves them to the heap (two allocations per request). The guard has already refused
    // heads over `max_headers` with the same parser, so hyper needs a limit of its own only
    // when that is above 100.
    if config.limits.max_headers > HYPER_DEFAULT_MAX_HEADERS {
        h1.max_headers(config.limits.max_headers);
    }
    // No HTTP/2 keep-alive pings: they would count as activity and keep an idle connection
    // open past the idle timeout, which is what closes dead clients' connections.
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
    b
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: Arc<LbConfig>,
    mut shutdown: watch::Receiver<bool>,
    life: Lifecycle,
) {
    let mut cut = life.cut.clone();
    let _ = stream.set_nodelay(true);
    let shared = Arc::new(ConnShared::new());
    let ctx = Arc::new(ConnCtx {
        client: peer,
        shared: Arc::clone(&shared),
        lifecycle: life,
    });
    let limits = &config.limits;
    let t = &config.timeouts;

    // Plain HTTP/1.1 requests first, on the lb's own loop (see `h1_server`).
    let handed_over = {
        let own = crate::h1_server::serve(
            stream,
            &proxy,
            &ctx,
            limits.max_head_bytes,
            limits.max_headers,
        );
        tokio::pin!(own);
        // Its loop reads the flag `watched` sets; nothing more to tell it.
        let closing = |_: Pin<&mut _>| {};
        watched(
            own,
            closing,
            &shared,
            &proxy.metrics,
            t,
            &mut shutdown,
            &mut cut,
        )
        .await
    };
    let (stream, read) = match handed_over {
        Some(End::HandOver(stream, read)) => (stream, read),
        Some(End::Done) | None => return,
    };

    // The rest of the connection is hyper's, behind the framing guard.
    let io = GuardedIo::new(
        stream,
        &read,
        limits.max_head_bytes,
        limits.max_headers,
        Arc::clone(&shared),
    );
    drop(read);
    let metrics = Arc::clone(&proxy.metrics);
    let metrics = &*metrics;
    let service =
        hyper::service::service_fn(move |req| Arc::clone(&proxy).handle(req, Arc::clone(&ctx)));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let graceful = |c: Pin<&mut _>| {
        hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(c)
    };
    if let Some(Err(e)) =
        watched(conn, graceful, &shared, metrics, t, &mut shutdown, &mut cut).await
    {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Runs a client connection's future under the watchdog: shutdown and the idle timeout ask it
/// to close gracefully (`graceful`), the drain deadline, the head timeout and the response stall
/// timeout drop it. Its output, or `None` if the watchdog dropped it.
async fn watched<F: Future>(
    mut conn: Pin<&mut F>,
    mut graceful: impl FnMut(Pin<&mut F>),
    shared: &ConnShared,
    metrics: &crate::metrics::LbMetrics,
    t: &crate::config::TimeoutConfig,
    shutdown: &mut watch::Receiver<bool>,
    cut: &mut watch::Receiver<bool>,
) -> Option<F::Output> {
    let period = (t.idle.min(t.request_head).min(t.response_stall) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    let mut closing = shared.is_closing();
    // The connection is polled on every wake-up (each request wakes it a few times); the
    // watchdog's signals and timer only when one of them fired. Polling them every time costs
    // two locks and a timer check per wake-up, for events that come once a second at most.
    let watch_waker = Arc::new(WatchWaker::default());
    let waker = Waker::from(Arc::clone(&watch_waker));
    loop {
        let watch = next_event(shutdown, cut, &mut tick, closing);
        tokio::pin!(watch);
        watch_waker.woken.store(true, Ordering::Release);
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Done(out));
            }
            if watch_waker.woken.swap(false, Ordering::AcqRel) {
                watch_waker.set_task(cx.waker());
                if let Poll::Ready(e) = watch.as_mut().poll(&mut Context::from_waker(&waker)) {
                    return Poll::Ready(e);
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(out) => return Some(out),
            Event::Shutdown => {
                closing = true;
                shared.close_gracefully();
                graceful(conn.as_mut());
            }
            Event::Cut => return None,
            Event::Tick => {
                if shared.head_for().is_some_and(|h| h >= t.request_head) {
                    tracing::debug!("request head timeout");
                    return None;
                }
                if shared
                    .response_stalled_for()
                    .is_some_and(|s| s >= t.response_stall)
                {
                    // Dropping the connection drops the response body, whose instance
                    // connection closes with it.
                    tracing::debug!("response stalled");
                    crate::metrics::inc(&metrics.response_stalls);
                    return None;
                }
                let idle =
                    shared.in_flight.load(Ordering::Acquire) == 0 && shared.idle_for() >= t.idle;
                if idle && !closing {
                    closing = true;
                    shared.close_gracefully();
                    graceful(conn.as_mut());
                }
            }
        }
    }
}

/// What woke a client connection's task.
enum Event<T> {
    /// The connection finished.
    Done(T),
    /// Shutdown began: finish the requests in flight, then close.
    Shutdown,
    /// The drain deadline passed: close now.
    Cut,
    /// The watchdog's period: check the head and idle timeouts.
    Tick,
}

/// The watchdog's next event (after `Shutdown`, only `Cut` or `Tick`).
async fn next_event<T>(
    shutdown: &mut watch::Receiver<bool>,
    cut: &mut watch::Receiver<bool>,
    tick: &mut tokio::time::Interval,
    closing: bool,
) -> Event<T> {
    tokio::select! {
        () = crate::until_set(shutdown), if !closing => Event::Shutdown,
        () = crate::until_set(cut) => Event::Cut,
        _ = tick.tick() => Event::Tick,
    }
}

/// The waker handed to the watchdog: notes that it fired, then wakes the connection's task.
#[derive(Default)]
struct WatchWaker {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl WatchWaker {
    fn set_task(&self, waker: &Waker) {
        // Held for a clone; never across an await. A poisoned lock still holds a valid waker.
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }
}

impl Wake for WatchWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(w) = self.task.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            w.wake_by_ref();
        }
    }
}

/// A future that resolves on SIGTERM or Ctrl-C: the `shutdown` argument of [`run`] for a
/// binary.
///
/// The signal handlers are installed when this is *called*, not when the future is first
/// polled, so a signal that arrives between the call and the first poll (say, right after the
/// binary printed that it is listening) still shuts down gracefully instead of killing the
/// process. Call it inside a tokio runtime (`Runtime::enter` or an async context).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (term, int) => {
                    tracing::warn!(
                        sigterm = term.is_ok(),
                        sigint = int.is_ok(),
                        "cannot listen for every shutdown signal; Ctrl-C only"
                    );
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
