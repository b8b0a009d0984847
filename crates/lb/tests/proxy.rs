//! The proxy against real backend processes: forwarding and header hygiene, refused heads (raw
//! bytes on a TCP socket), HTTP/2, WebSocket, timeouts, the admin API and graceful shutdown.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn round_robin_forwards_and_rewrites_headers() {
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let lb = Lb::start("", &[&a, &b, &c]).await;
    let client = client();
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..9 {
        let (s, h, body) = request(&client, "GET", &lb.url("/"), &[], b"")
            .await
            .unwrap();
        assert_eq!(s, 200);
        assert_eq!(served_by(&h), String::from_utf8_lossy(&body));
        assert!(h.contains_key("x-request-id"));
        *seen.entry(served_by(&h)).or_default() += 1;
    }
    assert_eq!(
        seen,
        HashMap::from([("a".into(), 3), ("b".into(), 3), ("c".into(), 3)])
    );

    let (s, h, body) = request(
        &client,
        "GET",
        &lb.url("/headers"),
        &[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eA=="),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "req-42"),
            ("x-app", "kept"),
        ],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let got: HashMap<String, Vec<String>> = serde_json::from_slice(&body).unwrap();
    for hop in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(!got.contains_key(hop), "{hop} was forwarded: {got:?}");
    }
    assert_eq!(got["x-forwarded-for"], ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(got["x-forwarded-proto"], ["http"]);
    assert_eq!(got["x-request-id"], ["req-42"]);
    assert_eq!(got["x-app"], ["kept"]);
    assert_eq!(h["x-request-id"], "req-42");

    let (s, _, body) = request(&client, "POST", &lb.url("/echo"), &[], b"hello body")
        .await
        .unwrap();
    assert_eq!((s, &body[..]), (200, &b"hello body"[..]));

    // The instance gets the client's Host.
    let (s, _, body) = request(&client, "GET", &lb.url("/headers?x=1"), &[], b"")
        .await
        .unwrap();
    assert_eq!(s, 200);
    let got: HashMap<String, Vec<String>> = serde_json::from_slice(&body).unwrap();
    assert_eq!(got["host"], [lb.addr.to_string()]);
    // HTTP/1.0 may come without a Host: the instance's address stands in.
    let answer = raw(lb.addr, b"GET /headers HTTP/1.0\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{answer}");
    let got: HashMap<String, Vec<String>> = serde_json::from_str(body).unwrap();
    let instance_addrs = [a.addr(), b.addr(), c.addr()];
    assert!(
        got["host"].len() == 1 && instance_addrs.contains(&got["host"][0]),
        "{got:?}"
    );
}

