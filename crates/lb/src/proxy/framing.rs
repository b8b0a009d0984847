//! The HTTP/1 framing guard: reads the client's bytes before hyper does, so that a head hyper
//! would quietly repair is refused instead.
//!
//! hyper's HTTP/1 server already refuses malformed heads (400) and too many headers (431), and
//! it refuses conflicting `Content-Length`s. But given both `Content-Length` and
//! `Transfer-Encoding` it drops the length and carries on (RFC 9112 allows that), and it accepts
//! a repeated equal `Content-Length`. A proxy is where request smuggling happens, so this guard
//! refuses both, and enforces the configured head size, *before* a byte is forwarded.
//!
//! How: [`FrameScanner`] follows the message framing of the byte stream (head, then a
//! `Content-Length` body or chunks, then the next head) and holds each head back until it is
//! complete. A good head is released to hyper unchanged and a [`Verdict::Ok`] queued; a bad one
//! is replaced by a small synthetic head (`connection: close`, no body), a
//! [`Verdict::Reject`] queued, and the rest of the stream discarded. The service pops one
//! verdict per request — HTTP/1 requests on a connection are handled in order — and answers a
//! rejected one with its status, so nothing of it reaches an instance.
//!
//! An HTTP/2 preface turns the guard into a pass-through (HTTP/2 frames carry their own lengths;
//! `normalize` still checks the headers). So does an upgrade request: after it the bytes may be
//! a WebSocket stream.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::proxy::h1::trim;

/// The verdict on one request head, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Ok,
    /// Answer with this status (400 or 431) and close.
    Reject(u16, &'static str),
}

/// The head handed to hyper in place of a refused one: parses everywhere, has no body, and
/// closes the connection after the answer.
const SYNTHETIC_HEAD: &[u8] =
    b"GET / HTTP/1.1\r\nhost: rejected.invalid\r\nconnection: close\r\n\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const MAX_CHUNK_LINE: usize = 4096;
/// `max_headers` up to this needs no allocation per head (see `finish_head`).
const STACK_HEADERS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a head in `head`.
    Head,
    /// A `Content-Length` body: this many bytes to go.
    Body(u64),
    /// A chunk-size line, collected in `line`.
    ChunkSize,
    /// Chunk data to go, then its CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data: this many bytes of it to go.
    ChunkDataEnd(u8),
    /// Trailer lines after the last chunk, collected in `line`, until an empty line.
    Trailers,
    /// No more framing to follow (HTTP/2, after an upgrade).
    PassThrough,
    /// A head was refused: everything after it is discarded.
    Closed,
}

/// Follows HTTP/1 request framing over a byte stream (see the module docs). Pure: no I/O.
#[derive(Debug)]
pub struct FrameScanner {
    state: State,
    head: Vec<u8>,
    line: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    first: bool,
}

