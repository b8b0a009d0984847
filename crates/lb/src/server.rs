//! The accept loop, client connections and graceful shutdown.
//!
//! The one shutdown shape of the project: `run(listener, …, shutdown)`. When `shutdown`
//! resolves, the listener is dropped (new connections are refused), a broadcast tells every
//! connection to finish its in-flight requests and close, and `run` waits for them — each task
//! holds a clone of one `mpsc::Sender`, so `recv()` returning `None` means all are gone. After
//! `shutdown.drain_deadline` a second broadcast cuts whatever is left (slow responses, WebSocket
//! tunnels).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::config::LbConfig;
use crate::discovery::{BackendSet, Discovery, StaticDiscovery};
use crate::error::{ConfigError, LbError};
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
    tracing::info!(addr = ?listener.local_addr().ok(), admin = %admin_addr, "load balancer listening");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let task = serve_connection(stream, peer, Arc::clone(&proxy), Arc::clone(&builder), Arc::clone(&config), shutdown_rx.clone(), life.clone());
                    tokio::spawn(task);
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

fn connection_builder(config: &LbConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let max_head = config.limits.max_head_bytes;
    b.http1()
        .timer(TokioTimer::new())
        // The head timeout and idle timeout are the watchdog's (hyper's would count idle
        // keep-alive time as head time).
        .header_read_timeout(None)
        .keep_alive(true)
        // The framing guard enforces the head limits first; hyper's must not be tighter.
        .max_buf_size((max_head * 2 + 4096).max(8192))
        .max_headers(config.limits.max_headers + 8);
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
    let io = GuardedIo::new(
        stream,
        config.limits.max_head_bytes,
        config.limits.max_headers,
        Arc::clone(&shared),
    );
    let ctx = Arc::new(ConnCtx {
        client: peer,
        shared: Arc::clone(&shared),
        lifecycle: life,
    });
    let service =
        hyper::service::service_fn(move |req| Arc::clone(&proxy).handle(req, Arc::clone(&ctx)));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);

    let t = &config.timeouts;
    let period =
        (t.idle.min(t.request_head) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            () = crate::until_set(&mut shutdown), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = crate::until_set(&mut cut) => return,
            _ = tick.tick() => {
                if shared.head_for().is_some_and(|h| h >= t.request_head) {
                    tracing::debug!(%peer, "request head timeout");
                    return;
                }
                let idle = shared.in_flight.load(Ordering::Acquire) == 0 && shared.idle_for() >= t.idle;
                if idle && !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C: the `shutdown` argument of [`run`] for a binary.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