/// Each malformed or ambiguous head gets its status and nothing reaches an instance, including
/// the request smuggled behind it.
#[tokio::test]
async fn smuggling_and_malformed_heads_are_refused_before_forwarding() {
    let a = Backend::start("a");
    let lb = Lb::start("", &[&a]).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    let big = "a".repeat(20 * 1024);
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!(
                "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                5 + smuggled.len()
            ),
            "400",
            "CL+TE",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "400",
            "TE+CL",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n{smuggled}"
            ),
            "400",
            "repeated CL",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: 38\r\n\r\n{smuggled}"
            ),
            "400",
            "conflicting CL",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n{smuggled}"
            ),
            "400",
            "TE not ending in chunked",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: x\r\nx-bad: a\x01b\r\n\r\n{smuggled}"),
            "400",
            "control byte in a value",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: x\r\nx bad: v\r\n\r\n{smuggled}"),
            "400",
            "space in a name",
        ),
        (
            format!("GET / HTTP/1.1\r\n\r\n{smuggled}"),
            "400",
            "HTTP/1.1 without Host",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n{smuggled}"),
            "400",
            "two Hosts",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: a@b\r\n\r\n{smuggled}"),
            "400",
            "userinfo in Host",
        ),
        (
            "GET / HTTP/1.0\r\nhost: a\r\nhost: a\r\n\r\n".to_string(),
            "400",
            "two Hosts on HTTP/1.0 (hyper's connection)",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n"),
            "431",
            "oversized head",
        ),
        (
            format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n"),
            "431",
            "too many headers",
        ),
    ];
    for (input, status, what) in cases {
        let answer = raw(lb.addr, input.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.")
                && answer
                    .get(8..)
                    .is_some_and(|a| a.starts_with(&format!(" {status} "))),
            "{what}: got {answer:?}"
        );
    }
    let mut stats = a.stats().await;
    stats.remove("GET /health"); // the active checker's probes
    assert!(
        stats.is_empty(),
        "something reached the instance: {stats:?}"
    );
    assert_eq!(
        lb.metric("statehouse_lb_rejected_requests_total{status=\"400\"}")
            .await,
        11
    );
    assert_eq!(
        lb.metric("statehouse_lb_rejected_requests_total{status=\"431\"}")
            .await,
        2
    );

    // A well-formed request on a raw socket still works, pipelined twice.
    let answer = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");

    // An absolute-form target names the host; the instance sees that one, not Host's.
    let answer = raw(
        lb.addr,
        b"GET http://right.example/headers HTTP/1.1\r\nhost: wrong.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains(r#""host":["right.example"]"#), "{answer}");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_proxied() {
    let a = Backend::start("a");
    let lb = Lb::start("", &[&a]).await;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for _ in 0..3 {
        let (s, h, body) = request(&h2, "GET", &lb.url("/"), &[], b"").await.unwrap();
        assert_eq!(
            (s, served_by(&h).as_str(), &body[..]),
            (200, "a", &b"a"[..])
        );
    }
    let (s, _, body) = request(&h2, "POST", &lb.url("/echo"), &[], b"over h2")
        .await
        .unwrap();
    assert_eq!((s, &body[..]), (200, &b"over h2"[..]));
}

#[tokio::test]
async fn websocket_upgrade_is_proxied_end_to_end() {
    let a = Backend::start("a");
    let lb = Lb::start("", &[&a]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // RFC 6455's worked example: this key gives this accept value.
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for msg in [&b"hello"[..], b"through the balancer"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).await.unwrap();
        let mut reply = vec![0u8; 2 + msg.len()];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], 0x81);
        assert_eq!(&reply[2..], msg);
    }
    // The tunnel counts as in flight on the instance until it closes.
    assert_eq!(lb.instance("a").await["in_flight"], 1);
    drop(s);
    lb.await_in_flight("a", 0, Duration::from_secs(5), "tunnel released")
        .await;
}

#[tokio::test]
async fn idle_connections_and_stalled_heads_are_closed() {
    let a = Backend::start("a");
    let lb = Lb::start(
        "[timeouts]\nidle = \"200ms\"\nrequest_head = \"300ms\"\n",
        &[&a],
    )
    .await;
    // Idle keep-alive: one request, then nothing; the balancer closes the connection.
    let (mut s, _) = get_one(lb.addr).await;
    let mut buf = vec![0u8; 4096];
    let rest = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(rest, Ok(Ok(0))),
        "idle connection not closed: {rest:?}"
    );
    // A head that never ends.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(rest, Ok(Ok(0)) | Ok(Err(_))),
        "stalled head not cut: {rest:?}"
    );
    // A body that stops short of its length: nothing moves, the idle timeout cuts it.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(rest, Ok(Ok(0)) | Ok(Err(_))),
        "stalled body not cut: {rest:?}"
    );
}

/// A body buffered for retries (`retry.idempotent`) must arrive within the idle timeout: one
/// that stops short is answered 408, not waited for while the request counts as in flight.
#[tokio::test]
async fn a_buffered_body_that_stalls_is_answered_408() {
    let a = Backend::start("a");
    let lb = Lb::start(
        "[timeouts]\nidle = \"300ms\"\n[retry]\nidempotent = true\n",
        &[&a],
    )
    .await;
    let started = std::time::Instant::now();
    // HTTP/1.0: hyper's connection, where the body is gathered before forwarding.
    let answer = raw(
        lb.addr,
        b"PUT /echo HTTP/1.0\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 408 "), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4), "{answer}");
}

