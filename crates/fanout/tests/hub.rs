//! The WebSocket hub end to end: real hub processes, real brokers, the Rust
//! client. An instance's death, a drain, a slow consumer and a broker outage
//! each lose nothing; bad input closes the connection with a clear code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use statehouse_fanout::client::{Client, ClientConfig, ClientError, Event};
use statehouse_fanout::hub::{Hub, HubConfig, Identity, TokenAuth};
use statehouse_fanout::protocol::close;
use statehouse_fanout::{Broker, BrokerConfig, open};
use statehouse_testkit::{FaultProxy, RedisServer, shared_redis, unique_prefix};
use statehouse_token::{IssuerConfig, Key, KeyRing, TokenIssuer, TokenVerifier, VerifierConfig};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &[u8] = b"statehouse fan-out test secret, 32+ bytes";
const ISSUER: &str = "statehouse-test";
const AUDIENCE: &str = "fanout";

fn ring() -> KeyRing {
    KeyRing::new()
        .with_key(Key::hmac("k1", SECRET).unwrap())
        .unwrap()
}

fn token(subject: &str) -> String {
    let issuer = TokenIssuer::new(ring(), IssuerConfig::new(ISSUER, AUDIENCE)).unwrap();
    issuer.issue_access(subject, Default::default()).unwrap().0
}

/// Tokens may subscribe to `public.*`, `room.*` and their own `user.<sub>`.
fn auth() -> Arc<TokenAuth> {
    let verifier = TokenVerifier::new(ring(), VerifierConfig::new(ISSUER, AUDIENCE));
    Arc::new(
        TokenAuth::new(verifier).channels(|who: &Identity, ch: &str| {
            ch.starts_with("public.")
                || ch.starts_with("room.")
                || ch == format!("user.{}", who.subject)
        }),
    )
}

/// A hub in this process on a free port; the task serves until aborted.
async fn serve(hub: Hub) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app: axum::Router = hub.router("/ws");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("ws://{addr}/ws"), task)
}

/// A hub with the default configuration on a memory broker, served.
async fn serve_on_memory() -> (String, tokio::task::JoinHandle<()>) {
    serve(Hub::new(
        memory_broker().await,
        auth(),
        HubConfig::new("a"),
        None,
    ))
    .await
}

async fn memory_broker() -> Arc<dyn Broker> {
    open(BrokerConfig::new("memory://")).await.unwrap()
}

fn client(urls: &[String], subject: &str) -> Client {
    Client::new(ClientConfig::new(urls.iter().cloned()).token(token(subject)))
}

/// Reads events until `want` says stop, failing after `within`.
async fn until<T>(
    client: &mut Client,
    within: Duration,
    mut want: impl FnMut(&Event) -> Option<T>,
) -> T {
    tokio::time::timeout(within, async {
        loop {
            let event = client.next().await.expect("client refused");
            if let Some(found) = want(&event) {
                return found;
            }
        }
    })
    .await
    .expect("the expected event did not come in time")
}

async fn subscribed(client: &mut Client, channel: &str) {
    client.subscribe(channel).await;
    until(client, Duration::from_secs(10), |e| match e {
        Event::Subscribed { channel: c, .. } if c == channel => Some(()),
        _ => None,
    })
    .await;
}

