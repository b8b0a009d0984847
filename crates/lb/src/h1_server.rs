//! Client connections served by the lb's own HTTP/1.1 loop, for plain requests; hyper takes
//! the connection over at the first request that is not one.
//!
//! A *plain* request is an HTTP/1.1 request with an origin-form target, no `Transfer-Encoding`,
//! no `Upgrade` (nor `Connection: upgrade`), no `Expect`, at most one `Content-Length` of at most
//! [`MAX_PLAIN_BODY`] bytes, a head within the configured size and header-count limits, and
//! header names and values `http` accepts: the requests a load balancer mostly carries. For
//! them this loop parses the head once (`httparse`, as hyper does), has the proxy forward it
//! ([`Proxy::handle_plain`], the same forwarding as hyper's path) and writes the response
//! itself: head and a body already in hand in one `write`, a streamed body as it comes
//! (`Content-Length` kept when known, chunked otherwise).
//!
//! Anything else — HTTP/1.0, an upgrade, a chunked or large body, `Expect`, the HTTP/2 preface,
//! a malformed or oversized head — is not refused here: the connection, with the bytes read of
//! that head, is handed to the framing guard and hyper ([`End::HandOver`]), which refuse or serve
//! it exactly as they serve every connection; the rest of the connection stays with them. So
//! this loop adds a faster path and no second set of rules for what is refused.
//!
//! Why: hyper's server dispatch, with the guard reading ahead of it, was most of what separated
//! the lb's CPU per request from nginx's on the bench machine (see bench/results/lb.md).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::net::poll_read_into;
use crate::proxy::h1::{has_token, parse_length, put_header, trim};
use crate::proxy::{ConnCtx, Proxy, ProxyBody};

/// The largest request body this loop reads whole; a larger one goes to hyper, which streams it.
pub(crate) const MAX_PLAIN_BODY: u64 = 64 * 1024;
/// Header slots parsed on the stack; a head with more goes to hyper.
const STACK_HEADERS: usize = 100;
/// Read-buffer space allocated at a time (see [`crate::net::poll_read_into`]).
const READ_CHUNK: usize = 4096;
/// Response bytes gathered before a write while a body streams.
const WRITE_BATCH: usize = 16 * 1024;

/// How the loop ended.
pub(crate) enum End {
    /// The connection is finished (closed by either side, or after a graceful shutdown).
    Done,
    /// A request this loop does not serve: hyper gets the connection and what was read of it.
    HandOver(TcpStream, BytesMut),
}

/// A plain request's head, parsed.
struct PlainHead {
    parts: http::request::Parts,
    /// Bytes of the head in the buffer.
    head_len: usize,
    body_len: usize,
    /// The client asked to close after this request.
    close: bool,
}

// Returned by value once per request; boxing the head would add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Plain(PlainHead),
    Partial,
    /// Not plain (or not valid): hyper decides.
    Other,
}

/// Parses the head at the front of `buf`, if it is a plain request's.
fn parse_head(buf: &[u8], max_head: usize, max_headers: usize) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    if head_len > max_head || req.headers.len() > max_headers || req.version != Some(1) {
        return Parsed::Other;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    if method == Method::CONNECT || !path.starts_with('/') {
        return Parsed::Other;
    }
    let Ok(target) = PathAndQuery::try_from(path) else {
        return Parsed::Other;
    };
    // Room for what normalization adds (X-Forwarded-For, X-Forwarded-Proto, X-Request-Id, Host)
    // without growing the map.
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 4);
    let mut body_len = None;
    let mut close = false;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Other;
        };
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return Parsed::Other;
        }
        if name == header::CONTENT_LENGTH {
            match (body_len, parse_length(h.value)) {
                (None, Some(n)) if n <= MAX_PLAIN_BODY => body_len = Some(n as usize),
                _ => return Parsed::Other,
            }
        }
        if name == header::CONNECTION {
            for token in h.value.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Other;
                }
                close |= token.eq_ignore_ascii_case(b"close");
            }
        }
        let Ok(value) = HeaderValue::from_bytes(h.value) else {
            return Parsed::Other;
        };
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from(target);
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    let (parts, ()) = request.into_parts();
    Parsed::Plain(PlainHead {
        parts,
        head_len,
        body_len: body_len.unwrap_or(0),
        close,
    })
}

