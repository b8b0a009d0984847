//! Request and response head normalization: one pure function each, so that the fuzz target can
//! drive exactly what the proxy runs.
//!
//! On the way to an instance: framing checks (a second line of defence behind `framing`, and the
//! only one for HTTP/2), hop-by-hop headers removed (the fixed list and every header named in
//! `Connection`), `X-Forwarded-For` appended, `X-Forwarded-Proto` set, a request id kept or
//! added. An `Upgrade` survives only on a real HTTP/1.1 upgrade request, with
//! `Connection: upgrade` put back.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};

use crate::proxy::h1::has_token;

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// non-standard `Proxy-Connection` and `Keep-Alive`).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Facts about the connection a request came in on.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: IpAddr,
    /// `http` (the proxy terminates no TLS).
    pub proto: &'static str,
    /// The id to use if the request brings none (or an unusable one).
    pub new_request_id: HeaderValue,
}

/// Why a request head was refused; the status to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadRejection {
    /// Both `Content-Length` and `Transfer-Encoding`: the classic smuggling vector.
    ContentLengthWithTransferEncoding,
    /// More than one `Content-Length` (equal or not).
    MultipleContentLength,
    /// A `Content-Length` that is not a decimal number.
    InvalidContentLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`, or one on HTTP/1.0 or HTTP/2.
    InvalidTransferEncoding,
    /// An HTTP/1.1 request without `Host`.
    MissingHost,
    /// More than one `Host` line.
    MultipleHost,
    /// A `Host` (or target authority) that is not `host[:port]`.
    InvalidHost,
}

impl HeadRejection {
    /// The status to answer with.
    pub fn status(self) -> http::StatusCode {
        http::StatusCode::BAD_REQUEST
    }

    /// A short reason for the response body and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ContentLengthWithTransferEncoding => "both Content-Length and Transfer-Encoding",
            Self::MultipleContentLength => "more than one Content-Length",
            Self::InvalidContentLength => "invalid Content-Length",
            Self::InvalidTransferEncoding => "invalid Transfer-Encoding",
            Self::MissingHost => "HTTP/1.1 request without Host",
            Self::MultipleHost => "more than one Host",
            Self::InvalidHost => "invalid Host",
        }
    }
}

/// What the proxy needs to know after normalizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The `Upgrade` value when this is an HTTP/1.1 upgrade request (WebSocket).
    pub upgrade: Option<HeaderValue>,
    /// The request id now in the headers.
    pub request_id: HeaderValue,
}

/// Checks framing and rewrites `headers` for forwarding. Pure: same input, same output.
///
/// # Errors
/// A [`HeadRejection`] when the head must not be forwarded at all.
pub fn normalize_request(
    method: &Method,
    version: Version,
    headers: &mut HeaderMap,
    ctx: &ForwardContext,
) -> Result<Normalized, HeadRejection> {
    check_framing(version, headers)?;

    let upgrade =
        if version == Version::HTTP_11 && has_token(headers, header::CONNECTION, "upgrade") {
            headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
    // CONNECT would make the proxy a generic tunnel; it is not forwarded as an upgrade.
    let upgrade = upgrade.filter(|_| method != Method::CONNECT);

    strip_hop_by_hop(headers);
    if let Some(u) = &upgrade {
        headers.insert(header::UPGRADE, u.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    // X-Forwarded-For: the incoming chain (all lines, comma-joined) plus this hop's client.
    let xff = forwarded_for(headers, ctx.client_ip);
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(ctx.proto));

    // A request id: the client's if it is one plausible id, else ours.
    let mut ids = headers.get_all(&X_REQUEST_ID).iter();
    let request_id = match (ids.next(), ids.next()) {
        (Some(one), None) if is_good_request_id(one.as_bytes()) => one.clone(),
        _ => ctx.new_request_id.clone(),
    };
    headers.insert(X_REQUEST_ID, request_id.clone());

    Ok(Normalized {
        upgrade,
        request_id,
    })
}

/// Strips hop-by-hop headers from an instance's response. A `101 Switching Protocols` keeps
/// `Upgrade` and `Connection`, which the client needs to complete the upgrade.
pub fn normalize_response(status: http::StatusCode, headers: &mut HeaderMap) {
    if status == http::StatusCode::SWITCHING_PROTOCOLS {
        let upgrade = headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(headers);
        if let Some(u) = upgrade {
            headers.insert(header::UPGRADE, u);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    } else {
        strip_hop_by_hop(headers);
    }
}

/// The `X-Forwarded-For` value to send: every incoming line, comma-joined, then `client`.
fn forwarded_for(headers: &HeaderMap, client: IpAddr) -> HeaderValue {
    // An address is at most 45 bytes (an IPv6 address with an embedded IPv4 one).
    let mut ip = [0u8; 64];
    let ip_len = {
        let mut w = &mut ip[..];
        // Writing 45 bytes into 64 cannot fail.
        let _ = write!(w, "{client}");
        64 - w.len()
    };
    let ip = &ip[..ip_len];
    let incoming = headers.get_all(&X_FORWARDED_FOR);
    if incoming.iter().next().is_none() {
        // The common case: this is the first hop. One allocation, no joining.
        return HeaderValue::from_bytes(ip).expect("an IP address is visible ASCII");
    }
    let mut chain = Vec::with_capacity(64);
    for v in incoming {
        if let Ok(s) = v.to_str() {
            let s = s.trim();
            if !s.is_empty() {
                if !chain.is_empty() {
                    chain.extend_from_slice(b", ");
                }
                chain.extend_from_slice(s.as_bytes());
            }
        }
    }
    if !chain.is_empty() {
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(ip);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(chain))
        .expect("visible ASCII from to_str and an IP address")
}

/// A fresh request id: 32 random hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for c in id.iter_mut().rev() {
        *c = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).expect("hex digits are visible ASCII")
}

/// The `Host` rules (RFC 9112 §3.2, RFC 9113 §8.3.1): an HTTP/1.1 request has one, no request
/// has more than one, and its value is `host[:port]`; the instance must never have to guess
/// which of two hosts a request is for. When the target carries an authority (absolute-form, or
/// HTTP/2's `:authority`) that authority is the request's host: `Host` is set to it, whatever it
/// said (RFC 9112 §3.2.2 asks a proxy to do exactly that) — though an HTTP/1.1 request must
/// still have sent a valid one. Pure, like [`normalize_request`].
///
/// Kept apart from `normalize_request`, whose framing verdicts the framing guard mirrors: the
/// guard judges framing only, so a head it passes may still be refused here.
///
/// # Errors
/// [`HeadRejection::MissingHost`], [`HeadRejection::MultipleHost`] or
/// [`HeadRejection::InvalidHost`].
pub fn check_host(
    version: Version,
    authority: Option<&http::uri::Authority>,
    headers: &mut HeaderMap,
) -> Result<(), HeadRejection> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(HeadRejection::MultipleHost);
    }
    match first {
        None if version == Version::HTTP_11 => return Err(HeadRejection::MissingHost),
        Some(v) if !is_host(v.as_bytes()) => return Err(HeadRejection::InvalidHost),
        _ => {}
    }
    if let Some(authority) = authority {
        let value = authority.as_str();
        if value.is_empty() || !is_host(value.as_bytes()) {
            return Err(HeadRejection::InvalidHost);
        }
        let value = HeaderValue::from_str(value).map_err(|_| HeadRejection::InvalidHost)?;
        headers.insert(header::HOST, value);
    }
    Ok(())
}

/// Whether `v` is `uri-host [ ":" port ]` (RFC 3986 §3.2.2–3.2.3): a bracketed IP literal, or a
/// reg-name or IPv4 address (unreserved, percent-encoded and sub-delims characters), then
/// optionally `:` and decimal digits. Never userinfo (`@`), a path, whitespace, a control byte
/// or raw UTF-8 (an internationalized name travels as punycode). Empty is allowed (RFC 9112
/// §3.2: a target without an authority).
fn is_host(v: &[u8]) -> bool {
    let (name_ok, port) = if v.first() == Some(&b'[') {
        let Some(close) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &v[1..close];
        let ok = !literal.is_empty()
            && literal.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'%' | b'-' | b'_' | b'~')
            });
        (ok, &v[close + 1..])
    } else {
        let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        let ok = v[..end].iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        });
        (ok, &v[end..])
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    name_ok && port_ok
}

fn check_framing(version: Version, headers: &HeaderMap) -> Result<(), HeadRejection> {
    // Counted without collecting: this runs on every request.
    let mut cls = headers.get_all(header::CONTENT_LENGTH).iter();
    let te = headers.get_all(header::TRANSFER_ENCODING);
    let first_cl = cls.next();
    let te_last = te.iter().next_back();
    if first_cl.is_some() && te_last.is_some() {
        return Err(HeadRejection::ContentLengthWithTransferEncoding);
    }
    if cls.next().is_some() {
        return Err(HeadRejection::MultipleContentLength);
    }
    if let Some(cl) = first_cl {
        let b = cl.as_bytes();
        if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
            return Err(HeadRejection::InvalidContentLength);
        }
    }
    if let Some(last) = te_last {
        if version != Version::HTTP_11 {
            return Err(HeadRejection::InvalidTransferEncoding);
        }
        // Bytes, not `to_str`: the framing guard reads the same bytes the same way.
        let last = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .map(|c| c.trim_ascii());
        if !last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
            return Err(HeadRejection::InvalidTransferEncoding);
        }
    }
    Ok(())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one pass over the (few) names present is cheaper than nine
    // removals, each a hash lookup.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Headers the client declared connection-specific (`Connection: close, x-foo`).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

fn is_good_request_id(b: &[u8]) -> bool {
    (1..=128).contains(&b.len())
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c))
}

/// True if a hop-by-hop header is present (`Upgrade` and `Connection` are allowed when
/// `allow_upgrade`). For tests and the fuzz target.
pub fn has_hop_by_hop(headers: &HeaderMap, allow_upgrade: bool) -> bool {
    HOP_BY_HOP.iter().any(|n| {
        let allowed = allow_upgrade && (n == header::UPGRADE || n == header::CONNECTION);
        !allowed && headers.contains_key(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ForwardContext {
        ForwardContext {
            client_ip: [10, 0, 0, 9].into(),
            proto: "http",
            new_request_id: HeaderValue::from_static("rid-1"),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn run(pairs: &[(&str, &str)]) -> Result<(HeaderMap, Normalized), HeadRejection> {
        let mut h = headers(pairs);
        normalize_request(&Method::GET, Version::HTTP_11, &mut h, &ctx()).map(|n| (h, n))
    }

    #[test]
    fn strips_hop_by_hop_including_headers_named_in_connection() {
        let (h, n) = run(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ])
        .unwrap();
        assert!(!has_hop_by_hop(&h, false));
        assert!(!h.contains_key("x-secret"));
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(
            n.upgrade, None,
            "Upgrade without Connection: upgrade is not an upgrade"
        );
    }

    #[test]
    fn keeps_a_real_upgrade() {
        let (h, n) = run(&[("connection", "Upgrade"), ("upgrade", "websocket")]).unwrap();
        assert_eq!(n.upgrade.unwrap(), "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_headers_and_request_id() {
        let (h, n) = run(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
        ])
        .unwrap();
        assert_eq!(h[X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(n.request_id, "rid-1");
        let (h, _) = run(&[("x-request-id", "abc-123")]).unwrap();
        assert_eq!(h[X_REQUEST_ID], "abc-123");
        let (h, _) = run(&[("x-request-id", "a b")]).unwrap();
        assert_eq!(h[X_REQUEST_ID], "rid-1");
        let (h, _) = run(&[("x-request-id", "a"), ("x-request-id", "b")]).unwrap();
        assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
    }

    #[test]
    fn framing_rejections() {
        use HeadRejection::*;
        assert_eq!(
            run(&[("content-length", "5"), ("transfer-encoding", "chunked")]).unwrap_err(),
            ContentLengthWithTransferEncoding
        );
        assert_eq!(
            run(&[("content-length", "5"), ("content-length", "5")]).unwrap_err(),
            MultipleContentLength
        );
        assert_eq!(
            run(&[("content-length", "5"), ("content-length", "6")]).unwrap_err(),
            MultipleContentLength
        );
        assert_eq!(
            run(&[("content-length", "+5")]).unwrap_err(),
            InvalidContentLength
        );
        assert_eq!(
            run(&[("transfer-encoding", "chunked, gzip")]).unwrap_err(),
            InvalidTransferEncoding
        );
        assert!(run(&[("transfer-encoding", "gzip, chunked")]).is_ok());
        let mut h = headers(&[("transfer-encoding", "chunked")]);
        assert_eq!(
            normalize_request(&Method::POST, Version::HTTP_10, &mut h, &ctx()).unwrap_err(),
            InvalidTransferEncoding
        );
    }

    #[test]
    fn response_keeps_upgrade_only_on_101() {
        let mut h = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "x"),
        ]);
        normalize_response(http::StatusCode::SWITCHING_PROTOCOLS, &mut h);
        assert_eq!(h[header::UPGRADE], "websocket");
        let mut h = headers(&[
            ("connection", "close"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
        ]);
        normalize_response(http::StatusCode::OK, &mut h);
        assert!(!has_hop_by_hop(&h, false));
    }

    #[test]
    fn host_is_required_once_and_well_formed() {
        use http::uri::Authority;
        let host = |v: &[&str], version: Version| {
            let mut h = HeaderMap::new();
            for v in v {
                h.append(header::HOST, HeaderValue::from_str(v).unwrap());
            }
            check_host(version, None, &mut h).map(|()| h)
        };
        assert!(host(&["shop.example"], Version::HTTP_11).is_ok());
        assert!(host(&["127.0.0.1:8080"], Version::HTTP_11).is_ok());
        assert!(host(&["[::1]:8080"], Version::HTTP_11).is_ok());
        assert!(host(&[""], Version::HTTP_11).is_ok(), "empty is allowed");
        assert!(host(&[], Version::HTTP_10).is_ok(), "HTTP/1.0 may omit it");
        assert_eq!(
            host(&[], Version::HTTP_11).unwrap_err(),
            HeadRejection::MissingHost
        );
        for v in [&["a", "a"][..], &["a", "b"]] {
            for version in [Version::HTTP_10, Version::HTTP_11] {
                assert_eq!(
                    host(v, version).unwrap_err(),
                    HeadRejection::MultipleHost,
                    "{v:?} {version:?}"
                );
            }
        }
        for bad in [
            "user@shop.example",
            "a b",
            "shop.example/x",
            "a\tb",
            "a?b",
            "a#b",
            "é",
            "a:b:c",
            "a:80x",
            "a:123456",
            "]x[",
            "[::1",
            "[::1]x",
            "[]",
        ] {
            assert_eq!(
                host(&[bad], Version::HTTP_11).unwrap_err(),
                HeadRejection::InvalidHost,
                "{bad}"
            );
        }

        assert!(host(&["[fe80::1%25eth0]"], Version::HTTP_11).is_ok());
        assert!(
            host(&["shop.example:"], Version::HTTP_11).is_ok(),
            "an empty port"
        );

        // The target's authority wins over Host (HTTP/1.1, which must still send one), and
        // stands in for a missing one (HTTP/2's `:authority`, HTTP/1.0).
        let right = Authority::from_static("right.example:81");
        for (given, version) in [
            (&["wrong.example"][..], Version::HTTP_11),
            (&[], Version::HTTP_2),
            (&[], Version::HTTP_10),
        ] {
            let mut h = HeaderMap::new();
            for v in given {
                h.append(header::HOST, HeaderValue::from_static(v));
            }
            check_host(version, Some(&right), &mut h).unwrap();
            assert_eq!(h.get_all(header::HOST).iter().count(), 1);
            assert_eq!(h[header::HOST], "right.example:81");
        }
        let mut h = HeaderMap::new();
        assert_eq!(
            check_host(Version::HTTP_11, Some(&right), &mut h).unwrap_err(),
            HeadRejection::MissingHost,
            "absolute-form does not excuse a missing Host"
        );
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("a b"));
        assert_eq!(
            check_host(Version::HTTP_11, Some(&right), &mut h).unwrap_err(),
            HeadRejection::InvalidHost,
            "nor an invalid one"
        );
        let mut h = HeaderMap::new();
        assert_eq!(
            check_host(
                Version::HTTP_2,
                Some(&Authority::from_static("u@right.example")),
                &mut h
            )
            .unwrap_err(),
            HeadRejection::InvalidHost
        );
    }
}