impl FrameScanner {
    /// A scanner refusing heads over `max_head` bytes or with more than `max_headers` lines.
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            line: Vec::new(),
            max_head,
            max_headers,
            first: true,
        }
    }

    /// True while part of a head has arrived but not all of it (the head timeout runs).
    pub fn head_in_progress(&self) -> bool {
        self.state == State::Head && !self.head.is_empty()
    }

    /// Consumes `input`; appends what may be passed on to `out` and a verdict per head to
    /// `verdicts`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut BytesMut, verdicts: &mut Vec<Verdict>) {
        while !input.is_empty() {
            match self.state {
                State::PassThrough => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Closed => return,
                State::Head => {
                    // Skip the empty lines a client may send between requests (RFC 9112 §2.2)
                    // exactly as httparse (and so hyper) does: CRLF or a bare LF.
                    if self.head == b"\r" && input[0] == b'\n' {
                        // A CR held back from the previous read, and its LF: an empty line.
                        self.head.clear();
                        out.extend_from_slice(b"\r\n");
                        input = &input[1..];
                        continue;
                    }
                    if self.head.is_empty() {
                        let skip = skip_empty_lines(input);
                        out.extend_from_slice(&input[..skip]);
                        input = &input[skip..];
                        if input.is_empty() {
                            return;
                        }
                        // The usual case: the whole head arrived in this read. Judge it where
                        // it is instead of collecting it first.
                        if let Some(end) = head_end(input) {
                            let (head, rest) = input.split_at(end);
                            input = rest;
                            self.finish_head(head, out, verdicts);
                            continue;
                        }
                    }
                    let before = self.head.len();
                    self.head.extend_from_slice(input);
                    // Search from a little before the new bytes: the terminator may straddle.
                    let from = before.saturating_sub(2);
                    match head_end(&self.head[from..]) {
                        Some(end) => {
                            let end = from + end;
                            let used = end - before;
                            input = &input[used..];
                            self.head.truncate(end);
                            let mut head = std::mem::take(&mut self.head);
                            self.finish_head(&head, out, verdicts);
                            // Keep the allocation for the next head that comes in pieces.
                            head.clear();
                            self.head = head;
                        }
                        None => {
                            if self.head.len() > self.max_head {
                                self.reject(431, "request head too large", out, verdicts);
                            }
                            return;
                        }
                    }
                }
                State::Body(n) => {
                    let take = (n.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if n - take as u64 == 0 {
                        State::Head
                    } else {
                        State::Body(n - take as u64)
                    };
                }
                State::ChunkData(n) => {
                    let take = (n.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if n - take as u64 == 0 {
                        State::ChunkDataEnd(2)
                    } else {
                        State::ChunkData(n - take as u64)
                    };
                }
                State::ChunkDataEnd(k) => {
                    let expected = if k == 2 { b'\r' } else { b'\n' };
                    if input[0] != expected {
                        // Malformed chunking: hyper will fail the body too; stop here.
                        self.state = State::Closed;
                        return;
                    }
                    out.extend_from_slice(&input[..1]);
                    input = &input[1..];
                    self.state = if k == 2 {
                        State::ChunkDataEnd(1)
                    } else {
                        State::ChunkSize
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let nl = input.iter().position(|&b| b == b'\n');
                    let take = nl.map_or(input.len(), |p| p + 1);
                    self.line.extend_from_slice(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.line.len() > MAX_CHUNK_LINE {
                        self.state = State::Closed;
                        return;
                    }
                    if nl.is_none() {
                        return;
                    }
                    let line = std::mem::take(&mut self.line);
                    // Lines end in LF, optionally preceded by CR (as httparse reads them).
                    let line = line.strip_suffix(b"\n").unwrap_or(&line);
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    self.state = if self.state == State::Trailers {
                        if line.is_empty() {
                            State::Head
                        } else {
                            State::Trailers
                        }
                    } else {
                        match parse_chunk_size(line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Closed,
                        }
                    };
                }
            }
        }
    }

    fn finish_head(&mut self, head: &[u8], out: &mut BytesMut, verdicts: &mut Vec<Verdict>) {
        let first = std::mem::replace(&mut self.first, false);
        // Empty lines left at the front (a CR that ended a read) pass on as they would have.
        let skip = skip_empty_lines(head);
        out.extend_from_slice(&head[..skip]);
        let head = &head[skip..];
        if head.is_empty() {
            return;
        }
        if first && skip == 0 && head == &H2_PREFACE[..18] {
            out.extend_from_slice(head);
            self.state = State::PassThrough;
            return;
        }
        if head.len() > self.max_head {
            return self.reject(431, "request head too large", out, verdicts);
        }
        // Header slots on the stack for the usual limits (no allocation per head), on the heap
        // for a larger `max_headers`.
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let slots = if self.max_headers <= STACK_HEADERS {
            &mut stack[..self.max_headers]
        } else {
            heap.resize_with(self.max_headers, MaybeUninit::uninit);
            &mut heap[..]
        };
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, slots) {
            Ok(httparse::Status::Complete(_)) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return self.reject(431, "too many request headers", out, verdicts);
            }
            // A complete head (it ends in CRLFCRLF) that does not parse.
            _ => return self.reject(400, "malformed request head", out, verdicts),
        }
        let http11 = req.version == Some(1);
        let mut content_length: Option<u64> = None;
        let mut cl_count = 0;
        let mut te_last_chunked: Option<bool> = None;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl_count += 1;
                let v = h.value;
                if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                    return self.reject(400, "invalid Content-Length", out, verdicts);
                }
                // 19 digits always fit in a u64.
                content_length = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .map(trim)
                    .unwrap_or_default();
                te_last_chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if cl_count > 0 && te_last_chunked.is_some() {
            return self.reject(
                400,
                "both Content-Length and Transfer-Encoding",
                out,
                verdicts,
            );
        }
        if cl_count > 1 {
            return self.reject(400, "more than one Content-Length", out, verdicts);
        }
        if te_last_chunked == Some(false) || (te_last_chunked.is_some() && !http11) {
            return self.reject(400, "invalid Transfer-Encoding", out, verdicts);
        }
        out.extend_from_slice(head);
        verdicts.push(Verdict::Ok);
        let connect = req
            .method
            .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
        self.state = if upgrade || connect {
            State::PassThrough
        } else if te_last_chunked == Some(true) {
            State::ChunkSize
        } else {
            match content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
    }

    fn reject(
        &mut self,
        status: u16,
        reason: &'static str,
        out: &mut BytesMut,
        verdicts: &mut Vec<Verdict>,
    ) {
        let skip = skip_empty_lines(&self.head);
        out.extend_from_slice(&self.head[..skip]);
        self.head.clear();
        out.extend_from_slice(SYNTHETIC_HEAD);
        verdicts.push(Verdict::Reject(status, reason));
        self.state = State::Closed;
    }
}