/// A client that goes away while its request waits on the instance cancels it: the request
/// stops counting as in flight long before the instance would have answered.
#[tokio::test]
async fn a_client_that_disconnects_cancels_its_request() {
    let a = Backend::start("a");
    let lb = Lb::start("[health]\nenabled = false\n", &[&a]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET /slow?ms=4000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    lb.await_in_flight("a", 1, Duration::from_secs(2), "the request in flight")
        .await;
    drop(s);
    lb.await_in_flight("a", 0, Duration::from_secs(2), "the request cancelled")
        .await;
}

/// An upgrade the instance declines ends the connection after its answer: the framing guard let
/// go of the connection at the upgrade request, so no request after it is served unjudged.
#[tokio::test]
async fn a_declined_upgrade_closes_the_connection() {
    let a = Backend::start("a");
    let lb = Lb::start("", &[&a]).await;
    let started = std::time::Instant::now();
    let answer = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: foo\r\n\r\n\
          GET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not closed: {answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    // A bare `Upgrade` header is enough for the guard to let go, so it closes too.
    let answer = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: foo\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "{answer}");
}

/// A raw connection that has sent one `GET /` and read its `200` answer.
async fn get_one(addr: std::net::SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    (s, answer)
}

#[tokio::test]
async fn upstream_response_timeout_gives_504() {
    let a = Backend::start("a");
    let lb = Lb::start(
        "[timeouts]\nupstream_response = \"200ms\"\n[passive]\nconsecutive_failures = 0\n",
        &[&a],
    )
    .await;
    let (s, _, _) = http_get(&lb.url("/slow?ms=2000"), &[]).await.unwrap();
    assert_eq!(s, 504);
    let (s, _, _) = http_get(&lb.url("/slow?ms=10"), &[]).await.unwrap();
    assert_eq!(s, 200);
}

#[tokio::test]
async fn admin_api_lists_adds_removes_and_requires_the_token() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Lb::start("[admin]\ntoken = \"0123456789abcdef-token\"\n", &[&a]).await;
    let c = client();
    let (s, h, _) = request(&c, "GET", &lb.admin_url("/instances"), &[], b"")
        .await
        .unwrap();
    assert_eq!(s, 401);
    assert_eq!(h["www-authenticate"], "Bearer");
    let (s, _, _) = request(
        &c,
        "GET",
        &lb.admin_url("/metrics"),
        &[("authorization", "Bearer wrong")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(s, 401);
    let auth = [("authorization", "Bearer 0123456789abcdef-token")];
    let (s, _, body) = request(&c, "GET", &lb.admin_url("/instances"), &auth, b"")
        .await
        .unwrap();
    assert_eq!(s, 200);
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list[0]["name"], "a");
    assert_eq!(list[0]["healthy"], true);

    let add = format!("{{\"name\":\"b\",\"addr\":\"{}\"}}", b.addr())
        .into_bytes()
        .leak();
    let (s, _, _) = request(&c, "POST", &lb.admin_url("/instances"), &auth, add)
        .await
        .unwrap();
    assert_eq!(s, 201);
    let (s, _, _) = request(&c, "POST", &lb.admin_url("/instances"), &auth, add)
        .await
        .unwrap();
    assert_eq!(s, 409, "a name is unique");
    let (s, _, body) = request(
        &c,
        "POST",
        &lb.admin_url("/instances"),
        &auth,
        b"{\"name\":\"x\",\"addr\":\"nope\"}",
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&body));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(served_by(&http_get(&lb.url("/"), &[]).await.unwrap().1));
    }
    assert_eq!(seen.len(), 2, "the added instance takes traffic");

    let (s, _, _) = request(&c, "DELETE", &lb.admin_url("/instances/a"), &auth, b"")
        .await
        .unwrap();
    assert_eq!(s, 200);
    for _ in 0..4 {
        assert_eq!(
            served_by(&http_get(&lb.url("/"), &[]).await.unwrap().1),
            "b"
        );
    }
    let (s, _, body) = request(&c, "GET", &lb.admin_url("/metrics"), &auth, b"")
        .await
        .unwrap();
    assert_eq!(s, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("statehouse_lb_requests_total{instance=\"b\"}"),
        "{text}"
    );
    assert!(text.contains("# TYPE statehouse_lb_request_duration_seconds histogram"));
    assert!(
        !text.contains("instance=\"a\""),
        "a removed instance's series go with it"
    );
}

