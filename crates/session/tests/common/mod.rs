//! Shared by the session tests: a small app using every session operation,
//! and stores on each backend, on private servers started by the testkit.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use statehouse_session::{Session, SessionConfig, SessionError, SessionKeys, SessionLayer};
use statehouse_store::{Store, StoreConfig, open};
use statehouse_testkit::{shared_cluster, shared_postgres, shared_redis, unique_prefix};
use tokio::sync::Notify;

/// Lets a test hold a request inside its handler.
#[derive(Clone, Default)]
pub struct Gate {
    pub loaded: Arc<Notify>,
    pub release: Arc<Notify>,
}

pub fn keys() -> SessionKeys {
    SessionKeys::new([("test", vec![7u8; 32])]).unwrap()
}

pub fn config() -> SessionConfig {
    SessionConfig::new(keys())
}

/// The app every session test drives.
pub fn app(store: Store, config: SessionConfig, gate: Gate) -> Router {
    Router::new()
        .route("/noop", get(|| async { "ok" }))
        .route(
            "/get/{field}",
            get(|s: Session, Path(f): Path<String>| async move {
                let v: Option<serde_json::Value> = s.get(&f).await?;
                Ok::<_, SessionError>(Json(v))
            }),
        )
        .route(
            "/set/{field}/{value}",
            post(
                |s: Session, Path((f, v)): Path<(String, String)>| async move {
                    s.insert(&f, &v)?;
                    Ok::<_, SessionError>("set")
                },
            ),
        )
        .route(
            "/big/{field}/{len}",
            post(
                |s: Session, Path((f, len)): Path<(String, usize)>| async move {
                    s.insert(&f, &"x".repeat(len))?;
                    Ok::<_, SessionError>("set")
                },
            ),
        )
        .route(
            "/incr/{field}",
            post(|s: Session, Path(f): Path<String>| async move {
                Ok::<_, SessionError>(s.increment(&f, 1).await?.to_string())
            }),
        )
        .route(
            "/update/{field}",
            post(|s: Session, Path(f): Path<String>| async move {
                let n = s
                    .update::<i64, _>(&f, |old| Some(old.unwrap_or(0) + 1))
                    .await?;
                Ok::<_, SessionError>(n.unwrap_or(0).to_string())
            }),
        )
        .route(
            "/login",
            post(|s: Session| async move {
                s.rotate_id().await?;
                s.insert("user", &"alice")?;
                Ok::<_, SessionError>("welcome")
            }),
        )
        .route(
            "/logout",
            post(|s: Session| async move {
                s.destroy().await?;
                Ok::<_, SessionError>("bye")
            }),
        )
        .route(
            "/slow-set/{field}",
            post(
                |State(gate): State<Gate>, s: Session, Path(f): Path<String>| async move {
                    // Read first, as a real handler would, then wait.
                    let _: Option<String> = s.get("user").await?;
                    gate.loaded.notify_one();
                    gate.release.notified().await;
                    s.insert(&f, &"late")?;
                    Ok::<_, SessionError>("late write")
                },
            ),
        )
        .with_state(gate)
        .layer(SessionLayer::new(store, config))
}

/// A real HTTP server for `router` on 127.0.0.1:0; returns its base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    format!("http://{addr}")
}

/// The backends every guarantee is checked on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    Sqlite,
    Redis,
    RedisCluster,
    Postgres,
}

pub fn sqlite_dir() -> &'static tempfile::TempDir {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

pub fn postgres_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| shared_postgres().create_database("sessions").unwrap())
}

/// The URL of a store on `backend`, isolated for test `tag`.
pub fn store_url(backend: Backend, tag: &str) -> String {
    match backend {
        Backend::Memory => "memory://".to_owned(),
        Backend::Sqlite => format!("sqlite://{}/{tag}.db", sqlite_dir().path().display()),
        Backend::Redis => shared_redis().url(),
        Backend::RedisCluster => {
            let hosts: Vec<String> = shared_cluster()
                .urls()
                .iter()
                .map(|u| u.trim_start_matches("redis://").to_owned())
                .collect();
            format!("redis+cluster://{}", hosts.join(","))
        }
        Backend::Postgres => postgres_url().to_owned(),
    }
}

/// Opens a store handle; call twice with the same `prefix` for two
/// instances sharing one store.
pub async fn open_store(backend: Backend, tag: &str, prefix: &str) -> Store {
    let url = store_url(backend, tag);
    // Functional tests on a debug build with two servers, a client and the
    // store sharing two cores: allow slow calls; timeouts are tested in the
    // store crate.
    let policy = statehouse_store::Policy::fail_closed().with_timeout(Duration::from_secs(10));
    open(
        StoreConfig::new(url)
            .prefix(prefix.to_owned())
            .policy(policy),
    )
    .await
    .unwrap_or_else(|e| panic!("open {backend:?}: {e}"))
}

pub fn prefix(tag: &str) -> String {
    unique_prefix(tag)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The `name=value` part of a response's session Set-Cookie, if any.
pub fn session_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("sh_session="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}