/// The length of the leading empty lines (`\r\n` or `\n`) of `b`, as httparse skips them.
fn skip_empty_lines(b: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match &b[i..] {
            [b'\r', b'\n', ..] => i += 2,
            [b'\n', ..] => i += 1,
            _ => return i,
        }
    }
}

/// Where the head at the front of `b` ends (just past its empty line), as httparse (and so
/// hyper) reads it: lines end in LF, optionally preceded by CR, so the empty line is `LF LF` or
/// `LF CR LF` — not only `CRLF CRLF`. (Looking for `CRLF CRLF` alone, the guard once judged
/// `GET / HTTP/1.1 LF host: x LF CRLF GET /b …` as one head where hyper reads two requests.)
fn head_end(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = b[from..].iter().position(|&c| c == b'\n') {
        let lf = from + i;
        match &b[lf + 1..] {
            [b'\n', ..] => return Some(lf + 2),
            [b'\r', b'\n', ..] => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
    None
}

/// `1a;ext=1` -> 26. At most 15 hex digits (hyper's limit is a u64 too).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let digits = &line[..end];
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// State a connection shares between its I/O wrapper, its service and its watchdog.
#[derive(Debug)]
pub(crate) struct ConnShared {
    verdicts: Mutex<VecDeque<Verdict>>,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_activity: AtomicU64,
    /// Milliseconds since `epoch` when the head now in progress began; `u64::MAX` if none.
    head_started: AtomicU64,
    /// Requests of this connection in flight (the idle timeout waits for zero).
    pub(crate) in_flight: AtomicU64,
    /// Of those, the ones whose response is on its way to the client (the response stall
    /// timeout watches them).
    responding: AtomicU64,
    /// A write to the client is waiting for the socket to take bytes (also watched by the
    /// response stall timeout: the end of a response may sit in a buffer after its request
    /// has ended).
    write_waiting: AtomicBool,
    /// Set when the connection is to close once the request in progress (if any) is answered.
    closing: AtomicBool,
    epoch: Instant,
}

impl ConnShared {
    pub(crate) fn new() -> Self {
        Self {
            verdicts: Mutex::new(VecDeque::new()),
            last_activity: AtomicU64::new(0),
            head_started: AtomicU64::new(u64::MAX),
            in_flight: AtomicU64::new(0),
            responding: AtomicU64::new(0),
            write_waiting: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    /// Asks the connection to close after the request in progress (the lb's own HTTP/1 loop
    /// reads this; hyper's connection has `graceful_shutdown`).
    pub(crate) fn close_gracefully(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Bytes of a head have arrived: the head timeout runs from the first of them.
    pub(crate) fn head_begun(&self) {
        if self.head_started.load(Ordering::Relaxed) == u64::MAX {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The head is complete.
    pub(crate) fn head_done(&self) {
        self.head_started.store(u64::MAX, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn touch(&self) {
        self.last_activity.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The verdict on the next request of this connection. `None` past an upgrade or on HTTP/2,
    /// where the guard does not follow framing.
    pub(crate) fn next_verdict(&self) -> Option<Verdict> {
        // Held only to pop; never across an await.
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// A response began on its way to the client. Counts as activity: the time the instance
    /// took to answer is not the response's stall.
    pub(crate) fn response_begun(&self) {
        self.responding.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    /// A response [`Self::response_begun`] counted has ended, however.
    pub(crate) fn response_ended(&self) {
        self.responding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Marks a response on its way for as long as the guard lives (the lb's own loop holds one
    /// while it writes, to the last byte). No activity stamp: the response was just in hand —
    /// its request's own mark stamped it, or the lb answered it itself right after the read.
    pub(crate) fn responding(&self) -> Responding<'_> {
        self.responding.fetch_add(1, Ordering::AcqRel);
        Responding(self)
    }

    /// How long nothing has moved while a response is on its way or a write waits; `None` when
    /// neither.
    pub(crate) fn response_stalled_for(&self) -> Option<std::time::Duration> {
        (self.responding.load(Ordering::Acquire) > 0 || self.write_waiting.load(Ordering::Acquire))
            .then(|| self.idle_for())
    }

    /// How long nothing has moved.
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_activity.load(Ordering::Relaxed)),
        )
    }

    /// How long the head in progress has been arriving, if one is.
    pub(crate) fn head_for(&self) -> Option<std::time::Duration> {
        let started = self.head_started.load(Ordering::Relaxed);
        (started != u64::MAX)
            .then(|| std::time::Duration::from_millis(self.now_ms().saturating_sub(started)))
    }
}

/// A response on its way; see [`ConnShared::responding`].
#[derive(Debug)]
pub(crate) struct Responding<'a>(&'a ConnShared);

impl Drop for Responding<'_> {
    fn drop(&mut self) {
        self.0.response_ended();
    }
}

/// The client connection as hyper sees it: reads pass through a [`FrameScanner`].
#[derive(Debug)]
pub(crate) struct GuardedIo<T> {
    inner: T,
    scanner: FrameScanner,
    ready: BytesMut,
    shared: Arc<ConnShared>,
    scratch: Box<[u8]>,
    /// The verdicts of one read, before they join the shared queue (kept for its allocation).
    verdicts: Vec<Verdict>,
}

impl<T> GuardedIo<T> {
    /// Wraps `inner`, whose first bytes, `read` (possibly none), were already read from it:
    /// they are scanned as if read now.
    pub(crate) fn new(
        inner: T,
        read: &[u8],
        max_head: usize,
        max_headers: usize,
        shared: Arc<ConnShared>,
    ) -> Self {
        shared.touch();
        let mut io = Self {
            inner,
            scanner: FrameScanner::new(max_head, max_headers),
            ready: BytesMut::new(),
            shared,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            verdicts: Vec::new(),
        };
        if !read.is_empty() {
            io.scan(read);
        }
        io
    }

    /// Passes `data` through the scanner into `ready`, queueing its verdicts.
    fn scan(&mut self, data: &[u8]) {
        let was_in_head = self.scanner.head_in_progress();
        self.scanner.feed(data, &mut self.ready, &mut self.verdicts);
        if !self.verdicts.is_empty() {
            let mut q = self
                .shared
                .verdicts
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            q.extend(self.verdicts.drain(..));
        }
        let now_in_head = self.scanner.head_in_progress();
        if now_in_head && !was_in_head {
            self.shared
                .head_started
                .store(self.shared.now_ms(), Ordering::Relaxed);
        } else if !now_in_head {
            self.shared.head_started.store(u64::MAX, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut scratch = std::mem::take(&mut this.scratch);
            let mut rb = ReadBuf::new(&mut scratch);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let result = match polled {
                Poll::Ready(Ok(())) => {
                    let data = rb.filled();
                    if data.is_empty() {
                        Some(Poll::Ready(Ok(())))
                    } else if this.scanner.state == State::Closed {
                        // After a refused head the rest is discarded. Not end-of-stream: hyper
                        // would drop the connection at EOF without sending the 400/431; the
                        // synthetic head's `connection: close` ends it after the answer.
                        None
                    } else {
                        this.shared.touch();
                        this.scan(data);
                        // Bytes held back (an incomplete head) leave `ready` empty: read more.
                        None
                    }
                }
                other => Some(other),
            };
            this.scratch = scratch;
            if let Some(r) = result {
                return r;
            }
        }
    }
}

impl<T> GuardedIo<T> {
    /// Bytes that went out are activity; a write the client is not ready for is not (a client
    /// that stops reading a response must look stalled), and it is watched while it waits.
    fn wrote(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.shared.touch();
                self.shared.write_waiting.store(false, Ordering::Release);
            }
            Poll::Pending => self.shared.write_waiting.store(true, Ordering::Release),
            Poll::Ready(_) => {}
        }
        written
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_pending() {
            self.shared.write_waiting.store(true, Ordering::Release);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(input: &[u8], piece: usize) -> (Vec<u8>, Vec<Verdict>) {
        let mut s = FrameScanner::new(1024, 16);
        let mut out = BytesMut::new();
        let mut v = Vec::new();
        for chunk in input.chunks(piece) {
            s.feed(chunk, &mut out, &mut v);
        }
        (out.to_vec(), v)
    }

    fn scan(input: &[u8]) -> (Vec<u8>, Vec<Verdict>) {
        let whole = scan_in_pieces(input, input.len().max(1));
        for piece in [1, 2, 3, 7] {
            assert_eq!(
                scan_in_pieces(input, piece),
                whole,
                "split into {piece}-byte pieces"
            );
        }
        whole
    }

    #[test]
    fn good_requests_pass_unchanged_with_one_verdict_each() {
        let input: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nt: 1\r\n\r\n\
            \r\nGET /z HTTP/1.1\r\nhost: a\r\n\r\n";
        let (out, v) = scan(input);
        assert_eq!(out, input);
        assert_eq!(v, [Verdict::Ok; 4]);
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_body() {
        let input: &[u8] = b"POST / HTTP/1.1\r\ncontent-length: 39\r\n\r\nGET /admin HTTP/1.1\r\nhost: evil\r\n\r\n\r\n";
        let (_, v) = scan(input);
        assert_eq!(v, [Verdict::Ok]);
    }

    #[test]
    fn smuggling_shapes_are_refused_and_the_rest_discarded() {
        for (input, status) in [
            (&b"POST / HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n"[..], 400),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\ncontent-length: -4\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked, identity\r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header: x\r\n\r\n", 400),
        ] {
            let (out, v) = scan(input);
            assert!(matches!(v[..], [Verdict::Reject(s, _)] if s == status), "{}: {v:?}", String::from_utf8_lossy(input));
            assert_eq!(out, SYNTHETIC_HEAD);
        }
    }

    #[test]
    fn oversized_heads_get_431_even_before_they_end() {
        let mut big = b"GET / HTTP/1.1\r\nx: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2000));
        let (out, v) = scan(&big);
        assert!(matches!(v[..], [Verdict::Reject(431, _)]));
        assert_eq!(out, SYNTHETIC_HEAD);
        let many: Vec<u8> = (0..20)
            .flat_map(|i| format!("h{i}: v\r\n").into_bytes())
            .collect();
        let input = [b"GET / HTTP/1.1\r\n".to_vec(), many, b"\r\n".to_vec()].concat();
        let (_, v) = scan(&input);
        assert!(matches!(v[..], [Verdict::Reject(431, _)]));
    }

    #[test]
    fn h2_preface_and_upgrades_turn_into_pass_through() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00 anything");
        let (out, v) = scan(&input);
        assert_eq!(out, input);
        assert!(v.is_empty());
        let input =
            b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x85binary";
        let (out, v) = scan(input);
        assert_eq!(out, input);
        assert_eq!(v, [Verdict::Ok]);
    }

    /// Fuzz finding: empty lines before a refused head were passed on or dropped depending on
    /// where reads split them.
    #[test]
    fn regression_empty_lines_before_a_refused_head_split_anywhere() {
        let (out, v) = scan(b"\r\n\r\nPOSTrePRI * HTTP/2.0\r\n\r\n");
        assert!(matches!(v[..], [Verdict::Reject(400, _)]));
        assert_eq!(out, [&b"\r\n\r\n"[..], SYNTHETIC_HEAD].concat());
    }

    /// Fuzz finding: a bare CR is not an empty line for httparse (so not for hyper either); the
    /// guard skipped it and passed a head that hyper then refused.
    #[test]
    fn regression_a_bare_cr_before_a_head_is_not_an_empty_line() {
        let (_, v) = scan(b"\r\r\n\nGET / HTTP/1.1\r\nhost: a\r\n\r\n");
        assert!(matches!(v[..], [Verdict::Reject(400, _)]));
    }

    /// Fuzz finding: a CR ending one read and its LF starting the next were held back forever,
    /// and trailer lines ended by a bare LF were not recognised as lines.
    #[test]
    fn regression_crlf_split_across_reads_after_trailers() {
        let input = b"POST /y HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0;e=1\n\n\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (out, v) = scan(input);
        assert_eq!(out, input);
        assert_eq!(v, [Verdict::Ok, Verdict::Ok]);
    }

    #[test]
    fn regression_a_head_ending_in_a_bare_lf_line_is_one_head() {
        // httparse ends the first head at `LF CRLF`: two requests, two verdicts, and the second
        // is judged on its own (here refused for CL with TE).
        let input = b"GET / HTTP/1.1\nhost: x\n\r\nPOST /b HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        for piece in [1, 2, 3, input.len()] {
            let (_, verdicts) = scan_in_pieces(input, piece);
            assert_eq!(verdicts.len(), 2, "piece {piece}: {verdicts:?}");
            assert_eq!(verdicts[0], Verdict::Ok);
            assert!(
                matches!(verdicts[1], Verdict::Reject(400, _)),
                "{verdicts:?}"
            );
        }
        let (_, verdicts) = scan(b"GET / HTTP/1.1\nhost: x\n\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(verdicts, [Verdict::Ok, Verdict::Ok]);
    }

    #[test]
    fn malformed_chunks_stop_the_stream() {
        let input =
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nGET /x HTTP/1.1\r\n\r\n";
        let (_, v) = scan(input);
        assert_eq!(
            v,
            [Verdict::Ok],
            "the smuggled GET behind a bad chunk gets no verdict"
        );
    }
}