/// For the fuzz target: the head and body lengths of the plain request at the front of `buf`,
/// if the lb's own loop would serve it.
#[doc(hidden)]
pub fn plain_request_len(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Option<(usize, usize)> {
    match parse_head(buf, max_head, max_headers) {
        Parsed::Plain(h) => Some((h.head_len, h.body_len)),
        Parsed::Partial | Parsed::Other => None,
    }
}

/// Serves plain requests on `stream` until it closes, a graceful shutdown asks it to (between
/// requests), or a request that is not plain arrives.
pub(crate) async fn serve(
    mut stream: TcpStream,
    proxy: &Proxy,
    ctx: &Arc<ConnCtx>,
    max_head: usize,
    max_headers: usize,
) -> End {
    let shared = &ctx.shared;
    shared.touch();
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        let mut parse = true;
        let mut begun = false;
        let head = loop {
            if parse {
                match parse_head(&buf, max_head, max_headers) {
                    Parsed::Plain(head) => {
                        // The head timeout does not run while the body comes; the idle timeout
                        // cuts a body that stalls (the request is not in flight yet).
                        shared.head_done();
                        while buf.len() < head.head_len + head.body_len {
                            match read_more(&stream, &mut buf, shared, Wait::Body).await {
                                Ok(0) | Err(_) => return End::Done,
                                Ok(_) => {}
                            }
                        }
                        break head;
                    }
                    Parsed::Partial => {}
                    Parsed::Other if shared.is_closing() => return End::Done,
                    Parsed::Other => {
                        // The guard restarts the head timeout from its own view of these bytes.
                        shared.head_done();
                        return End::HandOver(stream, buf);
                    }
                }
            } else if buf.len() > max_head {
                // Too large before it even ended: the guard answers 431.
                shared.head_done();
                return End::HandOver(stream, buf);
            }
            let before = buf.len();
            match read_more(&stream, &mut buf, shared, Wait::Head).await {
                Ok(0) | Err(_) => return End::Done,
                Ok(_) => {}
            }
            let new = &buf[before..];
            // Empty lines between requests do not start the head timeout (nor do they for the
            // guard); the first other byte does.
            if !begun && new.iter().any(|&b| b != b'\r' && b != b'\n') {
                begun = true;
                shared.head_begun();
            }
            // A head can only end at a line feed: parsing again on every byte of a head sent
            // byte by byte would cost its length squared.
            parse = new.contains(&b'\n');
        };
        shared.head_done();
        buf.advance(head.head_len);
        let body = if head.body_len == 0 {
            Bytes::new()
        } else {
            buf.split_to(head.body_len).freeze()
        };
        let head_request = head.parts.method == Method::HEAD;
        let resp = {
            let forward = proxy.handle_plain(head.parts, body, ctx);
            tokio::pin!(forward);
            let limit = max_head + MAX_PLAIN_BODY as usize;
            tokio::select! {
                biased;
                resp = &mut forward => resp,
                // A client that goes away cancels its request, as with hyper (no half-close):
                // the instance's answer would go nowhere, and the request stops counting as
                // in flight.
                () = client_gone(&stream, &mut buf, limit) => return End::Done,
            }
        };
        let close = head.close || shared.is_closing();
        // Watched by the response stall timeout to the last byte, which may go out after the
        // body (and the request's own mark) has ended.
        let responding = shared.responding();
        let written =
            write_response(&mut stream, &mut out, resp, head_request, close, shared).await;
        drop(responding);
        match written {
            Ok(true) if !close => {}
            Ok(_) => {
                // Closing after a complete answer: FIN first, so the client reads it all.
                let _ = stream.shutdown().await;
                return End::Done;
            }
            Err(_) => return End::Done,
        }
    }
}

/// What a read waits for, which decides whether a close request stops it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The next head: a close request stops the wait while nothing of it has come (the head
    /// timeout covers one that has begun).
    Head,
    /// The rest of a body: a close request (the idle timeout, shutdown) stops the wait.
    Body,
}