/// Messages on `channel` until offset `last` arrives; asserts nothing else
/// arrives in between (no gap, no duplicate, no reordering).
async fn messages_until(client: &mut Client, channel: &str, last: u64) -> Vec<(u64, Bytes)> {
    let mut got: Vec<(u64, Bytes)> = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while got.last().map_or(0, |m| m.0) < last {
            match client.next().await.expect("client refused") {
                Event::Message(m) if m.channel == channel => got.push((m.offset, m.payload)),
                Event::Gap { .. } => panic!("unexpected gap"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("stopped at {:?}", got.last().map(|m| m.0)));
    got
}

fn assert_exact(got: &[(u64, Bytes)], published: &BTreeMap<u64, Bytes>, from: u64) {
    let expected: Vec<(u64, Bytes)> = published
        .range(from..)
        .map(|(o, p)| (*o, p.clone()))
        .collect();
    let offsets: Vec<u64> = got.iter().map(|m| m.0).collect();
    let want: Vec<u64> = expected.iter().map(|m| m.0).collect();
    assert_eq!(offsets, want, "every message once, in order");
    assert_eq!(got, expected.as_slice(), "payloads as published");
}

async fn publish_range(
    broker: &dyn Broker,
    channel: &str,
    n: usize,
    log: &mut BTreeMap<u64, Bytes>,
) {
    for i in 0..n {
        let payload = Bytes::from(format!("{channel} #{i} {}", "x".repeat(i % 7)));
        let sent = broker.publish(channel, payload.clone()).await.unwrap();
        log.insert(sent.offset, payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_subscribers_on_every_instance() {
    let broker = memory_broker().await;
    let (a, _ta) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("a"), None)).await;
    let (b, _tb) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("b"), None)).await;
    let mut on_a = client(&[a], "alice");
    let mut on_b = client(&[b], "bob");
    subscribed(&mut on_a, "room.1").await;
    subscribed(&mut on_b, "room.1").await;
    let mut log = BTreeMap::new();
    publish_range(&*broker, "room.1", 50, &mut log).await;
    assert_exact(&messages_until(&mut on_a, "room.1", 50).await, &log, 1);
    assert_exact(&messages_until(&mut on_b, "room.1", 50).await, &log, 1);
    // A binary payload goes through as base64 and comes back as bytes.
    let sent = broker
        .publish("room.1", Bytes::from_static(&[0, 0xff, 7]))
        .await
        .unwrap();
    log.insert(sent.offset, Bytes::from_static(&[0, 0xff, 7]));
    assert_exact(&messages_until(&mut on_a, "room.1", 51).await, &log, 51);
}

/// A client that reconnects to another instance resumes exactly after the
/// last offset it saw — messages published while it was away included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_instance_gets_exactly_the_gap() {
    let broker = memory_broker().await;
    let (a, _ta) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("a"), None)).await;
    let (b, _tb) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("b"), None)).await;
    let mut log = BTreeMap::new();
    publish_range(&*broker, "room.r", 10, &mut log).await;
    let mut c = client(&[a.clone(), b.clone()], "carol");
    subscribed(&mut c, "room.r").await;
    publish_range(&*broker, "room.r", 10, &mut log).await;
    assert_exact(&messages_until(&mut c, "room.r", 20).await, &log, 11);
    let (last, epoch) = c
        .position("room.r")
        .map(|(o, e)| (o, e.to_owned()))
        .unwrap();
    assert_eq!(last, 20);

    // A fresh client (a reloaded page) resumes from a saved position on b.
    let mut again = client(&[b], "carol");
    publish_range(&*broker, "room.r", 15, &mut log).await;
    again.resume("room.r", last, &epoch).await;
    assert_exact(&messages_until(&mut again, "room.r", 35).await, &log, 21);
}

/// A position older than retention, or from another epoch, cannot be
/// resumed: the client gets a gap (its cue to reload) and then the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecoverable_positions_are_told_not_hidden() {
    let broker = open(
        BrokerConfig::new("memory://").retention(statehouse_fanout::Retention {
            max_messages: 5,
            max_age: Duration::from_secs(3600),
        }),
    )
    .await
    .unwrap();
    let (a, _ta) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("a"), None)).await;
    let mut log = BTreeMap::new();
    publish_range(&*broker, "room.g", 20, &mut log).await;
    let epoch = broker.read("room.g", 0, None, 0).await.unwrap().epoch;
    let mut c = client(std::slice::from_ref(&a), "dave");
    c.resume("room.g", 3, &epoch).await;
    let (oldest, last) = until(&mut c, Duration::from_secs(10), |e| match e {
        Event::Gap { oldest, last, .. } => Some((*oldest, *last)),
        Event::Message(m) => panic!("a message before the gap: {m:?}"),
        _ => None,
    })
    .await;
    assert_eq!((oldest, last), (16, 20));
    publish_range(&*broker, "room.g", 3, &mut log).await;
    assert_exact(&messages_until(&mut c, "room.g", 23).await, &log, 21);

    let mut other = client(&[a], "erin");
    other.resume("room.g", 2, "not-this-epoch").await;
    until(&mut other, Duration::from_secs(10), |e| {
        matches!(e, Event::Gap { .. }).then_some(())
    })
    .await;
}

