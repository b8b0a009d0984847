//! Test harness: real backend processes (`lb-test-backend`) on free loopback ports, a balancer
//! run in-process on 127.0.0.1:0, and small clients. Nothing leaves 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use statehouse_lb::LbConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One `lb-test-backend` process; SIGKILLed on drop.
pub struct Backend {
    pub name: String,
    pub port: u16,
    child: Option<Child>,
}

impl Backend {
    pub fn start(name: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lb-test-backend"))
            .arg(name)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lb-test-backend");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the port line");
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from backend: {line:?}"));
        Self {
            name: name.to_owned(),
            port,
            child: Some(child),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `kill -9`, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the backend");
            c.wait().expect("reap the backend");
        }
    }

    /// Requests this backend received, per `"METHOD /path"`.
    pub async fn stats(&self) -> HashMap<String, u64> {
        let (_, _, body) = http_get(&format!("http://{}/stats", self.addr()), &[])
            .await
            .expect("stats");
        serde_json::from_slice(&body).expect("stats json")
    }

    pub async fn count(&self, key: &str) -> u64 {
        self.stats().await.get(key).copied().unwrap_or(0)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A balancer running in this process.
pub struct Lb {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), statehouse_lb::LbError>>>,
}

impl Lb {
    /// Starts a balancer with `extra` TOML (top-level keys first, then tables) in front of
    /// `backends`.
    pub async fn start(extra: &str, backends: &[&Backend]) -> Self {
        let mut toml = String::from(extra);
        for b in backends {
            toml.push_str(&format!(
                "\n[[instances]]\nname = \"{}\"\naddr = \"{}\"\n",
                b.name,
                b.addr()
            ));
        }
        let config = LbConfig::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        Self::start_with(config).await
    }

    pub async fn start_with(config: LbConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(statehouse_lb::run(listener, admin, config, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin: admin_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Triggers shutdown; returns the task to await.
    pub fn shutdown(&mut self) -> JoinHandle<Result<(), statehouse_lb::LbError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shut down once")
    }

    pub async fn instances(&self) -> Vec<serde_json::Value> {
        let (s, _, body) = http_get(&self.admin_url("/instances"), &[]).await.unwrap();
        assert_eq!(s, 200);
        serde_json::from_slice(&body).unwrap()
    }

    pub async fn instance(&self, name: &str) -> serde_json::Value {
        let (s, _, body) = http_get(&self.admin_url(&format!("/instances/{name}")), &[])
            .await
            .unwrap();
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until the instance `name` has `n` requests in flight; panics after `limit`.
    pub async fn await_in_flight(&self, name: &str, n: u64, limit: Duration, what: &str) {
        eventually(limit, what, || async {
            self.instance(name).await["in_flight"] == n
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        let (_, _, body) = http_get(&self.admin_url("/metrics"), &[]).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The value of one metric line (`name{labels}`), 0 if absent.
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub type Answer = (u16, http::HeaderMap, Bytes);

pub async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Result<Answer, String> {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from_static(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status.as_u16(), parts.headers, body))
}

pub async fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
    request(&client(), "GET", url, headers, b"").await
}

pub async fn admin(
    lb: &Lb,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> (u16, serde_json::Value) {
    let (s, _, b) = request(&client(), method, &lb.admin_url(path), &[], body)
        .await
        .unwrap();
    (
        s,
        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
    )
}

pub fn served_by(h: &http::HeaderMap) -> String {
    h.get("x-served-by")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Sends raw bytes and reads until the server closes (or 5 s pass); the bytes received.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `cond` every 20 ms until it holds; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