/// Resolves when the client closes its side of the connection (or it fails) while its request
/// is in flight. What it sends meanwhile (a pipelined request) is kept in `buf`, up to `limit`
/// bytes; past that, this stops reading.
async fn client_gone(stream: &TcpStream, buf: &mut BytesMut, limit: usize) {
    std::future::poll_fn(|cx| {
        loop {
            if buf.len() >= limit {
                return Poll::Pending;
            }
            match ready!(poll_read_into(stream, cx, buf, READ_CHUNK)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Reads more into `buf`; `Ok(0)` at the client's end of stream, and also when the connection
/// is asked to close while waiting (see [`Wait`]).
async fn read_more(
    stream: &TcpStream,
    buf: &mut BytesMut,
    shared: &crate::proxy::framing::ConnShared,
    wait: Wait,
) -> io::Result<usize> {
    let n = std::future::poll_fn(|cx| {
        if shared.is_closing() && (wait == Wait::Body || buf.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        poll_read_into(stream, cx, buf, READ_CHUNK)
    })
    .await?;
    shared.touch();
    Ok(n)
}

/// Writes `resp`; `Ok(false)` if the connection cannot carry another request (the response
/// said `Connection: close`, or its body failed mid-way, which the client sees as a cut).
async fn write_response(
    stream: &mut TcpStream,
    out: &mut BytesMut,
    resp: Response<ProxyBody>,
    head_request: bool,
    close: bool,
    shared: &crate::proxy::framing::ConnShared,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let chunked = !bodiless && exact.is_none();
    let mut keep = !has_token(&parts.headers, header::CONNECTION, "close");

    out.clear();
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || (chunked && name == header::CONTENT_LENGTH) {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !bodiless {
        match exact {
            Some(n) if !parts.headers.contains_key(header::CONTENT_LENGTH) => {
                put_header(out, b"content-length", n.to_string().as_bytes());
            }
            Some(_) => {}
            None => put_header(out, b"transfer-encoding", b"chunked"),
        }
    }
    if !parts.headers.contains_key(header::DATE) {
        put_header(out, b"date", &crate::date::now());
    }
    if close && keep {
        put_header(out, b"connection", b"close");
        keep = false;
    }
    out.put_slice(b"\r\n");

    if !bodiless {
        loop {
            let frame = {
                let mut next = body.frame();
                match poll_once(&mut next).await {
                    Some(f) => f,
                    None => {
                        // Nothing more in hand: what is gathered goes out before waiting.
                        flush(stream, out, shared).await?;
                        next.await
                    }
                }
            };
            match frame {
                None => break,
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: not forwarded on this path
                    };
                    if chunked {
                        if data.is_empty() {
                            continue;
                        }
                        out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        out.put_slice(&data);
                        out.put_slice(b"\r\n");
                    } else {
                        out.put_slice(&data);
                    }
                    if out.len() >= WRITE_BATCH {
                        flush(stream, out, shared).await?;
                    }
                }
                Some(Err(e)) => {
                    // The instance's body broke off: so must the client's, never end it short.
                    flush(stream, out, shared).await?;
                    tracing::debug!(error = %e, "response body failed");
                    return Ok(false);
                }
            }
        }
        if chunked {
            out.put_slice(b"0\r\n\r\n");
        }
    }
    flush(stream, out, shared).await?;
    Ok(keep)
}

async fn flush(
    stream: &mut TcpStream,
    out: &mut BytesMut,
    shared: &crate::proxy::framing::ConnShared,
) -> io::Result<()> {
    // Each write that moves bytes is activity: a slow client reading a long response is not
    // a stalled one.
    let mut written = 0;
    while written < out.len() {
        let n = stream.write(&out[written..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
        shared.touch();
    }
    out.clear();
    Ok(())
}

/// Polls `fut` once: its output if it is ready now.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx: &mut Context<'_>| {
        Poll::Ready(match Pin::new(&mut *fut).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(head: &str) -> Option<PlainHead> {
        match parse_head(head.as_bytes(), 8192, 100) {
            Parsed::Plain(h) => Some(h),
            _ => None,
        }
    }

    #[test]
    fn plain_requests_are_recognized() {
        let h = plain("GET /a?b=1 HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, close\r\n\r\n")
            .unwrap();
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.parts.headers["host"], "x");
        assert!(h.close);
        assert_eq!(h.body_len, 0);
        let h = plain("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello").unwrap();
        assert_eq!((h.body_len, h.close), (5, false));
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: Upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n",
            "POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header: x\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n",
            "G\x01T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(head.as_bytes(), 8192, 100), Parsed::Other),
                "{head:?} was taken as plain"
            );
        }
        // Over the limits: hyper (behind the guard) answers 431.
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(9000));
        assert!(matches!(
            parse_head(big.as_bytes(), 8192, 100),
            Parsed::Other
        ));
        let partial_big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(9000));
        assert!(matches!(
            parse_head(partial_big.as_bytes(), 8192, 100),
            Parsed::Other
        ));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "x: y\r\n".repeat(11));
        assert!(matches!(
            parse_head(many.as_bytes(), 8192, 10),
            Parsed::Other
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nho", 8192, 100),
            Parsed::Partial
        ));
    }
}
