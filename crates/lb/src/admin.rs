//! The admin API, on its own listener (loopback by default; a bearer token is required
//! otherwise, and on every request whenever one is configured).
//!
//! The routes are listed in the crate documentation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{InstanceConfig, LbConfig, parse_duration};
use crate::discovery::{Backend, SetError};
use crate::proxy::Proxy;

const MAX_BODY: usize = 64 * 1024;
const MAX_WAIT: Duration = Duration::from_secs(300);

pub(crate) async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: Arc<LbConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let token: Option<Arc<str>> = config.admin.token.as_deref().map(Arc::from);
    loop {
        let (stream, _) = tokio::select! {
            () = crate::until_set(&mut shutdown) => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (proxy, token, mut shutdown) = (Arc::clone(&proxy), token.clone(), shutdown.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (proxy, token) = (Arc::clone(&proxy), token.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(handle(&proxy, token.as_deref(), req).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = crate::until_set(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": msg.to_string() }))
}

fn describe(b: &Backend) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "name": b.name(),
        "addr": b.addr(),
        "healthy": b.is_healthy(),
        "ejected": b.is_ejected(),
        "draining": b.is_draining(),
        "in_flight": b.in_flight(),
        "drained": b.is_draining() && b.in_flight() == 0,
        "requests": b.metrics.requests.load(Relaxed),
        "errors": b.metrics.errors.load(Relaxed),
    })
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn handle(
    proxy: &Proxy,
    token: Option<&str>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if let Some(expected) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !token_matches(given, expected.as_bytes()) {
            let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    let set = &proxy.set;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["health"]) => json_response(StatusCode::OK, &json!("ok")),
        (Method::GET, ["metrics"]) => {
            let text = crate::metrics::render(&proxy.metrics, &set.backends());
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Method::GET, ["instances"]) => {
            let list: Vec<_> = set.backends().iter().map(|b| describe(b)).collect();
            json_response(StatusCode::OK, &serde_json::Value::Array(list))
        }
        (Method::POST, ["instances"]) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
            };
            let inst: InstanceConfig = match serde_json::from_slice(&body) {
                Ok(i) => i,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("expected {{\"name\", \"addr\"}}: {e}"),
                    );
                }
            };
            match set.add(&inst) {
                Ok(b) => {
                    tracing::info!(instance = b.name(), addr = b.addr(), "instance added");
                    json_response(StatusCode::CREATED, &describe(&b))
                }
                Err(e @ SetError::Exists(_)) => error(StatusCode::CONFLICT, e),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (method, ["instances", name, rest @ ..]) => {
            let Some(b) = set.get(name) else {
                return error(
                    StatusCode::NOT_FOUND,
                    SetError::NotFound((*name).to_owned()),
                );
            };
            match (method, rest) {
                (Method::GET, []) => json_response(StatusCode::OK, &describe(&b)),
                (Method::DELETE, []) => match set.remove(name) {
                    Ok(b) => {
                        tracing::info!(instance = b.name(), "instance removed");
                        json_response(StatusCode::OK, &describe(&b))
                    }
                    Err(e) => error(StatusCode::NOT_FOUND, e),
                },
                (Method::POST, ["drain"]) => {
                    b.set_draining(true);
                    tracing::info!(
                        instance = b.name(),
                        in_flight = b.in_flight(),
                        "instance draining"
                    );
                    let wait = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("wait="))
                        .map(parse_duration)
                        .transpose();
                    match wait {
                        Err(e) => return error(StatusCode::BAD_REQUEST, format!("wait: {e}")),
                        Ok(Some(w)) => {
                            let _ = tokio::time::timeout(w.min(MAX_WAIT), b.wait_idle()).await;
                        }
                        Ok(None) => {}
                    }
                    json_response(StatusCode::OK, &describe(&b))
                }
                (Method::POST, ["undrain"]) => {
                    b.set_draining(false);
                    tracing::info!(instance = b.name(), "instance back in rotation");
                    json_response(StatusCode::OK, &describe(&b))
                }
                _ => error(StatusCode::NOT_FOUND, "no such admin route"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin route"),
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }
}
