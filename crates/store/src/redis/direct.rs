//! Direct connections: the task that sends a command reads its reply.
//!
//! redis-rs's connections are multiplexed: a driver task owns the socket, a
//! command reaches it over a channel and its reply comes back over another,
//! two task hand-offs per command. Under load that is the right trade: one
//! write carries many callers' commands. A caller that runs alone pays the
//! hand-offs and gains nothing (session-bench's latency loop: a GET through
//! redis-rs waited 8 µs longer than one on a bare socket, 59 µs against 51).
//!
//! A [`DirectPool`] keeps one plain connection on which the calling task
//! writes its command and reads the reply itself, encoding and parsing with
//! redis-rs's own RESP code. A call made while no other call of the same
//! backend is in flight leases it; every other call goes to the multiplexed
//! connection, as before. So a caller alone gets the shortest path, and
//! concurrent callers keep the multiplexed connection's batching (leasing
//! whenever a connection was idle cost 6% of session-bench's reads/s at 16
//! clients) and never wait on the pool.
//!
//! Invariants:
//! - a connection goes back to the pool only after the reply to its command
//!   was read in full. A call dropped midway (the policy layer's timeout, a
//!   cancelled request) or failed on I/O closes it, so no caller ever reads
//!   a reply meant for another;
//! - the pool never blocks and never fails a call: with no idle connection,
//!   within the cool-down after a failed connect, or for a URL it does not
//!   handle (TLS, a Unix socket, RESP3), calls use the multiplexed
//!   connection;
//! - connections are opened in the background, never by the call that
//!   found the pool empty;
//! - pipelines always use the multiplexed connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use combine::parser::combinator::AnySendSyncPartialState;
use combine::stream::{Decoder, PointerOffset};
use redis::aio::ConnectionLike;
use redis::{
    Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Connections a pool keeps open: only a call alone leases one, so one
/// suffices. A closed one is replaced by the next lone call that finds the
/// pool empty.
const MAX_CONNECTIONS: usize = 1;

/// After a connect failed, no new attempt for this long.
const COOL_DOWN: Duration = Duration::from_millis(250);

/// The name these connections give themselves (`CLIENT LIST` shows it).
const CLIENT_NAME: &str = "statehouse-direct";

/// Plain connections used by one task at a time; see the module docs.
pub(super) struct DirectPool {
    /// Calls of the backend in flight, on either path.
    calls: AtomicUsize,
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    /// Bounds a connect and its handshake.
    timeout: Duration,
    idle: Mutex<Vec<DirectConn>>,
    /// Connections open or being opened, idle or leased.
    open: AtomicUsize,
    failed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for DirectPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectPool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Held for a push, a pop or a store: never left half-done by a panic.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DirectPool {
    /// A pool for `url`, or `None` when the URL is one it does not handle
    /// (TLS, a Unix socket, RESP3) or does not parse.
    pub(super) fn new(url: &str, timeout: Duration) -> Option<Arc<Self>> {
        let info = url.into_connection_info().ok()?;
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return None;
        };
        let redis = info.redis_settings();
        if redis.protocol() != ProtocolVersion::RESP2 {
            return None;
        }
        Some(Arc::new(DirectPool {
            host: host.clone(),
            port: *port,
            username: redis.username().map(str::to_owned),
            password: redis.password().map(str::to_owned),
            db: redis.db(),
            timeout,
            calls: AtomicUsize::new(0),
            idle: Mutex::new(Vec::with_capacity(MAX_CONNECTIONS)),
            open: AtomicUsize::new(0),
            failed_at: Mutex::new(None),
        }))
    }

    /// What one call sends its commands on: a leased connection when the
    /// call is alone and one is idle, `shared` otherwise.
    pub(super) fn handle<C>(self: &Arc<Self>, shared: C) -> Handle<C> {
        let alone = self.calls.fetch_add(1, Ordering::AcqRel) == 0;
        Handle {
            lease: if alone { self.lease() } else { None },
            shared,
            _call: Some(Call(self.clone())),
        }
    }

    /// An idle connection, if there is one; when there is none, one more is
    /// opened in the background (up to [`MAX_CONNECTIONS`]) for later calls.
    fn lease(self: &Arc<Self>) -> Option<Lease> {
        loop {
            let Some(mut conn) = lock(&self.idle).pop() else {
                self.grow();
                return None;
            };
            if conn.is_usable() {
                return Some(Lease {
                    pool: self.clone(),
                    conn: Some(conn),
                });
            }
            // The server closed it while it was idle (restart, `timeout`,
            // CLIENT KILL): caught here, not by the caller's command.
            conn.clean = false;
            self.release(conn);
        }
    }

    fn release(&self, conn: DirectConn) {
        if conn.clean {
            lock(&self.idle).push(conn);
        } else {
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn grow(self: &Arc<Self>) {
        if lock(&self.failed_at).is_some_and(|at| at.elapsed() < COOL_DOWN) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let reserved = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return;
        }
        let opening = Opening {
            pool: self.clone(),
            done: false,
        };
        runtime.spawn(async move {
            match opening.pool.connect().await {
                Ok(conn) => opening.complete(conn),
                Err(e) => {
                    *lock(&opening.pool.failed_at) = Some(Instant::now());
                    tracing::debug!(error = %e, "opening a direct Redis connection failed");
                }
            }
        });
    }

    /// Connects, authenticates, selects the database and names the
    /// connection, all within the pool's timeout.
    async fn connect(&self) -> RedisResult<DirectConn> {
        let handshake = async {
            let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
            stream.set_nodelay(true)?;
            let mut conn = DirectConn {
                stream,
                decoder: Decoder::new(),
                out: Vec::with_capacity(256),
                clean: true,
            };
            if let Some(password) = &self.password {
                let mut auth = redis::cmd("AUTH");
                if let Some(username) = &self.username {
                    auth.arg(username);
                }
                auth.arg(password);
                conn.query(&auth).await?.extract_error()?;
            }
            if self.db != 0 {
                conn.query(redis::cmd("SELECT").arg(self.db))
                    .await?
                    .extract_error()?;
            }
            // The name is for operators (and tests); a server or ACL user
            // that refuses it still gets the connection.
            if let Err(e) = conn
                .query(redis::cmd("CLIENT").arg("SETNAME").arg(CLIENT_NAME))
                .await?
                .extract_error()
            {
                tracing::debug!(error = %e, "naming a direct Redis connection failed");
            }
            Ok::<_, RedisError>(conn)
        };
        tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
    }
}

/// A place reserved in `open` for a connection being opened. Given back
/// unless the connection reaches the pool: the connect failed, or its task
/// was dropped unfinished (its runtime shut down).
struct Opening {
    pool: Arc<DirectPool>,
    done: bool,
}

impl Opening {
    fn complete(mut self, conn: DirectConn) {
        self.done = true;
        self.pool.release(conn);
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if !self.done {
            self.pool.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One plain connection and its reply decoder.
struct DirectConn {
    stream: TcpStream,
    decoder: Decoder<AnySendSyncPartialState, PointerOffset<[u8]>>,
    /// The packed command, reused from call to call.
    out: Vec<u8>,
    /// False from a command's write until its reply has been read in full.
    clean: bool,
}

impl DirectConn {
    /// Sends `cmd` and reads its reply. A server error comes back as
    /// `Value::ServerError`, as from redis-rs's own connections.
    async fn query(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        self.clean = false;
        self.out.clear();
        cmd.write_packed_command(&mut self.out);
        self.stream.write_all(&self.out).await?;
        let value = redis::parse_redis_value_async(&mut self.decoder, &mut self.stream).await?;
        self.clean = true;
        Ok(value)
    }

    /// Whether an idle connection can take a command: nothing unread on it,
    /// and the server has not closed it. Free unless the runtime saw the
    /// socket become readable (then one non-blocking read).
    fn is_usable(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            self.stream.try_read(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

/// A connection leased for one store call: back to the pool when dropped,
/// if its last reply was read in full; closed otherwise.
pub(super) struct Lease {
    pool: Arc<DirectPool>,
    conn: Option<DirectConn>,
}

impl Lease {
    fn conn(&mut self) -> &mut DirectConn {
        // `conn` is only taken by `drop`.
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }

    pub(super) fn query<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.conn().query(cmd))
    }

    pub(super) fn db(&self) -> i64 {
        self.pool.db
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn);
        }
    }
}

/// One call in flight; counted while it lives.
struct Call(Arc<DirectPool>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a store call sends its commands on: its leased direct connection if
/// it has one, the shared multiplexed connection otherwise (and always for
/// pipelines).
pub(super) struct Handle<C> {
    // Dropped in this order: the lease is back in the pool before the call
    // stops counting, so the next lone call finds it there.
    lease: Option<Lease>,
    shared: C,
    _call: Option<Call>,
}

impl<C> Handle<C> {
    /// A handle that always uses `shared` (no pool).
    pub(super) fn shared(shared: C) -> Self {
        Handle {
            lease: None,
            shared,
            _call: None,
        }
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for Handle<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.lease {
            Some(lease) => lease.query(cmd),
            None => self.shared.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.shared.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        match &self.lease {
            Some(lease) => lease.db(),
            None => self.shared.get_db(),
        }
    }
}
