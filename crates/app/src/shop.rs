//! The shop's HTTP surface: one axum `Router`, stateless by construction.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the shop page |
//! | `GET /healthz`, `GET /readyz` | alive; ready (503 while draining) |
//! | `GET /internal/stats` | recent requests and active visitors, for the dashboard (bearer token; 404 otherwise) |
//! | `GET /api/catalog` | the products |
//! | `POST /api/signup`, `POST /api/login` `{"email","password"}` | sign up / log in (new session id) |
//! | `POST /api/logout` | ends the session |
//! | `GET /api/me` | the user, the cart, and who served it |
//! | `PUT /api/cart/{item}` `{"qty": n}` | one cart line (0 removes it) |
//! | `POST /api/checkout` + `Idempotency-Key` | a durable order, once per key |
//! | `GET /api/orders` | the user's orders and their status |
//! | `GET /api/live` | a live token for the user's order channel (with `--broker`) |
//! | `GET /ws` | the WebSocket hub: order status live, resumable on any instance ([`crate::live`]) |
//! | `PUT /api/avatar`, `GET /api/avatar` | the user's picture, in the object store |
//!
//! Every response carries `X-Served-By`. A state-changing request must come
//! from the shop's own origin (`Origin` equal to `Host`; SameSite=Lax
//! cookies are the other half of the CSRF defence).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::json;
use statehouse_session::{SessionConfig, SessionKeys, SessionLayer};
use statehouse_store::StoreConfig;
use tracing::Instrument;

use crate::arch::Arch;
use crate::db::{Db, Placed, User};
use crate::error::AppError;
use crate::identity::{self, TokenKeys, Tokens, Visitor};
use crate::live::Live;
use crate::objects::{self, Objects};
use crate::stats::{self, Served, Stats};

/// How one instance is set up.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The name in `X-Served-By`.
    pub name: String,
    pub arch: Arch,
    /// The session store URL (`memory://`, `sqlite://...`, `redis://...`,
    /// `redis+cluster://...`, `postgres://...`); must suit `arch`.
    pub session_store: String,
    /// The durable database URL (`sqlite://...` or `postgres://...`).
    pub database: String,
    /// The object store (a directory).
    pub objects: String,
    pub session_keys: SessionKeys,
    /// The access-token and cart-cookie keys; required with `--arch token`.
    pub token_keys: Option<TokenKeys>,
    /// The bearer token for `GET /internal/stats`; without one the route is
    /// closed.
    pub admin_token: Option<String>,
    /// Session cookies without `Secure`, for plain HTTP on a developer's
    /// machine. Off unless asked for.
    pub insecure_cookies: bool,
    /// How long `/readyz` says 503 before the listener closes on shutdown,
    /// so a balancer stops sending first.
    pub drain_delay: Duration,
    /// The fan-out broker (`sqlite://…`, `redis://…`, `nats://…`): live
    /// order status over the WebSocket hub at `/ws`. `None`: no live
    /// updates (the page polls).
    pub broker: Option<String>,
    /// Signs and checks live tokens; every instance must share it.
    /// Required with `broker`.
    pub live_keys: Option<statehouse_token::KeyRing>,
}

/// Turns an instance to draining: `/readyz` answers 503 and the hub tells
/// its WebSocket clients to reconnect elsewhere.
#[derive(Debug, Clone)]
pub struct Drain {
    flag: Arc<AtomicBool>,
    hub: Option<statehouse_fanout::hub::Hub>,
}

impl Drain {
    pub fn start(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(hub) = &self.hub {
            hub.drain();
        }
    }
}

/// A product the shop sells.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Product {
    pub id: &'static str,
    pub name: &'static str,
    pub price_cents: i64,
}

/// Everything the shop sells.
pub const CATALOG: [Product; 4] = [
    Product {
        id: "tea",
        name: "Green tea",
        price_cents: 450,
    },
    Product {
        id: "mug",
        name: "Stoneware mug",
        price_cents: 1200,
    },
    Product {
        id: "beans",
        name: "Coffee beans",
        price_cents: 1599,
    },
    Product {
        id: "kettle",
        name: "Kettle",
        price_cents: 3900,
    },
];

const MAX_QTY: u32 = 99;
const MAX_JSON_BYTES: usize = 16 * 1024;