/// Draining tells every client to go elsewhere (1012); they resume there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_clients_without_losing_a_message() {
    let broker = memory_broker().await;
    let hub_a = Hub::new(broker.clone(), auth(), HubConfig::new("a"), None);
    let (a, _ta) = serve(hub_a.clone()).await;
    let (b, _tb) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("b"), None)).await;
    let mut c = client(&[a.clone(), b], "frank");
    subscribed(&mut c, "room.d").await;
    let mut log = BTreeMap::new();
    publish_range(&*broker, "room.d", 10, &mut log).await;
    let mut got = messages_until(&mut c, "room.d", 10).await;
    hub_a.drain();
    publish_range(&*broker, "room.d", 10, &mut log).await;
    let code = until(&mut c, Duration::from_secs(10), |e| match e {
        Event::Disconnected { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(code, Some(close::RECONNECT));
    let instance = until(&mut c, Duration::from_secs(10), |e| match e {
        Event::Connected { instance, .. } => Some(instance.clone()),
        _ => None,
    })
    .await;
    assert_eq!(instance, "b");
    got.extend(messages_until(&mut c, "room.d", 20).await);
    assert_exact(&got, &log, 1);
    // A draining instance refuses new connections.
    let refused = tokio_tungstenite::connect_async(a).await;
    assert!(refused.is_err(), "a draining hub accepts no new client");
}

/// The opening handshake is checked before anything is upgraded: a request
/// that is not a version-13 WebSocket handshake gets a 4xx with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (url, _t) = serve_on_memory().await;
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_string();
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        ("plain GET", String::new(), "400"),
        (
            "no Upgrade header",
            format!("Connection: upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n"),
            "400",
        ),
        (
            "no key",
            format!("{upgrade}Sec-WebSocket-Version: 13\r\n"),
            "400",
        ),
        (
            "version 8",
            format!("{upgrade}{key}Sec-WebSocket-Version: 8\r\n"),
            "426",
        ),
        ("no version", format!("{upgrade}{key}"), "426"),
        (
            "good",
            format!("{upgrade}{key}Sec-WebSocket-Version: 13\r\n"),
            "101",
        ),
    ];
    for (name, headers, want) in cases {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head))
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer"))
            .unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_string();
        let status = head.split(' ').nth(1).unwrap_or_default();
        assert_eq!(status, want, "{name}: {head}");
        if want == "426" {
            assert!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-version: 13"),
                "{name}: {head}"
            );
        }
        if want == "101" {
            // RFC 6455's own example key and answer.
            assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        }
    }
}

