//! HTTP/1.1 toward the instances, for the exchange the proxy runs in the request's own task
//! (see `upstream`): writing a request head, reading a response head, and framing and decoding
//! the response body. Pure: bytes in, bytes out, no I/O, so the fuzz target drives exactly this.
//!
//! The response framing follows RFC 9112 §6.3, strictly where a proxy must be strict (a
//! response that could be read two ways is refused, never guessed at):
//! - a response to `HEAD`, and every `1xx`, `204` and `304`, has no body, whatever it says;
//! - `Transfer-Encoding` whose last coding is `chunked`: chunked; any other
//!   `Transfer-Encoding`: the body runs until the connection closes;
//! - `Transfer-Encoding` together with `Content-Length`, or on an HTTP/1.0 response: refused;
//! - `Content-Length`: that many bytes; several that differ, or one that is not a number:
//!   refused (several equal ones are one length, RFC 9110 §8.6);
//! - neither: the body runs until the connection closes.
//!
//! `1xx` heads before the final one are skipped; a `101` is refused (this path never asks for
//! an upgrade).

use std::mem::MaybeUninit;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Header lines a response head (or a trailer section) may have; more is refused (hyper's
/// default limit).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// The largest response head accepted; more is refused.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The longest chunk-size line (extensions included) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an instance's response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    /// The head is not HTTP/1.x.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// The head (or the trailers) went past [`MAX_RESPONSE_HEAD`] without ending.
    #[error("response head over {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    /// A header name or value `http` refuses.
    #[error("invalid response header")]
    InvalidHeader,
    /// A `101` on a request that asked for no upgrade.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedSwitch,
    /// Framing the body could be read two ways.
    #[error("ambiguous response framing: {0}")]
    Framing(&'static str),
    /// A malformed chunk.
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    /// The connection closed before the body ended.
    #[error("the instance closed the connection before the response ended")]
    Truncated,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the instance closes the connection.
    UntilClose,
}

/// A final response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status (never `1xx`).
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The headers as sent.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request after this response's body.
    pub reusable: bool,
}

/// Writes a request head: `method target HTTP/1.1`, `headers` (their `Content-Length` left
/// out), `host` if `headers` has none, and a `Content-Length` for `body_len` when the body is
/// not empty or the client sent one.
pub fn write_request_head(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    body_len: usize,
) {
    out.reserve(64 + target.len() + headers.len() * 32);
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    let mut length_sent = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            length_sent = true;
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(host) = host.filter(|_| !headers.contains_key(header::HOST)) {
        put_header(out, b"host", host.as_bytes());
    }
    if body_len > 0 || length_sent {
        put_header(out, b"content-length", itoa_buf(body_len).as_bytes());
    }
    out.put_slice(b"\r\n");
}

pub(crate) fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// A decimal number as a small buffer (no allocation).
struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: usize) -> Decimal {
    let mut buf = [0u8; 20];
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal { buf, start }
}

/// Reads the final response head to a request with `method` from the front of `buf`: skips
/// (consumes) `1xx` heads before it, consumes the final head and returns it. `Ok(None)`: more
/// bytes are needed (what was consumed stays consumed).
pub fn read_response_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, H1Error> {
    loop {
        // Uninitialized: filling 100 empty headers on every response showed in profiles.
        let mut storage =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut storage,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
                return Err(H1Error::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(H1Error::HeadTooLarge),
            Err(e) => return Err(H1Error::Head(e)),
        };
        if len > MAX_RESPONSE_HEAD {
            return Err(H1Error::HeadTooLarge);
        }
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Head(httparse::Error::Status))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(H1Error::UnexpectedSwitch);
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Room for what the proxy adds (X-Request-Id, a sticky cookie) without growing the map.
        let mut headers = header_map(resp.headers, 2)?;
        let framing = framing(method, status, version, &headers)?;
        one_content_length(&mut headers);
        let reusable = version == Version::HTTP_11
            && framing != Framing::UntilClose
            && !has_token(&headers, header::CONNECTION, "close");
        buf.advance(len);
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            framing,
            reusable,
        }));
    }
}

/// Parsed header lines as a map with room for `extra` more.
fn header_map(fields: &[httparse::Header<'_>], extra: usize) -> Result<HeaderMap, H1Error> {
    let mut map = HeaderMap::with_capacity(fields.len() + extra);
    for h in fields {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| H1Error::InvalidHeader)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| H1Error::InvalidHeader)?;
        map.append(name, value);
    }
    Ok(map)
}