fn product(id: &str) -> Result<&'static Product, AppError> {
    CATALOG
        .iter()
        .find(|p| p.id == id)
        .ok_or_else(|| AppError::NotFound(format!("no product {id:?}")))
}

#[derive(Debug, Clone)]
struct Shop {
    name: Arc<str>,
    served_by: HeaderValue,
    db: Db,
    objects: Objects,
    draining: Arc<AtomicBool>,
    stats: Arc<Stats>,
    admin_token: Option<Arc<str>>,
    live: Option<Live>,
}

/// A JSON body that fails with the shop's error shape (400/413/415), not
/// axum's plain text.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(rejection) => Err(match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge(rejection.body_text()),
                StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                    AppError::BadRequest("send JSON with Content-Type: application/json".into())
                }
                _ => AppError::BadRequest(rejection.body_text()),
            }),
        }
    }
}

/// Builds the shop for `config`: opens the stores, applies migrations.
/// Returns the router and the switch that starts draining it.
pub async fn app(config: &ServeConfig) -> Result<(Router, Drain), AppError> {
    let scheme = config.session_store.split(':').next().unwrap_or_default();
    if !config.arch.session_schemes().contains(&scheme) {
        return Err(AppError::BadRequest(format!(
            "--arch {} keeps sessions in {}, but the session store is {:?}",
            config.arch,
            config.arch.session_schemes().join(" or "),
            crate::db::redact(&config.session_store)
        )));
    }
    let store = statehouse_store::open(StoreConfig::new(&config.session_store).prefix("shop:"))
        .await
        .map_err(|e| AppError::Unavailable(e.to_string()))?;
    let mut session_config = SessionConfig::new(config.session_keys.clone())
        .cookie_name("shop_session")
        .idle_ttl(Duration::from_secs(2 * 3600))
        .absolute_ttl(Duration::from_secs(7 * 24 * 3600));
    if config.insecure_cookies {
        session_config = session_config.insecure_cookie_for_local_dev();
    }
    let db = Db::open(&config.database).await?;
    let objects = Objects::open(&config.objects)?;
    let tokens = match (config.arch, &config.token_keys) {
        (Arch::Token, Some(keys)) => Some(Arc::new(Tokens::new(
            keys.clone(),
            store.clone(),
            db.clone(),
            !config.insecure_cookies,
        )?)),
        (Arch::Token, None) => {
            return Err(AppError::BadRequest(
                "--arch token needs STATEHOUSE_TOKEN_KEYS and STATEHOUSE_COOKIE_KEYS".into(),
            ));
        }
        _ => None,
    };
    let live = match (&config.broker, &config.live_keys) {
        (None, _) => None,
        (Some(url), Some(keys)) => {
            let broker = statehouse_fanout::open(statehouse_fanout::BrokerConfig::new(url))
                .await
                .map_err(|e| AppError::Unavailable(format!("fan-out broker: {e}")))?;
            Some(Live::new(broker, keys.clone(), &config.name)?)
        }
        (Some(_), None) => {
            return Err(AppError::BadRequest(
                "live order status (--broker) needs STATEHOUSE_TOKEN_KEYS to sign live tokens"
                    .into(),
            ));
        }
    };
    let draining = Arc::new(AtomicBool::new(false));
    let drain = Drain {
        flag: draining.clone(),
        hub: live.as_ref().map(|l| l.hub().clone()),
    };
    let shop = Shop {
        name: config.name.as_str().into(),
        served_by: HeaderValue::from_str(&config.name).map_err(|_| {
            AppError::BadRequest(format!(
                "instance name {:?} is not a header value",
                config.name
            ))
        })?,
        db,
        objects,
        draining: draining.clone(),
        stats: Arc::default(),
        admin_token: config.admin_token.as_deref().map(Arc::from),
        live: live.clone(),
    };
    let api = Router::new()
        .route("/catalog", get(catalog))
        .route("/signup", post(signup))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/me", get(me))
        .route("/cart/{item}", put(set_cart_line))
        .route("/checkout", post(checkout))
        .route("/orders", get(orders))
        .route("/live", get(live_token))
        .route(
            "/avatar",
            put(put_avatar)
                .get(get_avatar)
                .layer(DefaultBodyLimit::max(objects::MAX_AVATAR_BYTES)),
        )
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .layer(middleware::from_fn(same_origin));
    // Identity and cart: a server-side session, or tokens and a sealed
    // cookie (no session at all).
    let api = match tokens {
        Some(tokens) => api.layer(middleware::from_fn_with_state(
            tokens,
            identity::token_layer,
        )),
        None => api.layer(SessionLayer::new(store, session_config)),
    };
    let hub = match &live {
        Some(live) => live.hub().router("/ws"),
        None => Router::new(),
    };
    let router = Router::new()
        .merge(hub)
        .route(
            "/",
            get(|| async { Html(include_str!("../assets/shop.html")) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/internal/stats", get(internal_stats))
        .nest("/api", api)
        .fallback(|| async { AppError::NotFound("no such page".into()) })
        .layer(middleware::from_fn_with_state(shop.clone(), served_by))
        .with_state(shop);
    Ok((router, drain))
}

/// Runs one instance on `listener` until `shutdown` resolves; then `/readyz`
/// turns 503, and after `drain_delay` the listener closes and requests in
/// flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let (router, drain) = app(&config).await?;
    let delay = config.drain_delay;
    tracing::info!(
        instance = config.name,
        arch = %config.arch,
        addr = %listener.local_addr().map_err(|e| AppError::internal("listener", e))?,
        "shop instance serving"
    );
    // No Nagle delay: responses and live messages are small writes that
    // must leave at once (Node's HTTP server does the same by default).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            drain.start();
            tracing::info!("draining: not ready, finishing requests in flight");
            tokio::time::sleep(delay).await;
        })
        .await
        .map_err(|e| AppError::internal("serving", e))
}

