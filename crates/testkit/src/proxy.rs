//! A TCP proxy that can cut, stall or slow the path between a client and a real server.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy currently does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Existing connections were dropped; new ones are accepted and closed at once.
    Cut,
    /// Nothing moves in either direction, but connections stay open.
    Blackhole,
}

/// Shared by the accept loop and every connection through a `watch` channel.
#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by every `cut()`. A connection remembers the epoch it was born in and dies as soon as
    /// it sees another one; comparing modes would miss a cut that was healed before the
    /// connection's task got to look.
    cut_epoch: u64,
}

/// A fault-injecting TCP proxy on `127.0.0.1:<free port>` in front of one upstream address.
///
/// Point a client at [`Self::addr`] instead of the server, then [`Self::cut`],
/// [`Self::blackhole`], [`Self::heal`] or [`Self::set_latency`] to see how it copes. Dropping the
/// proxy stops its accept loop and closes every connection through it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    latency_nanos: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    accept_loop: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`. Must be called
    /// within a tokio runtime; the proxy's tasks run on it.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (state, watcher) = watch::channel(State {
            mode: Mode::Forward,
            cut_epoch: 0,
        });
        let latency_nanos = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let accept_loop = tokio::spawn(accept_loop(
            listener,
            upstream,
            watcher,
            latency_nanos.clone(),
            accepted.clone(),
        ));
        Ok(FaultProxy {
            addr,
            state,
            latency_nanos,
            accepted,
            accept_loop,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection at once, and from now until [`Self::heal`] accepts new
    /// connections only to close them immediately (the client sees EOF or a reset).
    pub fn cut(&self) {
        self.state.send_modify(|s| {
            s.mode = Mode::Cut;
            s.cut_epoch += 1;
        });
    }

    /// Keeps connections open but forwards nothing in either direction; new connections are
    /// accepted and held silent too. Simulates a hung server: clients run into their timeouts.
    pub fn blackhole(&self) {
        self.state.send_modify(|s| s.mode = Mode::Blackhole);
    }

    /// Back to forwarding, for new connections and for existing (blackholed) ones, which then
    /// deliver whatever they were holding.
    pub fn heal(&self) {
        self.state.send_modify(|s| s.mode = Mode::Forward);
    }

    /// Delays every chunk forwarded, in each direction, by `delay` (zero turns it off).
    pub fn set_latency(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    /// How many connections the proxy has accepted, including those it closed right away.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
        // Connection tasks end by themselves: dropping `state` (the watch sender) right after this
        // wakes every one of them, and they treat a closed channel like a cut.
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    latency_nanos: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Typically EMFILE; back off instead of spinning, and keep serving.
                tracing::warn!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let now = *state.borrow();
        if now.mode == Mode::Cut {
            drop(client);
            continue;
        }
        tokio::spawn(serve(
            client,
            upstream,
            state.clone(),
            now.cut_epoch,
            latency_nanos.clone(),
        ));
    }
}

/// One proxied connection. Returns (dropping all four socket halves) when either direction
/// fails, a cut happens, or both directions have finished.
async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut state: watch::Receiver<State>,
    epoch: u64,
    latency_nanos: Arc<AtomicU64>,
) {
    let server = tokio::select! {
        connected = TcpStream::connect(upstream) => match connected {
            Ok(server) => server,
            Err(e) => {
                tracing::debug!(error = %e, %upstream, "fault proxy: upstream connect failed");
                return;
            }
        },
        () = cut_since(&mut state, epoch) => return,
    };
    // Small request/response protocols (Redis, Postgres) must not wait for Nagle.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let _ = tokio::try_join!(
        pump(
            client_read,
            server_write,
            state.clone(),
            epoch,
            latency_nanos.clone()
        ),
        pump(server_read, client_write, state, epoch, latency_nanos),
    );
}

/// Why a direction stopped in a way that must take the whole connection down.
#[derive(Debug)]
struct Stop;

/// Copies one direction. EOF is passed on as a half-close (`Ok`); a cut or an I/O error is a
/// `Stop`, which makes `try_join!` drop the other direction too.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    epoch: u64,
    latency_nanos: Arc<AtomicU64>,
) -> Result<(), Stop> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => read.map_err(|_| Stop)?,
            () = cut_since(&mut state, epoch) => return Err(Stop),
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        // A blackhole holds this chunk, and by not reading further everything behind it, until
        // heal (or a cut).
        forwarding_allowed(&mut state, epoch).await?;
        let delay = Duration::from_nanos(latency_nanos.load(Ordering::Relaxed));
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cut_since(&mut state, epoch) => return Err(Stop),
            }
        }
        tokio::select! {
            written = to.write_all(&buf[..n]) => written.map_err(|_| Stop)?,
            () = cut_since(&mut state, epoch) => return Err(Stop),
        }
    }
}

/// Completes once a cut has happened after `epoch`, or the proxy was dropped.
async fn cut_since(state: &mut watch::Receiver<State>, epoch: u64) {
    // An error means the sender (the proxy) is gone, which ends the connection just like a cut.
    let _ = state.wait_for(|s| s.cut_epoch != epoch).await;
}

/// Waits while the proxy is blackholed; `Stop` if a cut happens or the proxy is dropped meanwhile.
async fn forwarding_allowed(state: &mut watch::Receiver<State>, epoch: u64) -> Result<(), Stop> {
    let settled = state
        .wait_for(|s| s.cut_epoch != epoch || s.mode != Mode::Blackhole)
        .await
        .map(|s| s.cut_epoch == epoch)
        .map_err(|_| Stop)?;
    if settled { Ok(()) } else { Err(Stop) }
}
