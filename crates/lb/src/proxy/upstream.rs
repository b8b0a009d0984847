//! Keep-alive connections to the instances: one pool per worker, of two kinds.
//!
//! - **In-task** ([`UpstreamPool::exchange`]): for a request whose body is in hand (empty or
//!   buffered) and that asks for no upgrade — nearly all traffic — the request's own task writes
//!   the request and reads the response head on a plain `TcpStream`, with the framing of
//!   [`super::h1`]. A body already whole in the read buffer goes to the client as one frame and
//!   the connection straight back to the pool; a longer one is read as the client takes it
//!   ([`RawBody`]). No connection task and no channel between the two: on the 2-core bench
//!   machine a prototype of this shape served 80k req/s where hyper's connection API served 73k.
//! - **hyper** ([`UpstreamPool::send`]): upgrades (the connection becomes the tunnel) and
//!   streamed request bodies (hyper writes them while the response may already be coming).
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
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::BoxError;
use crate::proxy::body::UpstreamBody;
use crate::proxy::h1::{self as h1, BodyDecoder, Decoded, Framing, ResponseHead};

/// Idle connections a worker keeps per instance; more are closed when their response ends.
const MAX_IDLE_PER_INSTANCE: usize = 256;

/// Why a request to an instance failed.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be opened: the request never reached the instance.
    Connect(std::io::Error),
    /// The request was (or may have been) written, then the exchange failed.
    Exchange(BoxError),
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

/// Read-buffer space allocated at a time for reads from an instance (see
/// [`crate::net::poll_read_into`]).
const READ_CHUNK: usize = 8 * 1024;

/// A connection of the in-task exchange: the stream and what has been read of it but not yet
/// taken. Idle in the pool only when that is nothing.
pub(crate) struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawConn {
    /// Whether the instance closed this idle connection (or sent bytes nobody asked for).
    /// Costs a syscall only when the reactor has seen the socket become readable.
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads more of the response into the buffer; `Ok(0)` when the instance closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        crate::net::poll_read_into(&self.stream, cx, &mut self.buf, READ_CHUNK)
    }
}

/// A connection that can wait in the pool.
trait Pooled {
    fn is_closed(&self) -> bool;
}

impl Pooled for SendRequest<UpstreamBody> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

impl Pooled for RawConn {
    fn is_closed(&self) -> bool {
        RawConn::is_closed(self)
    }
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Idle connections by instance address, most recently returned last.
struct IdleMap<C>(HashMap<String, Vec<Idle<C>>>);

impl<C: Pooled> IdleMap<C> {
    fn put(&mut self, addr: &str, conn: C, now: Instant) {
        let idle = Idle { conn, since: now };
        match self.0.get_mut(addr) {
            Some(list) if list.len() >= MAX_IDLE_PER_INSTANCE => {}
            Some(list) => list.push(idle),
            None => {
                self.0.insert(addr.to_owned(), vec![idle]);
            }
        }
    }

    /// The most recently returned connection to `addr` that is still open and not past
    /// `timeout`; closed ones, and all past the timeout, are dropped on the way.
    fn take(&mut self, addr: &str, timeout: Duration) -> Option<C> {
        let list = self.0.get_mut(addr)?;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() >= timeout {
                // Everything below has been idle longer still: close the lot.
                list.clear();
                return None;
            }
            if !entry.conn.is_closed() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn sweep(&mut self, timeout: Duration) {
        self.0.retain(|_, list| {
            list.retain(|i| i.since.elapsed() < timeout && !i.conn.is_closed());
            !list.is_empty()
        });
    }
}

struct IdleLists {
    hyper: IdleMap<SendRequest<UpstreamBody>>,
    raw: IdleMap<RawConn>,
    /// When connections past the idle timeout were last closed everywhere (those of an
    /// instance no request goes to any more would otherwise stay open).
    swept: Instant,
}

impl IdleLists {
    /// Closes connections past the idle timeout, at most once per timeout.
    fn sweep_now_and_then(&mut self, timeout: Duration, now: Instant) {
        if now.saturating_duration_since(self.swept) >= timeout {
            self.hyper.sweep(timeout);
            self.raw.sweep(timeout);
            self.swept = now;
        }
    }
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
            let now = Instant::now();
            let mut idle = self.pool.lock();
            idle.sweep_now_and_then(self.pool.idle_timeout, now);
            idle.hyper.put(&self.addr, sender, now);
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(IdleLists {
                hyper: IdleMap(HashMap::new()),
                raw: IdleMap(HashMap::new()),
                swept: Instant::now(),
            }),
            connect_timeout,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdleLists> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put_raw(&self, addr: &str, conn: RawConn) {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.sweep_now_and_then(self.idle_timeout, now);
        idle.raw.put(addr, conn, now);
    }