/// The body framing of a final response (RFC 9112 §6.3; see the module docs).
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
) -> Result<Framing, H1Error> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let has_te = headers.contains_key(header::TRANSFER_ENCODING);
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter().peekable();
    if has_te {
        if lengths.peek().is_some() {
            return Err(H1Error::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if version == Version::HTTP_10 {
            return Err(H1Error::Framing("Transfer-Encoding on HTTP/1.0"));
        }
        return Ok(if last_coding_is_chunked(headers) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for v in lengths {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_length(trim(part)).ok_or(H1Error::Framing("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Framing("Content-Lengths that differ"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// A `Content-Length` value: decimal digits only, no sign, no spaces.
pub(crate) fn parse_length(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Several equal `Content-Length`s (lines, or a list in one line) become one line: what the
/// proxy passes on is never a list that some clients refuse. Lengths that differ are left for
/// the framing rules (refused, except on bodiless responses, where they mean nothing).
fn one_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => return,
        (Some(v), None) if !v.as_bytes().contains(&b',') => return,
        _ => {}
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            match parse_length(trim(part)) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return,
            }
        }
    }
    if let Some(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|c| trim(c).eq_ignore_ascii_case(b"chunked"))
}

/// Whether a comma-separated header (`Connection`) lists `token`, in any case.
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// `b` without leading and trailing spaces and tabs.
pub(crate) fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t'));
    let Some(start) = start else { return &[] };
    let end = b
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t'))
        .unwrap_or(start);
    &b[start..=end]
}

/// One step of a response body.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section of a chunked body (the body has ended).
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More bytes are needed.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    UntilClose,
    Done,
}

/// Takes a response body apart from the bytes that follow its head, frame by frame.
#[derive(Debug)]
pub struct BodyDecoder {
    state: DecodeState,
}

impl BodyDecoder {
    /// A decoder for a body framed so.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => DecodeState::Done,
            Framing::Length(n) => DecodeState::Length(n),
            Framing::Chunked => DecodeState::ChunkSize,
            Framing::UntilClose => DecodeState::UntilClose,
        };
        Self { state }
    }

    /// True once the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == DecodeState::Done
    }

    /// Body bytes still expected, when known (a `Content-Length` body).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            DecodeState::Length(n) => Some(n),
            DecodeState::Done => Some(0),
            _ => None,
        }
    }

    /// The next step, consuming from the front of `buf`. After `Data` or `Trailers`, call
    /// again: the body may have ended (or more may be in `buf`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                DecodeState::Done => return Ok(Decoded::End),
                _ if buf.is_empty() => return Ok(Decoded::NeedMore),
                DecodeState::UntilClose => return Ok(Decoded::Data(buf.split().freeze())),
                DecodeState::Length(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        DecodeState::Done
                    } else {
                        DecodeState::Length(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                DecodeState::ChunkSize => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((len, _))) if len > MAX_CHUNK_LINE => {
                        return Err(H1Error::Chunk("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Complete((len, 0))) => {
                        buf.advance(len);
                        self.state = DecodeState::Trailers;
                    }
                    Ok(httparse::Status::Complete((len, size))) => {
                        buf.advance(len);
                        self.state = DecodeState::ChunkData(size);
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(H1Error::Chunk("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err(H1Error::Chunk("invalid chunk size")),
                },
                DecodeState::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        DecodeState::ChunkDataEnd
                    } else {
                        DecodeState::ChunkData(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                DecodeState::ChunkDataEnd => {
                    if buf.len() < 2 {
                        if buf[0] != b'\r' {
                            return Err(H1Error::Chunk("chunk data not followed by CRLF"));
                        }
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Chunk("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = DecodeState::ChunkSize;
                }
                DecodeState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = DecodeState::Done;
                        return Ok(Decoded::End);
                    }
                    if buf[..] == b"\r"[..] {
                        return Ok(Decoded::NeedMore);
                    }
                    let mut storage = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                    return match httparse::parse_headers(buf, &mut storage) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let trailers = header_map(fields, 0)?;
                            buf.advance(len);
                            self.state = DecodeState::Done;
                            Ok(Decoded::Trailers(trailers))
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
                            Err(H1Error::HeadTooLarge)
                        }
                        Ok(httparse::Status::Partial) => Ok(Decoded::NeedMore),
                        Err(httparse::Error::TooManyHeaders) => Err(H1Error::HeadTooLarge),
                        Err(_) => Err(H1Error::Chunk("malformed trailers")),
                    };
                }
            }
        }
    }

    /// The instance closed the connection: the end of an until-close body, an error for any
    /// other that has not ended.
    pub fn eof(&mut self) -> Result<Decoded, H1Error> {
        match self.state {
            DecodeState::UntilClose | DecodeState::Done => {
                self.state = DecodeState::Done;
                Ok(Decoded::End)
            }
            _ => Err(H1Error::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8], method: Method) -> Result<Option<ResponseHead>, H1Error> {
        read_response_head(&mut BytesMut::from(bytes), &method)
    }

    fn framing_of(bytes: &str) -> Result<(Framing, bool), H1Error> {
        head(bytes.as_bytes(), Method::GET).map(|h| {
            let h = h.expect("complete head");
            (h.framing, h.reusable)
        })
    }

    /// The whole body, fed `piece` bytes at a time, with the trailers seen.
    fn decode_all(
        framing: Framing,
        input: &[u8],
        piece: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), H1Error> {
        let mut d = BodyDecoder::new(framing);
        let (mut body, mut trailers, mut buf) = (Vec::new(), None, BytesMut::new());
        let mut chunks = input.chunks(piece.max(1));
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => body.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((body, trailers, buf)),
                Decoded::NeedMore => match chunks.next() {
                    Some(c) => buf.extend_from_slice(c),
                    None => {
                        d.eof()?;
                        return Ok((body, trailers, buf));
                    }
                },
            }
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = |s: &str| framing_of(s).expect(s);
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        for repeated in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\n",
        ] {
            let h = head(repeated, Method::GET).unwrap().unwrap();
            let lengths: Vec<_> = h.headers.get_all("content-length").iter().collect();
            assert_eq!(lengths, ["5"], "passed on as one line");
        }
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), (Framing::UntilClose, false));
        assert_eq!(
            ok("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            ok("HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        let h = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);

        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(framing_of(bad), Err(H1Error::Framing(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn informational_heads_are_skipped_and_101_refused() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nhi"[..],
        );
        let h = read_response_head(&mut buf, &Method::POST)
            .unwrap()
            .unwrap();
        assert_eq!(h.status, StatusCode::CREATED);
        assert_eq!(&buf[..], b"hi");

        // A partial final head after a 100: the 100 is consumed, the rest waits.
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..]);
        assert!(
            read_response_head(&mut buf, &Method::POST)
                .unwrap()
                .is_none()
        );
        assert_eq!(&buf[..], b"HTTP/1.1 2");

        assert_eq!(
            head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", Method::GET).unwrap_err(),
            H1Error::UnexpectedSwitch
        );
    }

    #[test]
    fn bad_and_oversized_heads_are_errors() {
        assert!(matches!(
            head(b"HTTP/1.1 2000 OK\r\n\r\n", Method::GET),
            Err(H1Error::Head(_))
        ));
        assert!(matches!(
            head(b"SSH-2.0-OpenSSH\r\n\r\n", Method::GET),
            Err(H1Error::Head(_))
        ));
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_RESPONSE_HEADERS {
            many.push_str(&format!("x-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            head(many.as_bytes(), Method::GET).unwrap_err(),
            H1Error::HeadTooLarge
        );
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_RESPONSE_HEAD));
        assert_eq!(
            head(endless.as_bytes(), Method::GET).unwrap_err(),
            H1Error::HeadTooLarge
        );
        assert!(
            head(b"HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bodies_decode_the_same_however_they_arrive() {
        let chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 9\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, 100] {
            let (body, trailers, rest) = decode_all(Framing::Chunked, chunked, piece).unwrap();
            assert_eq!(body, b"hello world", "piece {piece}");
            assert_eq!(trailers.unwrap()["x-sum"], "9");
            // What follows the body is left for the next response (fed whole at piece 100).
            if piece == 100 {
                assert_eq!(&rest[..], b"NEXT");
            }

            let (body, trailers, _) =
                decode_all(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n", piece).unwrap();
            assert_eq!((body.as_slice(), trailers), (&b"abc"[..], None));

            let (body, _, rest) = decode_all(Framing::Length(4), b"abcdEF", piece).unwrap();
            assert_eq!(body, b"abcd");
            if piece == 100 {
                assert_eq!(&rest[..], b"EF");
            }
            let (body, _, _) = decode_all(Framing::UntilClose, b"all of it", piece).unwrap();
            assert_eq!(body, b"all of it");
        }
    }

    #[test]
    fn truncated_and_malformed_bodies_are_errors() {
        assert_eq!(
            decode_all(Framing::Length(10), b"short", 3).unwrap_err(),
            H1Error::Truncated
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"5\r\nhel", 2).unwrap_err(),
            H1Error::Truncated
        );
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\r\nhello\n",
            b"0\r\n\x01bad\r\n\r\n",
        ] {
            assert!(decode_all(Framing::Chunked, bad, 100).is_err(), "{bad:?}");
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(matches!(
            decode_all(Framing::Chunked, long.as_bytes(), 100),
            Err(H1Error::Chunk(_))
        ));
    }

    #[test]
    fn request_heads_carry_host_and_length() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let mut out = BytesMut::new();
        let host = HeaderValue::from_static("10.0.0.1:80");
        write_request_head(&mut out, &Method::POST, "/p?q=1", &headers, Some(&host), 12);
        assert_eq!(
            &out[..],
            b"POST /p?q=1 HTTP/1.1\r\nx-a: 1\r\nhost: 10.0.0.1:80\r\ncontent-length: 12\r\n\r\n"
        );

        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::HOST, HeaderValue::from_static("shop.example"));
        let mut out = BytesMut::new();
        write_request_head(&mut out, &Method::GET, "/", &headers, Some(&host), 0);
        assert_eq!(
            &out[..],
            b"GET / HTTP/1.1\r\nx-a: 1\r\nhost: shop.example\r\n\r\n"
        );
        assert_eq!(itoa_buf(0).as_bytes(), b"0");
        assert_eq!(itoa_buf(1234567).as_bytes(), b"1234567");
    }
}