#[tokio::test]
async fn a_non_loopback_admin_listener_needs_a_token() {
    let config = statehouse_lb::LbConfig::from_toml_str("").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Any non-loopback address of this machine would do; 0.0.0.0 is one without sending traffic.
    let admin = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = statehouse_lb::run(listener, admin, config, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("admin.token"), "{err}");
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let a = Backend::start("a");
    let mut lb = Lb::start("", &[&a]).await;
    let url = lb.url("/slow?ms=600");
    let in_flight = tokio::spawn(async move { http_get(&url, &[]).await });
    lb.await_in_flight("a", 1, Duration::from_secs(5), "request in flight")
        .await;
    let addr = lb.addr;
    let done = lb.shutdown();
    let (s, _, body) = in_flight.await.unwrap().unwrap();
    assert_eq!((s, &body[..]), (200, &b"a"[..]));
    done.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn the_drain_deadline_cuts_what_is_left() {
    let a = Backend::start("a");
    let mut lb = Lb::start("[shutdown]\ndrain_deadline = \"300ms\"\n", &[&a]).await;
    let url = lb.url("/slow?ms=30000");
    let in_flight = tokio::spawn(async move { http_get(&url, &[]).await });
    lb.await_in_flight("a", 1, Duration::from_secs(5), "request in flight")
        .await;
    let done = lb.shutdown();
    // The run returns after the deadline although the request would take 30 s.
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("run returned")
        .unwrap()
        .unwrap();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the cut request fails on the client"
    );
}

/// A hand-written instance on a raw socket, so a test controls its connections: it answers
/// every request `200 ok` (reading a `Content-Length` or chunked body first) and, with `close_after`
/// set, closes the connection that long after each answer without having said so (no
/// `Connection: close`), as an instance with a short keep-alive idle timeout does. It
/// counts the connections that carried a request to `/pool` and those requests.
struct RawInstance {
    addr: String,
    pool_connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pool_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// One step of a [`RawInstance`]'s answer.
#[derive(Clone)]
enum Step {
    Send(&'static [u8]),
    /// Wait until the test says go.
    Gate(std::sync::Arc<tokio::sync::Notify>),
    Sleep(Duration),
    Close,
}

/// What a [`RawInstance`] answers to a request head (lowercased).
type Script = std::sync::Arc<dyn Fn(&str) -> Vec<Step> + Send + Sync>;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

impl RawInstance {
    /// Answers every request `200 ok`; with `close_after`, closes the connection that long
    /// after answering.
    async fn start(close_after: Option<Duration>) -> Self {
        Self::scripted(std::sync::Arc::new(move |_| match close_after {
            Some(idle) => vec![Step::Send(OK), Step::Sleep(idle), Step::Close],
            None => vec![Step::Send(OK)],
        }))
        .await
    }