/// `GET /api/live`: a short-lived token for the caller's live order
/// channel, to send in the WebSocket `hello` at `/ws`.
async fn live_token(State(shop): State<Shop>, visitor: Visitor) -> Result<Response, AppError> {
    let user = visitor.user().await?.ok_or(AppError::Unauthorized)?;
    let live = shop
        .live
        .as_ref()
        .ok_or_else(|| AppError::NotFound("live order status is off on this shop".into()))?;
    let body = json!({
        "token": live.token(user.id)?,
        "channel": crate::live::channel(user.id),
    });
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

/// Names the instance in every response, carries the balancer's request id
/// into the logs, and keeps the instance's recent-requests list.
async fn served_by(State(shop): State<Shop>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let visitor = stats::visitor_id(req.headers()).map(str::to_owned);
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let span = tracing::info_span!("request", id = %request_id, method = %req.method(), path = %req.uri().path());
    let mut response = next.run(req).instrument(span).await;
    response
        .headers_mut()
        .insert("x-served-by", shop.served_by.clone());
    if !matches!(path.as_str(), "/healthz" | "/readyz" | "/internal/stats") {
        shop.stats.record(
            visitor.as_deref(),
            Served {
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                method,
                path,
                status: response.status().as_u16(),
                micros: started.elapsed().as_micros() as u64,
            },
        );
    }
    response
}

/// The instance's own numbers for the dashboard; 404 without the admin
/// token, as if the route did not exist.
async fn internal_stats(State(shop): State<Shop>, headers: HeaderMap) -> Response {
    if stats::authorized(&headers, shop.admin_token.as_deref()) {
        Json(shop.stats.snapshot()).into_response()
    } else {
        AppError::NotFound("no such page".into()).into_response()
    }
}

/// Refuses state-changing requests that do not come from this origin.
async fn same_origin(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    match check_origin(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) fn check_origin(headers: &HeaderMap) -> Result<(), AppError> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AppError::BadRequest("the Host header is missing".into()))?;
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            AppError::Forbidden("a state-changing request needs an Origin header".into())
        })?;
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or_default();
    if authority.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "cross-site request refused: Origin {origin:?} is not this site ({host})"
        )))
    }
}

async fn readyz(State(shop): State<Shop>) -> impl IntoResponse {
    if shop.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn catalog() -> Json<&'static [Product]> {
    Json(&CATALOG)
}

#[derive(Debug, Deserialize)]
struct Credentials {
    email: String,
    password: String,
}