/// A service client may present its token in the upgrade request's
/// `Authorization` header instead of in `hello`: the authenticator sees the
/// request's headers (copied, so the request's buffers are freed at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_header_authenticates() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (url, _t) = serve_on_memory().await;
    let first_reply = |bearer: String| {
        let url = url.clone();
        async move {
            let mut request = url.into_client_request().unwrap();
            request
                .headers_mut()
                .insert("authorization", bearer.parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
            ws.send(WsMessage::text(r#"{"op":"hello"}"#)).await.unwrap();
            match ws.next().await {
                Some(Ok(WsMessage::Text(text))) => text.to_string(),
                Some(Ok(WsMessage::Close(Some(close)))) => {
                    format!("close {}", u16::from(close.code))
                }
                other => format!("{other:?}"),
            }
        }
    };
    let welcome = first_reply(format!("Bearer {}", token("nia"))).await;
    assert!(welcome.contains("welcome"), "{welcome}");
    let refused = first_reply("Bearer not-a-token".into()).await;
    assert_eq!(refused, format!("close {}", close::UNAUTHORIZED));
}

/// One hub-wide timer pings every connection: a peer that answers stays, a
/// peer that stopped reading (no pongs) is dropped within two intervals,
/// and a token that expired is closed with 4401 at the next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_live_peers_and_drop_dead_ones() {
    let mut config = HubConfig::new("a");
    config.ping_interval = Duration::from_millis(200);
    let hub = Hub::new(memory_broker().await, auth(), config, None);
    let (url, _t) = serve(hub.clone()).await;
    let hello = |t: &str| WsMessage::text(format!(r#"{{"op":"hello","token":"{t}"}}"#));
    let connections = |want: u64| {
        let hub = hub.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while hub.stats().connections != want {
                assert!(Instant::now() < deadline, "never {want} connections");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Reads until the connection ends: the close code, if any, and the
    // pings seen.
    async fn until_close(
        mut ws: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> (Option<u16>, usize) {
        let mut pings = 0;
        while let Some(Ok(frame)) = ws.next().await {
            match frame {
                WsMessage::Ping(_) => pings += 1,
                WsMessage::Close(close) => return (close.map(|c| u16::from(c.code)), pings),
                _ => {}
            }
        }
        (None, pings)
    }
    // Live: reads (and so answers pings) the whole time.
    let (mut live, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    live.send(hello(&token("kim"))).await.unwrap();
    let live = tokio::spawn(until_close(live));
    // Dead: says hello, then reads nothing (no pong goes back) until the
    // hub has given up on it.
    let (mut dead, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    dead.send(hello(&token("lee"))).await.unwrap();
    connections(2).await;
    connections(1).await;
    let (code, pings) = tokio::time::timeout(Duration::from_secs(5), until_close(dead))
        .await
        .expect("the hub closed the silent peer's socket");
    assert_eq!(code, None, "a dead peer is dropped, not talked to");
    assert!(pings >= 1, "it was pinged before it was dropped");
    // A token with two seconds left is closed with 4401 at a tick after.
    let expiring = TokenIssuer::new(
        ring(),
        IssuerConfig::new(ISSUER, AUDIENCE).access_lifetime(Duration::from_secs(2)),
    )
    .unwrap()
    .issue_access("mo", Default::default())
    .unwrap()
    .0;
    let (mut short, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    short.send(hello(&expiring)).await.unwrap();
    let (code, pings) = tokio::time::timeout(Duration::from_secs(10), until_close(short))
        .await
        .expect("the expired token's connection was closed");
    assert_eq!(
        code,
        Some(close::UNAUTHORIZED),
        "expired token closed with 4401"
    );
    assert!(pings >= 1, "pinged until it expired ({pings})");
    // All the while the live peer was pinged and kept.
    connections(1).await;
    assert!(!live.is_finished(), "the live peer stays connected");
    live.abort();
}

/// A client that stops reading is cut (4408) once its queue is full, not
/// allowed to hold the hub's memory; it resumes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_are_cut_and_resume() {
    let broker = open(BrokerConfig::new("memory://").max_payload_bytes(256 * 1024))
        .await
        .unwrap();
    let mut config = HubConfig::new("a");
    config.queue = 4;
    let hub = Hub::new(broker.clone(), auth(), config, None);
    let (a, _ta) = serve(hub.clone()).await;
    let mut c = client(&[a], "gina");
    subscribed(&mut c, "room.s").await;
    // Enough to fill the socket buffers while the client does not read.
    let mut log = BTreeMap::new();
    for i in 0..400u32 {
        let payload = Bytes::from(format!("{i:06}{}", "y".repeat(200 * 1024)));
        let sent = broker.publish("room.s", payload.clone()).await.unwrap();
        log.insert(sent.offset, payload);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while hub.stats().slow_consumers_cut == 0 {
        assert!(Instant::now() < deadline, "the slow client was never cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = Vec::new();
    let mut codes = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while got.last().map_or(0, |m: &(u64, Bytes)| m.0) < 400 {
            match c.next().await.unwrap() {
                Event::Message(m) => got.push((m.offset, m.payload)),
                Event::Disconnected { code, .. } => codes.push(code),
                _ => {}
            }
        }
    })
    .await
    .expect("the slow client caught up");
    assert!(codes.contains(&Some(close::SLOW_CONSUMER)), "{codes:?}");
    assert_exact(&got, &log, 1);
}

/// Malformed frames, unknown or forbidden channels, oversized frames and
/// missing, forged or expired tokens each end the connection with their own
/// code and a reason — and the hub goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_with_clear_codes() {
    let broker = memory_broker().await;
    let mut config = HubConfig::new("a");
    config.max_subscriptions = 3;
    config.hello_timeout = Duration::from_millis(500);
    let (url, _t) = serve(Hub::new(broker.clone(), auth(), config, None)).await;
    let hello = |t: &str| format!(r#"{{"op":"hello","token":"{t}"}}"#);
    let expired = {
        let issuer = TokenIssuer::new(ring(), IssuerConfig::new(ISSUER, AUDIENCE)).unwrap();
        issuer
            .issue_access_at("old", Default::default(), 1_000_000)
            .unwrap()
            .0
    };
    let forged = {
        let other = KeyRing::new()
            .with_key(Key::hmac("k1", &[7u8; 32]).unwrap())
            .unwrap();
        TokenIssuer::new(other, IssuerConfig::new(ISSUER, AUDIENCE))
            .unwrap()
            .issue_access("mallory", Default::default())
            .unwrap()
            .0
    };
    let ok = token("henry");
    let sub = |ch: &str| format!(r#"{{"op":"sub","ch":"{ch}"}}"#);
    let cases: Vec<(&str, Vec<WsMessage>, u16)> = vec![
        (
            "garbage first frame",
            vec![WsMessage::text("{{{")],
            close::BAD_FRAME,
        ),
        (
            "binary first frame",
            vec![WsMessage::binary(vec![1, 2])],
            close::BAD_FRAME,
        ),
        (
            "sub before hello",
            vec![WsMessage::text(sub("room.1"))],
            close::BAD_FRAME,
        ),
        (
            "no token",
            vec![WsMessage::text(r#"{"op":"hello"}"#)],
            close::UNAUTHORIZED,
        ),
        (
            "not a JWT",
            vec![WsMessage::text(hello("abc"))],
            close::UNAUTHORIZED,
        ),
        (
            "forged",
            vec![WsMessage::text(hello(&forged))],
            close::UNAUTHORIZED,
        ),
        (
            "expired",
            vec![WsMessage::text(hello(&expired))],
            close::UNAUTHORIZED,
        ),
        ("silence", vec![], close::UNAUTHORIZED),
        (
            "unknown op",
            vec![
                WsMessage::text(hello(&ok)),
                WsMessage::text(r#"{"op":"pub","ch":"a"}"#),
            ],
            close::BAD_FRAME,
        ),
        (
            "invalid channel name",
            vec![WsMessage::text(hello(&ok)), WsMessage::text(sub("a b"))],
            close::BAD_FRAME,
        ),
        (
            "someone else's channel",
            vec![
                WsMessage::text(hello(&ok)),
                WsMessage::text(sub("user.ivy")),
            ],
            close::FORBIDDEN,
        ),
        (
            "negative offset",
            vec![
                WsMessage::text(hello(&ok)),
                WsMessage::text(r#"{"op":"sub","ch":"room.1","after":-3}"#),
            ],
            close::BAD_FRAME,
        ),
        (
            "too many subscriptions",
            vec![
                WsMessage::text(hello(&ok)),
                WsMessage::text(sub("room.1")),
                WsMessage::text(sub("room.2")),
                WsMessage::text(sub("user.henry")),
                WsMessage::text(sub("room.4")),
            ],
            close::TOO_MANY_SUBSCRIPTIONS,
        ),
        (
            "oversized frame",
            vec![
                WsMessage::text(hello(&ok)),
                WsMessage::text("x".repeat(64 * 1024)),
            ],
            close::TOO_BIG,
        ),
        (
            "binary after hello",
            vec![WsMessage::text(hello(&ok)), WsMessage::binary(vec![0; 8])],
            close::BAD_FRAME,
        ),
    ];
    for (name, frames, want) in cases {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        for frame in frames {
            if ws.send(frame).await.is_err() {
                break;
            }
        }
        let code = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(frame)) = ws.next().await {
                if let WsMessage::Close(close) = frame {
                    return close.map(|c| (u16::from(c.code), c.reason.to_string()));
                }
            }
            None
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: no close in time"));
        let (code, reason) = code.unwrap_or_else(|| panic!("{name}: closed without a code"));
        assert_eq!(code, want, "{name}: {reason}");
        assert!(!reason.is_empty(), "{name}: a reason is given");
    }
    // The library reports refusals as errors, not as reconnect loops.
    let mut refused = Client::new(ClientConfig::new([url.clone()]).token(forged));
    refused.subscribe("room.1").await;
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = refused.next().await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                code: close::UNAUTHORIZED,
                ..
            }
        ),
        "{err}"
    );
    // And the hub still serves.
    let mut fine = client(&[url], "henry");
    subscribed(&mut fine, "user.henry").await;
}

// ---- real processes ----------------------------------------------------

/// The hub as its own process, when started by a test below (the variables
/// name the broker and where to write the port); in a normal run it does
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_process() {
    let Ok(broker_url) = std::env::var("STATEHOUSE_HUB_BROKER") else {
        return;
    };
    let port_file = std::env::var("STATEHOUSE_HUB_PORT_FILE").unwrap();
    let instance = std::env::var("STATEHOUSE_HUB_INSTANCE").unwrap();
    let broker = open(BrokerConfig::new(broker_url)).await.unwrap();
    let presence = match std::env::var("STATEHOUSE_HUB_PRESENCE") {
        Ok(url) => Some(
            statehouse_store::open(
                statehouse_store::StoreConfig::new(url)
                    .prefix(std::env::var("STATEHOUSE_HUB_PRESENCE_PREFIX").unwrap_or_default()),
            )
            .await
            .unwrap(),
        ),
        Err(_) => None,
    };
    let mut config = HubConfig::new(instance);
    config.presence_ttl = Duration::from_millis(1500);
    let hub = Hub::new(broker, auth(), config, presence);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app: axum::Router = hub.router("/ws");
    std::fs::write(format!("{port_file}.tmp"), port.to_string()).unwrap();
    std::fs::rename(format!("{port_file}.tmp"), &port_file).unwrap();
    axum::serve(listener, app).await.unwrap();
}

/// A hub process; killed (SIGKILL) when dropped.
struct HubProcess {
    child: tokio::process::Child,
    url: String,
}

async fn spawn_hub(
    dir: &Path,
    instance: &str,
    broker: &str,
    presence: Option<(&str, &str)>,
) -> HubProcess {
    let port_file = dir.join(format!("{instance}.port"));
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "hub_process",
            "--test-threads",
            "1",
            "--nocapture",
        ])
        .env("STATEHOUSE_HUB_BROKER", broker)
        .env("STATEHOUSE_HUB_PORT_FILE", &port_file)
        .env("STATEHOUSE_HUB_INSTANCE", instance)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some((url, prefix)) = presence {
        command
            .env("STATEHOUSE_HUB_PRESENCE", url)
            .env("STATEHOUSE_HUB_PRESENCE_PREFIX", prefix);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(port) = std::fs::read_to_string(&port_file) {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            return HubProcess {
                child,
                url: format!("ws://{addr}/ws"),
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("hub {instance} exited at startup: {status}");
        }
        assert!(Instant::now() < deadline, "hub {instance} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one client of the kill test saw.
#[derive(Debug, Default)]
struct Seen {
    messages: Vec<(u64, Bytes)>,
    gaps: usize,
    connects: u64,
}

/// 3 hub processes, 1,000 clients over 10 channels, publishers at a fixed
/// rate; one hub is killed with SIGKILL a third of the way through. Every
/// client must end with exactly its channel's published log: nothing lost,
/// nothing twice, in order.
async fn kill_one_of_three(broker_url: &str) {
    const CLIENTS: usize = 1000;
    const CHANNELS: usize = 10;
    const PER_CHANNEL: usize = 100;
    const RATE_PER_CHANNEL: u64 = 25; // messages per second: 250/s in all

    let dir = tempfile::tempdir().unwrap();
    let mut hubs = Vec::new();
    for i in 0..3 {
        hubs.push(spawn_hub(dir.path(), &format!("hub-{i}"), broker_url, None).await);
    }
    let urls: Vec<String> = hubs.iter().map(|h| h.url.clone()).collect();
    let broker = open(BrokerConfig::new(broker_url)).await.unwrap();

    // Every client subscribes before the first publish.
    let (target_tx, target_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(CLIENTS);
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let urls = urls.clone();
        let channel = format!("room.{}", i % CHANNELS);
        let mut target_rx = target_rx.clone();
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut client =
                Client::new(ClientConfig::new(urls).token(token(&format!("user-{i}"))))
                    .start_at(i % 3);
            let mut seen = Seen::default();
            client.subscribe(&channel).await;
            loop {
                let target = target_rx.borrow().clone();
                if let Some(target) = target
                    && seen.messages.last().map_or(0, |m| m.0) >= target[i % CHANNELS]
                {
                    break;
                }
                tokio::select! {
                    event = client.next() => match event.expect("client refused") {
                        Event::Subscribed { .. } => { let _ = ready.send(()).await; }
                        Event::Message(m) => seen.messages.push((m.offset, m.payload)),
                        Event::Gap { .. } => seen.gaps += 1,
                        _ => {}
                    },
                    _ = target_rx.changed() => {}
                }
            }
            seen.connects = client.connects();
            seen
        }));
    }
    drop(ready_tx);
    for _ in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .expect("every client subscribed")
            .unwrap();
    }

    let started = Instant::now();
    let mut publishers = Vec::new();
    for ch in 0..CHANNELS {
        let broker = broker.clone();
        publishers.push(tokio::spawn(async move {
            let channel = format!("room.{ch}");
            let mut log = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_CHANNEL));
            for i in 0..PER_CHANNEL {
                tick.tick().await;
                let payload = Bytes::from(format!("{channel}/{i}"));
                let sent = broker.publish(&channel, payload.clone()).await.unwrap();
                log.insert(sent.offset, payload);
            }
            log
        }));
    }
    // A third of the way through, hub-0 dies without a word.
    let run = Duration::from_millis(PER_CHANNEL as u64 * 1000 / RATE_PER_CHANNEL);
    tokio::time::sleep(run / 3).await;
    let mut killed = hubs.remove(0);
    killed.child.start_kill().unwrap();
    killed.child.wait().await.unwrap();

    let mut logs = Vec::new();
    for p in publishers {
        logs.push(p.await.unwrap());
    }
    let targets: Vec<u64> = logs.iter().map(|l| *l.keys().last().unwrap()).collect();
    target_tx.send_replace(Some(Arc::new(targets)));
    let mut reconnected = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap_or_else(|_| panic!("client {i} did not get everything in time"))
            .unwrap();
        assert_eq!(seen.gaps, 0, "client {i}: no gap");
        assert_exact(&seen.messages, &logs[i % CHANNELS], 1);
        if seen.connects > 1 {
            reconnected += 1;
        }
    }
    assert!(
        reconnected >= CLIENTS / 3 - 1,
        "hub-0's third of the clients reconnected ({reconnected})"
    );
    eprintln!(
        "{broker_url}: {CLIENTS} clients, {} messages each, {reconnected} reconnected, 0 lost, 0 duplicated, in {:?}",
        PER_CHANNEL,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_of_three_hubs_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fanout.db").display());
    kill_one_of_three(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_of_three_hubs_redis() {
    let redis = RedisServer::start().unwrap();
    kill_one_of_three(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_of_three_hubs_nats() {
    let nats = statehouse_testkit::Nats::start().unwrap();
    kill_one_of_three(&nats.url()).await;
}

/// Presence lives in the store: a member shows on every instance, and a
/// killed instance's members disappear within the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_outlives_no_dead_instance() {
    let redis = shared_redis();
    let prefix = unique_prefix("presence");
    let broker_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let mut dying = spawn_hub(
        dir.path(),
        "dying",
        &broker_url,
        Some((&broker_url, &prefix)),
    )
    .await;
    let store =
        statehouse_store::open(statehouse_store::StoreConfig::new(&broker_url).prefix(&prefix))
            .await
            .unwrap();
    let broker = open(BrokerConfig::new(&broker_url)).await.unwrap();
    let mut config = HubConfig::new("here");
    config.presence_ttl = Duration::from_millis(1500);
    let (here, _t) = serve(Hub::new(broker, auth(), config, Some(store))).await;

    let mut far = client(&[dying.url.clone()], "kim");
    subscribed(&mut far, "room.p").await;
    let mut near = client(&[here], "lee");
    subscribed(&mut near, "room.p").await;
    near.presence("room.p").await;
    let members = until(&mut near, Duration::from_secs(5), |e| match e {
        Event::Presence { members, .. } => Some(members.clone()),
        _ => None,
    })
    .await;
    assert_eq!(members, ["kim", "lee"]);

    dying.child.start_kill().unwrap();
    dying.child.wait().await.unwrap();
    drop(far);
    let killed_at = Instant::now();
    loop {
        near.presence("room.p").await;
        let members = until(&mut near, Duration::from_secs(5), |e| match e {
            Event::Presence { members, .. } => Some(members.clone()),
            _ => None,
        })
        .await;
        if members == ["lee"] {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_millis(1500 + 1000),
            "the dead instance's member is still listed: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The broker cut off for 3 s through a fault proxy: publishes during the
/// cut fail (none is acknowledged and then lost), subscribers stay
/// connected or come back, and afterwards they have every acknowledged
/// message exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_no_acknowledged_message_redis() {
    let redis = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    broker_outage(&proxy, &format!("redis://{}", proxy.addr())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_no_acknowledged_message_nats() {
    let nats = statehouse_testkit::Nats::start().unwrap();
    let proxy = FaultProxy::start(nats.addr()).await.unwrap();
    broker_outage(&proxy, &format!("nats://{}", proxy.addr())).await;
}

async fn broker_outage(proxy: &FaultProxy, via_proxy: &str) {
    let broker = open(BrokerConfig::new(via_proxy)).await.unwrap();
    let (a, _ta) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("a"), None)).await;
    let (b, _tb) = serve(Hub::new(broker.clone(), auth(), HubConfig::new("b"), None)).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = client(&[a.clone(), b.clone()], &format!("u{i}")).start_at(i % 2);
        subscribed(&mut c, "room.cut").await;
        clients.push(c);
    }
    let (acked, failed) = {
        let broker = broker.clone();
        let publisher = tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let mut failed = 0;
            for i in 0..400 {
                let payload = Bytes::from(format!("m{i}"));
                match broker.publish("room.cut", payload.clone()).await {
                    Ok(sent) => {
                        acked.insert(sent.offset, payload);
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (acked, failed)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.heal();
        publisher.await.unwrap()
    };
    assert!(failed > 0, "publishes during the cut must fail loudly");
    let last = *acked.keys().last().unwrap();
    let log = broker.read("room.cut", 0, None, 10_000).await.unwrap();
    for (offset, payload) in &acked {
        let kept = log.messages.iter().find(|m| m.offset == *offset);
        assert_eq!(
            kept.map(|m| &m.payload),
            Some(payload),
            "acknowledged #{offset} is in the log"
        );
    }
    let everything: BTreeMap<u64, Bytes> = log
        .messages
        .iter()
        .map(|m| (m.offset, m.payload.clone()))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let got = messages_until(c, "room.cut", last).await;
        assert_exact(&got, &everything, 1);
        assert!(got.len() >= acked.len(), "client {i}");
    }
}