    /// Answers each request as `script` says, byte for byte. Counts the requests to `/pool`
    /// and the connections they came on.
    async fn scripted(script: Script) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (c, r, script) = (Arc::clone(&c), Arc::clone(&r), Arc::clone(&script));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut counted = false;
                    loop {
                        let end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        // A chunked body (no trailers) ends at its last chunk.
                        let length = if head.contains("transfer-encoding: chunked") {
                            loop {
                                if let Some(p) =
                                    buf[end..].windows(5).position(|w| w == b"0\r\n\r\n")
                                {
                                    break p + 5;
                                }
                                if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                    return;
                                }
                            }
                        } else {
                            length
                        };
                        while buf.len() < end + length {
                            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        if head.contains(" /pool") {
                            r.fetch_add(1, Ordering::SeqCst);
                            if !counted {
                                counted = true;
                                c.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        buf.drain(..end + length);
                        for step in script(&head) {
                            match step {
                                Step::Send(bytes) => {
                                    if stream.write_all(bytes).await.is_err() {
                                        return;
                                    }
                                }
                                Step::Gate(go) => go.notified().await,
                                Step::Sleep(d) => tokio::time::sleep(d).await,
                                Step::Close => return,
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            pool_connections: connections,
            pool_requests: requests,
        }
    }

    /// A balancer in front of this instance alone: one worker, so one pool, and no active
    /// checks, whose probes would open connections of their own.
    async fn balancer(&self) -> Lb {
        self.balancer_with("").await
    }

    /// [`Self::balancer`] with more configuration (tables only).
    async fn balancer_with(&self, more: &str) -> Lb {
        let toml = format!(
            "workers = 1\n[health]\nenabled = false\n\n[[instances]]\nname = \"raw\"\naddr = \"{}\"\n{more}",
            self.addr
        );
        Lb::start_with(statehouse_lb::LbConfig::from_toml_str(&toml).unwrap()).await
    }
}

/// Sends `n` requests with `body` to `/pool` one after the other, `gap` apart, each answered
/// `200 ok`.
async fn expect_ok(lb: &Lb, method: &str, body: &'static [u8], n: usize, gap: Duration) {
    let client = client();
    for i in 0..n {
        let (s, _, body) = request(&client, method, &lb.url("/pool"), &[], body)
            .await
            .unwrap();
        assert_eq!((s, &body[..]), (200, &b"ok"[..]), "{method} {i}");
        tokio::time::sleep(gap).await;
    }
}

/// Connections to an instance are kept alive and reused: 50 requests one after the other reach
/// it over a single connection.
#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    use std::sync::atomic::Ordering;
    let instance = RawInstance::start(None).await;
    let lb = instance.balancer().await;
    expect_ok(&lb, "GET", b"", 50, Duration::ZERO).await;
    assert_eq!(instance.pool_requests.load(Ordering::SeqCst), 50);
    assert_eq!(instance.pool_connections.load(Ordering::SeqCst), 1);
}

/// A pooled connection the instance closed while it sat idle is skipped, not failed: POSTs —
/// never retried once they may have reached an instance — all succeed, each reaching the
/// instance exactly once, though every connection they could reuse was closed.
#[tokio::test]
async fn connections_the_instance_closed_while_idle_are_not_failures() {
    use std::sync::atomic::Ordering;
    let instance = RawInstance::start(Some(Duration::from_millis(10))).await;
    let lb = instance.balancer().await;
    // 40 ms apart: the instance closes each idle connection meanwhile.
    expect_ok(&lb, "POST", b"payload", 20, Duration::from_millis(40)).await;
    assert_eq!(instance.pool_requests.load(Ordering::SeqCst), 20);
    assert_eq!(instance.pool_connections.load(Ordering::SeqCst), 20);
    // Not a failure nor a retry: the closed connections were never used.
    for series in ["errors_total", "retries_total", "requests_total"] {
        let n = lb
            .metric(&format!("statehouse_lb_{series}{{instance=\"raw\"}}"))
            .await;
        let expected = if series == "requests_total" { 20 } else { 0 };
        assert_eq!(n, expected, "{series}");
    }
}

/// A balancer in front of a [`RawInstance`] answering by the request line.
async fn scripted(script: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static) -> (RawInstance, Lb) {
    let instance = RawInstance::scripted(std::sync::Arc::new(script)).await;
    let lb = instance.balancer().await;
    (instance, lb)
}

/// Every way an instance may delimit a response body reaches the client whole, however the
/// bytes are spread over time; the connection is used again exactly when the framing allows.
#[tokio::test]
async fn every_response_framing_reaches_the_client_whole() {
    use std::sync::atomic::Ordering;
    let (instance, lb) = scripted(|head| {
        let line = head.lines().next().unwrap_or_default();
        let path = line.split(' ').nth(1).unwrap_or_default();
        match path {
            "/pool/chunked" => vec![
                Step::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"),
                Step::Sleep(Duration::from_millis(20)),
                Step::Send(b"6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"),
            ],
            "/pool/length" => vec![
                Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello"),
                Step::Sleep(Duration::from_millis(20)),
                Step::Send(b" world"),
            ],
            "/pool/continue" => vec![
                Step::Send(b"HTTP/1.1 100 Continue\r\n\r\n"),
                Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world"),
            ],
            // Bodiless whatever they say: reading one would eat the next response.
            "/pool/no-content" => vec![Step::Send(
                b"HTTP/1.1 204 No Content\r\ncontent-length: 11\r\n\r\n",
            )],
            "/pool/head" => vec![Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n")],
            // No length: the body ends when the connection does.
            "/pool/until-close" => vec![
                Step::Send(b"HTTP/1.1 200 OK\r\n\r\nhello world"),
                Step::Close,
            ],
            "/pool/http10" => vec![Step::Send(
                b"HTTP/1.0 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
            )],
            _ => vec![Step::Send(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            )],
        }
    })
    .await;
    let client = client();
    let get = |method: &'static str, path: &'static str| {
        let (client, url) = (client.clone(), lb.url(path));
        async move { request(&client, method, &url, &[], b"").await.unwrap() }
    };
    for path in ["/pool/chunked", "/pool/length", "/pool/continue"] {
        let (s, _, body) = get("GET", path).await;
        assert_eq!((s, &body[..]), (200, &b"hello world"[..]), "{path}");
    }
    let (s, _, body) = get("GET", "/pool/no-content").await;
    assert_eq!((s, body.len()), (204, 0));
    let (s, h, body) = get("HEAD", "/pool/head").await;
    assert_eq!((s, body.len()), (200, 0));
    assert_eq!(h["content-length"], "11");
    // All of that on one connection.
    assert_eq!(instance.pool_connections.load(Ordering::SeqCst), 1);

    let (s, _, body) = get("GET", "/pool/until-close").await;
    assert_eq!((s, &body[..]), (200, &b"hello world"[..]));
    let (s, _, body) = get("GET", "/pool/http10").await;
    assert_eq!((s, &body[..]), (200, &b"hello world"[..]));
    let (s, _, body) = get("GET", "/pool/length").await;
    assert_eq!((s, &body[..]), (200, &b"hello world"[..]));
    // The until-close body took its connection along, and an HTTP/1.0 one is not kept.
    assert_eq!(instance.pool_connections.load(Ordering::SeqCst), 3);
    assert_eq!(instance.pool_requests.load(Ordering::SeqCst), 8);
}

/// A response that could be read two ways, or is not HTTP, is a 502 and never passed on; one
/// that breaks off mid-body breaks the client's response off too, never ends it short.
#[tokio::test]
async fn ambiguous_and_broken_responses_are_never_passed_on() {
    let (_instance, lb) = scripted(|head| {
        let line = head.lines().next().unwrap_or_default();
        match line.split(' ').nth(1).unwrap_or_default() {
            "/pool/both" => vec![Step::Send(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            )],
            "/pool/differ" => vec![Step::Send(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            )],
            "/pool/switch" => vec![Step::Send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n")],
            "/pool/not-http" => vec![Step::Send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")],
            "/pool/bad-chunk" => vec![Step::Send(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            )],
            "/pool/truncated" => vec![
                Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello"),
                Step::Close,
            ],
            _ => vec![Step::Send(OK)],
        }
    })
    .await;
    let client = client();
    for path in [
        "/pool/both",
        "/pool/differ",
        "/pool/switch",
        "/pool/not-http",
    ] {
        let (s, _, _) = request(&client, "GET", &lb.url(path), &[], b"")
            .await
            .unwrap();
        assert_eq!(s, 502, "{path}");
    }
    for path in ["/pool/bad-chunk", "/pool/truncated"] {
        let r = request(&client, "GET", &lb.url(path), &[], b"").await;
        assert!(
            r.is_err(),
            "{path}: a broken body was passed on as whole: {r:?}"
        );
    }
    // Four answers refused at their head, two bodies that broke off.
    let errors = lb
        .metric("statehouse_lb_errors_total{instance=\"raw\"}")
        .await;
    assert_eq!(errors, 6);
    // The balancer carries on.
    expect_ok(&lb, "GET", b"", 3, Duration::ZERO).await;
}

/// A response body is passed on as it comes, not gathered first: the client reads the first
/// chunk while the instance has not yet sent the rest (it waits for the test to say go).
#[tokio::test]
async fn a_streamed_response_reaches_the_client_as_it_comes() {
    use http_body_util::BodyExt as _;
    use std::sync::atomic::Ordering;
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = std::sync::Arc::clone(&go);
    let (instance, lb) = scripted(move |_| {
        vec![
            Step::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"),
            Step::Gate(std::sync::Arc::clone(&gate)),
            Step::Send(b"4\r\nlast\r\n0\r\n\r\n"),
        ]
    })
    .await;
    let client = client();
    for round in 0..3 {
        let req = http::Request::get(lb.url("/pool/stream"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the first chunk did not come before the rest was sent")
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "first", "round {round}");
        go.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "last", "round {round}");
    }
    // And the connection was used again each time.
    assert_eq!(instance.pool_connections.load(Ordering::SeqCst), 1);
}

/// Plain requests are served by the lb's own HTTP/1.1 loop; the first one that is not (here a
/// chunked body) hands the connection to hyper, which serves the rest of it. Pipelined requests
/// are answered in order across the hand-over, and `Connection: close` closes after its answer
/// (`raw` reads until the lb closes; it would wait 5 s otherwise).
#[tokio::test]
async fn a_connection_moves_from_the_plain_loop_to_hyper_in_order() {
    let a = Backend::start("a");
    let lb = Lb::start("", &[&a]).await;
    let started = std::time::Instant::now();
    let answer = raw(
        lb.addr,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\none\
          POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\ntwo\
          POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n\
          POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nfour\
          GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the lb did not close: {answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 5, "{answer}");
    let order: Vec<usize> = ["one", "two", "three", "four"]
        .iter()
        .map(|w| {
            answer
                .find(&format!("\r\n\r\n{w}"))
                .unwrap_or_else(|| panic!("{w} missing: {answer}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order: {answer}"
    );
    assert!(answer.ends_with("a"), "{answer}");

    // The same on the plain loop alone.
    let started = std::time::Instant::now();
    let answer = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the lb did not close: {answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");

    // A body that comes after its head, in pieces.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhel")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"lo, ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"you").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("\r\n\r\nhello, you"),
        "{answer}"
    );

    // An upgrade after plain requests on one connection: hyper takes over and splices it.
    let (mut s, _) = get_one(lb.addr).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// A response whose bytes stop moving is cut after `timeouts.response_stall`, whether the
/// instance stops sending its body (on the plain loop, on hyper's connection, and with the
/// request on either upstream path) or the client stops reading; the request ends with it. A
/// response that keeps moving, however slowly, is not cut, nor is an instance that takes longer
/// than the stall timeout to answer at all.
#[tokio::test]
async fn a_response_that_stops_moving_is_cut() {
    // Sent in full to a client that reads none of it: far more than the socket buffers hold.
    let big: &'static [u8] = {
        let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 64 << 20).into_bytes();
        v.resize(v.len() + (64 << 20), b'x');
        Vec::leak(v)
    };
    // A small answer, whole in one read: its request ends as soon as it is handed on, before
    // the client has taken a byte of it.
    let small: &'static [u8] = {
        let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 8 << 10).into_bytes();
        v.resize(v.len() + (8 << 10), b'y');
        Vec::leak(v)
    };
    let (instance, lb) = {
        let instance = RawInstance::scripted(std::sync::Arc::new(move |head: &str| {
            let line = head.lines().next().unwrap_or_default();
            let path = line.split(' ').nth(1).unwrap_or_default();
            match path {
                "/pool/stall" => vec![
                    Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello"),
                    Step::Sleep(Duration::from_secs(60)),
                ],
                "/pool/trickle" => {
                    let mut steps = vec![Step::Send(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                    )];
                    for _ in 0..6 {
                        steps.push(Step::Sleep(Duration::from_millis(250)));
                        steps.push(Step::Send(b"1\r\n.\r\n"));
                    }
                    steps.push(Step::Send(b"0\r\n\r\n"));
                    steps
                }
                "/pool/late" => vec![Step::Sleep(Duration::from_millis(2500)), Step::Send(OK)],
                "/pool/big" => vec![Step::Send(big)],
                "/pool/small" => vec![Step::Send(small)],
                _ => vec![Step::Send(OK)],
            }
        }))
        .await;
        let lb = instance
            .balancer_with("[timeouts]\nresponse_stall = \"1s\"\n")
            .await;
        (instance, lb)
    };
    let stalls = "statehouse_lb_response_stalls_total";

    // The instance stops mid-body. HTTP/1.1 GET: the plain loop, raw upstream; HTTP/1.0: hyper's
    // connection, raw upstream; a chunked request body: hyper's connection and hyper's client.
    let requests: [&[u8]; 3] = [
        b"GET /pool/stall HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /pool/stall HTTP/1.0\r\nhost: x\r\n\r\n",
        b"POST /pool/stall HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    ];
    for (i, request) in requests.into_iter().enumerate() {
        let started = std::time::Instant::now();
        let answer = raw(lb.addr, request).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "request {i}: not cut: {answer}"
        );
        assert!(answer.starts_with("HTTP/1."), "request {i}: {answer}");
        assert!(answer.ends_with("\r\n\r\nhello"), "request {i}: {answer}");
        assert_eq!(lb.metric(stalls).await, i as u64 + 1, "request {i}");
    }

    // A body that keeps moving, a byte every 250 ms for 1.5 s, arrives whole; an answer that
    // takes 2.5 s to begin is the upstream response timeout's business, not a stall.
    let answer = raw(
        lb.addr,
        b"GET /pool/trickle HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.ends_with("1\r\n.\r\n0\r\n\r\n"), "{answer}");
    assert_eq!(answer.matches("1\r\n.\r\n").count(), 6, "{answer}");
    let answer = raw(
        lb.addr,
        b"GET /pool/late HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    assert_eq!(lb.metric(stalls).await, 3);

    // A client that reads nothing of a long response: cut, and its request ends.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET /pool/big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the unread response cut",
        || async { lb.metric(stalls).await == 4 },
    )
    .await;
    lb.await_in_flight("raw", 0, Duration::from_secs(5), "the request ended")
        .await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the connection stayed open");
    assert!(got < big.len(), "all {got} bytes arrived");

    // A client that pipelines requests for small answers and reads none: the answers fill the
    // socket buffers, and the one left waiting to be written is cut though its request ended.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let pipelined = "GET /pool/small HTTP/1.1\r\nhost: x\r\n\r\n".repeat(2000);
    s.write_all(pipelined.as_bytes()).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the unread answers cut",
        || async { lb.metric(stalls).await == 5 },
    )
    .await;
    // The same on hyper's connection (chunked request bodies take the connection there).
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let pipelined =
        "POST /pool/small HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            .repeat(2000);
    s.write_all(pipelined.as_bytes()).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the unread answers cut (hyper)",
        || async { lb.metric(stalls).await == 6 },
    )
    .await;
    drop(instance);
}