impl Credentials {
    fn validate(&self) -> Result<String, AppError> {
        let email = self.email.trim().to_ascii_lowercase();
        let (local, domain) = email.split_once('@').unwrap_or_default();
        if local.is_empty()
            || domain.is_empty()
            || email.len() > 254
            || email.contains(char::is_whitespace)
        {
            return Err(AppError::BadRequest(format!(
                "{:?} is not an email address",
                self.email
            )));
        }
        if !(8..=1024).contains(&self.password.len()) {
            return Err(AppError::BadRequest(
                "a password has 8 to 1024 bytes".into(),
            ));
        }
        Ok(email)
    }
}

async fn hash_password(password: String) -> Result<String, AppError> {
    use argon2::PasswordHasher;
    tokio::task::spawn_blocking(move || {
        argon2::Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| AppError::internal("password hashing task", e))?
    .map_err(|e| AppError::internal("hashing the password", e))
}

async fn verify_password(password: String, hash: String) -> Result<bool, AppError> {
    use argon2::PasswordVerifier;
    tokio::task::spawn_blocking(move || {
        let parsed = argon2::PasswordHash::new(&hash)
            .map_err(|e| AppError::internal("stored password hash", e))?;
        Ok(argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(|e| AppError::internal("password check task", e))?
}

async fn signup(
    State(shop): State<Shop>,
    visitor: Visitor,
    JsonBody(creds): JsonBody<Credentials>,
) -> Result<impl IntoResponse, AppError> {
    let email = creds.validate()?;
    let hash = hash_password(creds.password).await?;
    let user = shop.db.create_user(&email, &hash).await?;
    visitor.log_in(&user).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user": user }))))
}

async fn login(
    State(shop): State<Shop>,
    visitor: Visitor,
    JsonBody(creds): JsonBody<Credentials>,
) -> Result<Json<serde_json::Value>, AppError> {
    let email = creds.validate()?;
    let found = shop.db.user_by_email(&email).await?;
    let ok = match &found {
        Some((_, hash)) => verify_password(creds.password, hash.clone()).await?,
        None => false,
    };
    let Some((user, _)) = found.filter(|_| ok) else {
        return Err(AppError::Unauthorized);
    };
    visitor.log_in(&user).await?;
    Ok(Json(json!({ "user": user })))
}

async fn logout(visitor: Visitor) -> Result<Json<serde_json::Value>, AppError> {
    visitor.log_out().await?;
    Ok(Json(json!({ "user": null })))
}

async fn current_user(visitor: &Visitor) -> Result<User, AppError> {
    visitor.user().await?.ok_or(AppError::Unauthorized)
}

async fn read_cart(visitor: &Visitor) -> Result<BTreeMap<String, u32>, AppError> {
    let ids: Vec<&str> = CATALOG.iter().map(|p| p.id).collect();
    visitor.cart(&ids).await
}

fn cart_total(cart: &BTreeMap<String, u32>) -> Result<i64, AppError> {
    cart.iter()
        .map(|(item, qty)| Ok(product(item)?.price_cents * i64::from(*qty)))
        .sum()
}

async fn me(
    State(shop): State<Shop>,
    visitor: Visitor,
) -> Result<Json<serde_json::Value>, AppError> {
    let user = visitor.user().await?;
    let cart = read_cart(&visitor).await?;
    Ok(Json(json!({
        "user": user,
        "cart": cart,
        "total_cents": cart_total(&cart)?,
        "served_by": &*shop.name,
    })))
}

#[derive(Debug, Deserialize)]
struct CartLine {
    qty: u32,
}

/// Sets one cart line. One field of the session: a request changing another
/// line at the same time, on any instance, never loses this one.
async fn set_cart_line(
    visitor: Visitor,
    Path(item): Path<String>,
    JsonBody(line): JsonBody<CartLine>,
) -> Result<Json<serde_json::Value>, AppError> {
    let p = product(&item)?;
    if line.qty > MAX_QTY {
        return Err(AppError::BadRequest(format!(
            "at most {MAX_QTY} of one product"
        )));
    }
    visitor.set_line(p.id, line.qty)?;
    Ok(Json(json!({ "item": p.id, "qty": line.qty })))
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, AppError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AppError::BadRequest("checkout needs an Idempotency-Key header".into()))?;
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(AppError::BadRequest(
            "Idempotency-Key: 1 to 64 characters of A-Z, a-z, 0-9, - and _".into(),
        ));
    }
    Ok(key.to_owned())
}

/// Places the cart as an order, once per `Idempotency-Key`: a retry after a
/// lost answer gets the same order (200) instead of a second one (201).
async fn checkout(
    State(shop): State<Shop>,
    visitor: Visitor,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let key = idempotency_key(&headers)?;
    let user = current_user(&visitor).await?;
    // A retry finds the order its first attempt placed, whatever that
    // attempt did to the cart before its answer was lost.
    let placed = match shop.db.order_by_key(user.id, &key).await? {
        Some(order) => Placed::Replayed(order),
        None => {
            let cart = read_cart(&visitor).await?;
            if cart.is_empty() {
                return Err(AppError::Unprocessable("the cart is empty".into()));
            }
            shop.db
                .place_order(user.id, &key, &cart, cart_total(&cart)?, &shop.name)
                .await?
        }
    };
    let (status, order) = match placed {
        Placed::Created(order) => (StatusCode::CREATED, order),
        Placed::Replayed(order) => (StatusCode::OK, order),
    };
    // The cart is emptied after the order is durable. If this instance dies
    // in between, the retry (same key) replays the order and empties the
    // cart then; `checkout` in the session remembers which key did. (A line
    // the first attempt already took and the user re-added since would be
    // taken again: the one window where a retry can undo a newer change.)
    visitor.take_order(&key, &order.items).await?;
    Ok((status, Json(json!({ "order": order }))).into_response())
}

async fn orders(
    State(shop): State<Shop>,
    visitor: Visitor,
) -> Result<Json<serde_json::Value>, AppError> {
    let user = current_user(&visitor).await?;
    Ok(Json(json!({ "orders": shop.db.orders(user.id).await? })))
}

async fn put_avatar(
    State(shop): State<Shop>,
    visitor: Visitor,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let user = current_user(&visitor).await?;
    let image = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge(format!(
            "an avatar has at most {} bytes",
            objects::MAX_AVATAR_BYTES
        )),
        _ => AppError::BadRequest(e.body_text()),
    })?;
    let Some(mime) = objects::image_type(&image) else {
        return Err(AppError::Unprocessable(
            "an avatar is a PNG, JPEG, GIF or WebP image".into(),
        ));
    };
    let bytes = image.len();
    shop.objects.put_avatar(user.id, image).await?;
    Ok(Json(json!({ "type": mime, "bytes": bytes })))
}

