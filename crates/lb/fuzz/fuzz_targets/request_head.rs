//! Arbitrary bytes as what a client sends, through the lb's own HTTP/1.1 loop's head
//! classification, the framing guard and the head normalization, as the proxy runs them. Must
//! hold for every input:
//! - no panic;
//! - a request the own loop would serve (a plain one) is one the guard passes unchanged;
//! - the guard gives the same output and verdicts however the bytes are split across reads;
//! - a refused head is replaced, never passed on;
//! - a head the guard passes is one `normalize_request` accepts (they agree on framing), and
//!   after normalization no hop-by-hop header is left (but a real upgrade's), there is one
//!   `X-Forwarded-For` ending with the client, one request id, and not both
//!   `Content-Length` and `Transfer-Encoding`;
//! - `check_host` (which the guard does not mirror: it may refuse what the guard passes) leaves
//!   exactly one `Host` when it accepts, the target's authority if the target has one.
#![no_main]

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;
use statehouse_lb::h1_server::plain_request_len;
use statehouse_lb::proxy::framing::{FrameScanner, Verdict};
use statehouse_lb::proxy::normalize::{
    ForwardContext, X_FORWARDED_FOR, X_REQUEST_ID, check_host, has_hop_by_hop,
    normalize_request,
};

fn scan(data: &[u8], split: usize) -> (Vec<u8>, Vec<Verdict>) {
    let mut s = FrameScanner::new(2048, 32);
    let (mut out, mut v) = (BytesMut::new(), Vec::new());
    let split = split.min(data.len());
    s.feed(&data[..split], &mut out, &mut v);
    s.feed(&data[split..], &mut out, &mut v);
    (out.to_vec(), v)
}

fuzz_target!(|data: &[u8]| {
    // What the lb's own HTTP/1.1 loop serves must be what the guard passes, unchanged: that
    // loop takes only plain requests and leaves every refusal to the guard and hyper.
    if let Some((head, body)) = plain_request_len(data, 2048, 32)
        && let Some(served) = data.get(..head + body)
    {
        let (out, verdicts) = scan(served, served.len());
        assert_eq!(verdicts, [Verdict::Ok], "the plain loop serves a head the guard refuses");
        assert_eq!(out, served, "the guard would change a head the plain loop serves");
    }
    let whole = scan(data, data.len());
    let split = data.first().map_or(0, |&b| usize::from(b));
    assert_eq!(
        scan(data, split),
        whole,
        "split at {split} changed the result"
    );
    let (out, verdicts) = whole;

    if let Some(Verdict::Reject(status, _)) = verdicts.first() {
        assert!(*status == 400 || *status == 431);
        // Empty lines before a head are passed on (hyper skips them too); then the replacement.
        let start = out
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(out.len());
        assert!(out[start..].starts_with(b"GET / HTTP/1.1\r\nhost: rejected.invalid\r\n"));
        return;
    }
    if verdicts.first() != Some(&Verdict::Ok) {
        return;
    }

    // The first head passed: parse it as hyper would and normalize it.
    let mut storage = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = req.parse(&out) else {
        panic!("the guard passed a head httparse refuses");
    };
    let Ok(method) = Method::from_bytes(req.method.unwrap_or("GET").as_bytes()) else {
        return;
    };
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return; // hyper refuses these with 400 itself
        };
        headers.append(n, v);
    }
    let ctx = ForwardContext {
        client_ip: [192, 0, 2, 1].into(),
        proto: "http",
        new_request_id: HeaderValue::from_static("fuzz-id"),
    };
    let norm = match normalize_request(&method, version, &mut headers, &ctx) {
        Ok(n) => n,
        Err(r) => panic!("guard passed what normalize refuses: {r:?}"),
    };
    assert!(!has_hop_by_hop(&headers, norm.upgrade.is_some()));
    let xff: Vec<_> = headers.get_all(X_FORWARDED_FOR).iter().collect();
    assert_eq!(xff.len(), 1);
    assert!(xff[0].as_bytes().ends_with(b"192.0.2.1"));
    assert_eq!(headers.get_all(X_REQUEST_ID).iter().count(), 1);
    assert!(
        !(headers.contains_key(http::header::CONTENT_LENGTH)
            && headers.contains_key(http::header::TRANSFER_ENCODING))
    );
    let Ok(target) = req.path.unwrap_or("/").parse::<http::Uri>() else {
        return; // hyper refuses these with 400 itself
    };
    let had_host = headers.contains_key(http::header::HOST);
    if check_host(version, target.authority(), &mut headers).is_ok() {
        let hosts: Vec<_> = headers.get_all(http::header::HOST).iter().collect();
        match target.authority() {
            Some(a) => assert_eq!(hosts, [a.as_str()]),
            None => assert_eq!(hosts.len(), usize::from(had_host)),
        }
        assert!(had_host || version == Version::HTTP_10 || target.authority().is_some());
    }
});
