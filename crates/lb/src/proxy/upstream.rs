//! Keep-alive connections to the instances: one pool per worker, HTTP/1.1 through hyper's
//! connection API.
//!
//! hyper-util's pooled client (which this replaces) keys its pool by scheme and authority in a
//! hashed map shared behind locks, checks a connection out through a future, and reads the
//! clock on every checkout and return; measured on the 2-core bench machine, the lb with it
//! served 55k req/s where a per-worker list of hyper connections served 73k (nginx: 72k).
//! Here each worker keeps, per instance address, a stack of idle senders: a request takes the
//! most recently used one (warm in cache, least likely to have been closed by the instance's
//! idle timeout), and the response body gives it back when it ends.
//!
//! Each connection is driven by a task on the worker that opened it, like hyper-util's, so a
//! request and its connection never cross threads.
//!
//! What counts as "never reached the instance" (the retry rule): a failed connect, and a
//! pooled connection found closed before the request was written (hyper hands the request
//! back, see [`UpstreamPool::send`]); such a request is sent again on a fresh connection, not
//! counted as an attempt. Anything after the request was written is an upstream failure.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::body::UpstreamBody;

/// Idle connections a worker keeps per instance; more are closed when their response ends.
const MAX_IDLE_PER_INSTANCE: usize = 256;

/// Why a request to an instance failed.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be opened: the request never reached the instance.
    Connect(std::io::Error),
    /// The request was (or may have been) written, then the exchange failed.
    Exchange(hyper::Error),
}

impl UpstreamError {
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Exchange(e) => write!(f, "exchange: {e}"),
        }
    }
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

struct IdleLists {
    by_addr: HashMap<String, Vec<Idle>>,
    /// When connections past the idle timeout were last closed everywhere (those of an
    /// instance no request goes to any more would otherwise stay open).
    swept: Instant,
}

/// One worker's idle connections, by instance address.
pub(crate) struct UpstreamPool {
    idle: Mutex<IdleLists>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamPool").finish_non_exhaustive()
    }
}

/// A connection lent to one exchange. Dropped — when the response body ends, or with the
/// response if it has none — it goes back to its pool unless the connection has closed.
pub(crate) struct Lent {
    pool: Arc<UpstreamPool>,
    addr: String,
    sender: Option<SendRequest<UpstreamBody>>,
}

impl fmt::Debug for Lent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lent").field("addr", &self.addr).finish()
    }
}

impl Lent {
    /// Gives the connection up instead of returning it: after a `101`, it carries the tunnel.
    pub(crate) fn discard(mut self) {
        self.sender = None;
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take()
            && !sender.is_closed()
        {
            self.pool.put(std::mem::take(&mut self.addr), sender);
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(IdleLists {
                by_addr: HashMap::new(),
                swept: Instant::now(),
            }),
            connect_timeout,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdleLists> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, addr: String, sender: SendRequest<UpstreamBody>) {
        let mut idle = self.lock();
        if idle.swept.elapsed() >= self.idle_timeout {
            let timeout = self.idle_timeout;
            idle.by_addr.retain(|_, list| {
                list.retain(|i| i.since.elapsed() < timeout && !i.sender.is_closed());
                !list.is_empty()
            });
            idle.swept = Instant::now();
        }
        let list = idle.by_addr.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// The most recently returned idle connection to `addr` that is still open and not past
    /// the idle timeout; closed ones, and all past the timeout, are dropped on the way.
    fn take_idle(&self, addr: &str) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.lock();
        let list = idle.by_addr.get_mut(addr)?;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() >= self.idle_timeout {
                // Everything below has been idle longer still: close the lot.
                list.clear();
                return None;
            }
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    async fn connect(&self, addr: &str) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                UpstreamError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ))
            })?
            .map_err(UpstreamError::Connect)?;
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
        // The handshake only sets the connection up; it does no I/O.
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form target, `Host` set) to the instance at `addr` on an idle
    /// connection, or a new one. Returns the response and the lent connection, which must
    /// live as long as the response body is read.
    pub(crate) async fn send(
        self: &Arc<Self>,
        addr: &str,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lent), UpstreamError> {
        loop {
            let (mut sender, fresh) = match self.take_idle(addr) {
                Some(s) => (s, false),
                None => (self.connect(addr).await?, true),
            };
            // A pooled connection is ready once its last response has been read to the end;
            // an error here means the instance closed it while it was idle.
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(UpstreamError::Connect(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the instance closed a new connection",
                    )));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lent = Lent {
                        pool: Arc::clone(self),
                        addr: addr.to_owned(),
                        sender: Some(sender),
                    };
                    return Ok((resp, lent));
                }
                Err(mut e) => match e.take_message() {
                    // Closed before the request was written: it never reached the instance.
                    // A pooled connection may have been closed by the instance while idle:
                    // try the next one; a new one failing so is a failed connect.
                    Some(unsent) if !fresh => req = unsent,
                    Some(_) => {
                        return Err(UpstreamError::Connect(std::io::Error::other(
                            e.into_error(),
                        )));
                    }
                    None => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
    }
}
