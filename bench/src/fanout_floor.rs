//! The floor side of `fanout-bench`: the least a fan-out server can do on
//! this machine, to tell how much of a side's latency is its own.
//!
//! `bench-hub floor PORT REDIS_URL` accepts WebSocket connections, answers
//! the hub's `hello` and `sub` with a `subscribed` frame (it checks neither),
//! and subscribes to the Redis pub/sub channel `bench`. Each published
//! message is framed once and written to every connection with one
//! non-blocking `write` from the task that received it: no per-connection
//! task, queue, buffer, authentication, offsets, retention, ping or
//! slow-consumer policy — none of what a real server owes its clients. What
//! is left is the part no server can avoid: a system call (and the kernel's
//! loopback send path) per delivery, on two cores shared with the load
//! client. A write that would block or goes out short drops that delivery
//! (counted as lost by the bench; at the rates this side is run at, socket
//! buffers never fill).
//!
//! `bench-hub floor-publish REDIS_URL RATE SECONDS SIZE FIRST_SEQ` is its
//! publisher: `PUBLISH bench payload`, paced like the hub's.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::BoxError;
use crate::fanout::{encode_frame, parse_frame};

const CHANNEL: &str = "bench";
/// The text frame opcode.
const TEXT: u8 = 1;
/// The most a request head or the two opening frames may take.
const MAX_OPENING: usize = 16 * 1024;

/// Connections past their opening, written to in place.
type Connections = Arc<Mutex<Vec<std::net::TcpStream>>>;

/// Serves until the process is killed.
pub async fn serve(port: u16, redis_url: &str) -> Result<(), BoxError> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let connections = Connections::default();
    let client = redis::Client::open(redis_url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANNEL).await?;
    let accepting = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let connections = Arc::clone(&accepting);
                    tokio::spawn(async move {
                        if let Err(e) = open(stream, &connections).await {
                            eprintln!("floor: a connection failed to open: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("floor: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    println!("listening {port}");
    let mut messages = pubsub.on_message();
    let mut offset = 0u64;
    let mut dropped = 0u64;
    while let Some(message) = messages.next().await {
        offset += 1;
        let payload = std::str::from_utf8(message.get_payload_bytes())?;
        let text = format!(
            r#"{{"t":"msg","ch":"{CHANNEL}","off":{offset},"ep":"floor","data":"{payload}"}}"#
        );
        let frame = encode_frame(TEXT, text.as_bytes(), false);
        let mut connections = connections.lock().map_err(|_| "connections poisoned")?;
        connections.retain(|stream| match (&*stream).write(&frame) {
            Ok(n) if n == frame.len() => true,
            Ok(_) => {
                // Part of a frame went out: the connection's stream is broken.
                dropped += 1;
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dropped += 1;
                true
            }
            // The client went away.
            Err(_) => false,
        });
        if dropped > 0 && offset.is_multiple_of(1000) {
            eprintln!("floor: {dropped} deliveries dropped so far");
        }
    }
    Err("the Redis subscription ended".into())
}

/// The upgrade handshake, then the client's `hello` and `sub` frames,
/// answered with `subscribed`; the connection then joins `connections`.
async fn open(mut stream: TcpStream, connections: &Connections) -> Result<(), BoxError> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_more(&mut stream, &mut buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let key = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim())
        })
        .ok_or("no Sec-WebSocket-Key")?;
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(response.as_bytes()).await?;
    buf.drain(..head_end);
    for _ in 0..2 {
        let len = loop {
            if let Some((_, payload)) = parse_frame(&buf) {
                break payload.end;
            }
            read_more(&mut stream, &mut buf).await?;
        };
        buf.drain(..len);
    }
    let subscribed = format!(r#"{{"t":"subscribed","ch":"{CHANNEL}","off":0,"ep":"floor"}}"#);
    stream
        .write_all(&encode_frame(TEXT, subscribed.as_bytes(), false))
        .await?;
    let stream = stream.into_std()?;
    connections
        .lock()
        .map_err(|_| "connections poisoned")?
        .push(stream);
    Ok(())
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), BoxError> {
    if buf.len() >= MAX_OPENING {
        return Err("opening too long".into());
    }
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err("closed while opening".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The floor's publisher: `rate` messages a second into the pub/sub channel
/// for `duration`, paced as the hub's publisher is; returns the last
/// sequence number.
pub async fn publish(
    redis_url: &str,
    rate: u64,
    duration: Duration,
    size: usize,
    first: u64,
) -> Result<u64, BoxError> {
    let client = redis::Client::open(redis_url)?;
    let conn = client.get_multiplexed_async_connection().await?;
    crate::fanout::paced(rate, duration, size, first, |batch: Vec<Bytes>| {
        let mut pipe = redis::pipe();
        for payload in &batch {
            pipe.cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(payload.as_ref())
                .ignore();
        }
        let mut conn = conn.clone();
        async move {
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        }
    })
    .await
}