async fn get_avatar(State(shop): State<Shop>, visitor: Visitor) -> Result<Response, AppError> {
    let user = current_user(&visitor).await?;
    let image = shop
        .objects
        .avatar(user.id)
        .await?
        .ok_or_else(|| AppError::NotFound("no avatar yet".into()))?;
    let mime = objects::image_type(&image).unwrap_or("application/octet-stream");
    Ok(([(header::CONTENT_TYPE, mime)], image).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn origin_must_match_host() {
        assert!(check_origin(&headers("127.0.0.1:8080", Some("http://127.0.0.1:8080"))).is_ok());
        for origin in [
            None,
            Some("http://evil.example"),
            Some("null"),
            Some("http://127.0.0.1:8081"),
        ] {
            let e = check_origin(&headers("127.0.0.1:8080", origin)).unwrap_err();
            assert_eq!(e.status(), StatusCode::FORBIDDEN, "{origin:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let mut h = HeaderMap::new();
        assert!(idempotency_key(&h).is_err());
        h.insert("idempotency-key", HeaderValue::from_static("abc-123_X"));
        assert_eq!(idempotency_key(&h).unwrap(), "abc-123_X");
        h.insert("idempotency-key", HeaderValue::from_static("../etc"));
        assert!(idempotency_key(&h).is_err());
    }

    #[test]
    fn credentials_are_checked() {
        let c = |e: &str, p: &str| {
            Credentials {
                email: e.into(),
                password: p.into(),
            }
            .validate()
        };
        assert_eq!(c(" A@B.example ", "longenough").unwrap(), "a@b.example");
        assert!(c("nobody", "longenough").is_err());
        assert!(c("a@b", "short").is_err());
    }
}
