//! A tiny instance for the load balancer's integration tests (and for trying it by hand):
//!
//! ```text
//! lb-test-backend NAME [PORT]      # PORT 0 (default): any free port; prints "listening on PORT"
//! ```
//!
//! Binds 127.0.0.1 only. Routes:
//! - `GET /` — `200 NAME`, with `X-Served-By: NAME` (every response carries it);
//! - `GET /health` — 200, or 503 after `POST /health/down` (`POST /health/up` restores);
//! - `GET|POST /slow?ms=N` — answers after N ms;
//! - `POST /echo` — the request body back;
//! - `GET /headers` — the request headers as a JSON object of arrays;
//! - `GET /stats` — JSON: requests counted per `"METHOD /path"` (this route excluded);
//! - `GET /ws` — a WebSocket echo (text and binary frames back, ping answered, close echoed).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug)]
struct State {
    name: String,
    healthy: AtomicBool,
    // Held for one map update, never across an await.
    stats: Mutex<BTreeMap<String, u64>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "backend".to_owned());
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?.port());
    let state = Arc::new(State {
        name,
        healthy: AtomicBool::new(true),
        stats: Mutex::new(BTreeMap::new()),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path != "/stats" {
        let key = format!("{} {}", req.method(), path);
        *state
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }
    let query = req.uri().query().unwrap_or_default().to_owned();
    let mut resp = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => {
            if state.healthy.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "down")
            }
        }
        (Method::POST, "/health/down") => {
            state.healthy.store(false, Ordering::Relaxed);
            text(StatusCode::OK, "down")
        }
        (Method::POST, "/health/up") => {
            state.healthy.store(true, Ordering::Relaxed);
            text(StatusCode::OK, "up")
        }
        (_, "/slow") => {
            let ms: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            // Drain the body first, as a real handler would.
            let _ = req.body_mut().collect().await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, state.name.clone())
        }
        (Method::POST, "/echo") => match req.into_body().collect().await {
            Ok(b) => text(StatusCode::OK, b.to_bytes()),
            Err(_) => text(StatusCode::BAD_REQUEST, "body error"),
        },
        (Method::GET, "/headers") => {
            let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in req.headers() {
                map.entry(k.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            text(StatusCode::OK, serde_json::to_vec(&map).unwrap_or_default())
        }
        (Method::GET, "/stats") => {
            let stats = state
                .stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            text(
                StatusCode::OK,
                serde_json::to_vec(&stats).unwrap_or_default(),
            )
        }
        (Method::GET, "/ws") => websocket(&mut req),
        (Method::GET, "/") => text(StatusCode::OK, state.name.clone()),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    };
    if let Ok(v) = HeaderValue::from_str(&state.name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    Ok(resp)
}

/// The RFC 6455 handshake, then an echo task on the upgraded connection.
fn websocket(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a websocket handshake");
    };
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let _ = echo_frames(TokioIo::new(upgraded)).await;
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    r
}

async fn echo_frames<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await?;
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await?);
        } else if len == 127 {
            len = s.read_u64().await?;
        }
        if len > 1 << 20 {
            return Ok(());
        }
        let mut mask = [0u8; 4];
        if masked {
            s.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let reply_opcode = if opcode == 0x9 { 0xA } else { opcode };
        let mut frame = vec![0x80 | reply_opcode];
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else if payload.len() <= usize::from(u16::MAX) {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            frame.push(127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        frame.extend_from_slice(&payload);
        s.write_all(&frame).await?;
        if opcode == 0x8 {
            return s.shutdown().await;
        }
    }
}