    async fn open(&self, addr: &str) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                UpstreamError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ))
            })?
            .map_err(UpstreamError::Connect)?;
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
        Ok(stream)
    }

    async fn connect(&self, addr: &str) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let stream = self.open(addr).await?;
        // The handshake only sets the connection up; it does no I/O.
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// The in-task exchange: writes `request` (a head from [`h1::write_request_head`] with any
    /// body after it) to the instance at `addr` on an idle connection or a new one, and reads
    /// the response head. A failed connect is [`UpstreamError::Connect`]; anything after that
    /// may have reached the instance.
    pub(crate) async fn exchange(
        self: &Arc<Self>,
        addr: &str,
        method: &Method,
        request: &[u8],
    ) -> Result<RawResponse, UpstreamError> {
        let idle = self.lock().raw.take(addr, self.idle_timeout);
        let mut conn = match idle {
            Some(c) => c,
            None => RawConn {
                stream: self.open(addr).await?,
                buf: BytesMut::new(),
            },
        };
        let exchange = |e: io::Error| UpstreamError::Exchange(e.into());
        conn.stream.write_all(request).await.map_err(exchange)?;
        let head = loop {
            if let Some(head) = h1::read_response_head(&mut conn.buf, method)
                .map_err(|e| UpstreamError::Exchange(e.into()))?
            {
                break head;
            }
            if std::future::poll_fn(|cx| conn.poll_fill(cx))
                .await
                .map_err(exchange)?
                == 0
            {
                return Err(exchange(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the instance closed the connection before answering",
                )));
            }
        };
        // The common case: the whole body came with the head. The connection goes back now.
        let whole = match head.framing {
            Framing::Empty => Some(Bytes::new()),
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                Some(conn.buf.split_to(n as usize).freeze())
            }
            _ => None,
        };
        let body = match whole {
            Some(bytes) => {
                if head.reusable && conn.buf.is_empty() {
                    self.put_raw(addr, conn);
                }
                RawResponseBody::Whole(bytes)
            }
            None => RawResponseBody::Streaming(RawBody {
                decoder: BodyDecoder::new(head.framing),
                reusable: head.reusable,
                conn: Some(conn),
                pool: Arc::clone(self),
                addr: addr.to_owned(),
            }),
        };
        Ok(RawResponse { head, body })
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
            let idle = self.lock().hyper.take(addr, self.idle_timeout);
            let (mut sender, fresh) = match idle {
                Some(s) => (s, false),
                None => (self.connect(addr).await?, true),
            };
            // A pooled connection is ready once its last response has been read to the end;
            // an error here means the instance closed it while it was idle.
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(UpstreamError::Connect(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
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
                        return Err(UpstreamError::Connect(io::Error::other(e.into_error())));
                    }
                    None => return Err(UpstreamError::Exchange(e.into_error().into())),
                },
            }
        }
    }
}

/// An instance's answer from the in-task exchange.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) head: ResponseHead,
    pub(crate) body: RawResponseBody,
}

/// The body of a [`RawResponse`].
#[derive(Debug)]
pub(crate) enum RawResponseBody {
    /// All of it (the connection has gone back to the pool, or been closed).
    Whole(Bytes),
    /// Still arriving.
    Streaming(RawBody),
}

/// A response body read from its connection as the client takes it. The connection goes back
/// to the pool when the body has ended (and the response allowed reuse); a body dropped before
/// its end closes it.
pub(crate) struct RawBody {
    decoder: BodyDecoder,
    reusable: bool,
    /// `None` once the body has ended or failed.
    conn: Option<RawConn>,
    pool: Arc<UpstreamPool>,
    addr: String,
}

impl fmt::Debug for RawBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawBody")
            .field("addr", &self.addr)
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl RawBody {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match self.decoder.decode(&mut conn.buf) {
                Ok(Decoded::NeedMore) => match ready!(conn.poll_fill(cx)) {
                    Ok(0) => self.decoder.eof(),
                    Ok(_) => continue,
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                step => step,
            };
            return Poll::Ready(match step {
                Ok(Decoded::Data(b)) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    Some(Ok(Frame::data(b)))
                }
                Ok(Decoded::Trailers(t)) => {
                    self.finish();
                    Some(Ok(Frame::trailers(t)))
                }
                Ok(Decoded::End) => {
                    self.finish();
                    None
                }
                Ok(Decoded::NeedMore) => continue,
                Err(e) => {
                    self.conn = None;
                    Some(Err(e.into()))
                }
            });
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    pub(crate) fn size_hint(&self) -> hyper::body::SizeHint {
        match self.decoder.remaining() {
            Some(n) => hyper::body::SizeHint::with_exact(n),
            None => hyper::body::SizeHint::default(),
        }
    }

    /// The body has ended: the connection goes back if it may carry another exchange.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.pool.put_raw(&self.addr, conn);
        }
    }
}

impl Drop for RawBody {
    fn drop(&mut self) {
        if self.decoder.is_done() {
            self.finish();
        }
    }
}
