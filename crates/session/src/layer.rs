//! The tower layer: verifies the cookie, hands the handler a lazy
//! [`Session`], and after the handler applies its deltas and sets or clears
//! the cookie.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use cookie::Cookie;
use http::request::Parts;
use http::{HeaderValue, Request, StatusCode, header};
use statehouse_store::{ReadState, Store};
use tower::{Layer, Service};

use crate::config::SessionConfig;
use crate::keys::Rejection;
use crate::session::{CookieAction, Session, Shared, now_secs};

/// Response header naming a degraded session read (the store was down and
/// its policy answered fail-open or from the stale cache).
pub const DEGRADED_HEADER: &str = "x-statehouse-session";

/// Adds sessions to an axum router:
///
/// ```no_run
/// # async fn demo(store: statehouse_store::Store) {
/// use statehouse_session::{Session, SessionConfig, SessionKeys, SessionLayer};
/// let keys = SessionKeys::from_env("STATEHOUSE_SESSION_KEYS").expect("session keys");
/// let app: axum::Router = axum::Router::new()
///     .route("/", axum::routing::get(|s: Session| async move {
///         let visits = s.increment("visits", 1).await?;
///         Ok::<_, statehouse_session::SessionError>(format!("visit {visits}"))
///     }))
///     .layer(SessionLayer::new(store, SessionConfig::new(keys)));
/// # }
/// ```
#[derive(Clone)]
pub struct SessionLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayer")
            .field("cookie", &self.shared.config.cookie.name)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    pub fn new(store: Store, config: SessionConfig) -> Self {
        SessionLayer {
            shared: Arc::new(Shared { store, config }),
        }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around a handler.
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService").finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for SessionService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let presented = session_from_cookies(&self.shared.config, request.headers());
        let had_cookie = presented.is_some();
        let session = Session::new(self.shared.clone(), presented.and_then(Result::ok));
        request.extensions_mut().insert(session.clone());
        // The clone taken by `call` must be the one that was polled ready
        // (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let response = inner.call(request).await?;
            let mut response = match session.finish().await {
                Ok(action) => {
                    let mut response = response;
                    apply_cookie(&shared.config, &mut response, action, had_cookie);
                    response
                }
                // The handler's answer is replaced: it may claim a write
                // that did not happen.
                Err(e) => e.into_response(),
            };
            match session.read_state() {
                Some(ReadState::Degraded) => {
                    response
                        .headers_mut()
                        .insert(DEGRADED_HEADER, HeaderValue::from_static("degraded"));
                }
                Some(ReadState::Stale { .. }) => {
                    response
                        .headers_mut()
                        .insert(DEGRADED_HEADER, HeaderValue::from_static("stale"));
                }
                _ => {}
            }
            Ok(response)
        })
    }
}

/// The verified session cookie of a request: `None` when there is no
/// cookie of that name, `Some(Err)` when every one presented was rejected.
pub(crate) fn session_from_cookies(
    config: &SessionConfig,
    headers: &http::HeaderMap,
) -> Option<Result<(crate::keys::SessionId, u64), Rejection>> {
    let name = config.cookie.name.as_str();
    let mut result = None;
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for cookie in Cookie::split_parse(value).flatten() {
            if cookie.name() != name {
                continue;
            }
            let verdict = config.keys.verify(name, cookie.value()).and_then(|v| {
                let age = now_secs().saturating_sub(v.created_secs);
                if age >= config.absolute_ttl.as_secs() {
                    Err(Rejection::Expired)
                } else {
                    Ok((v.id, v.created_secs))
                }
            });
            match verdict {
                // The first valid one wins (a tossed duplicate cannot
                // displace it).
                Ok(found) => return Some(Ok(found)),
                Err(reason) => {
                    metrics::counter!(
                        "statehouse_session_cookie_rejected_total",
                        "reason" => reason.as_str()
                    )
                    .increment(1);
                    tracing::debug!(reason = reason.as_str(), "session cookie rejected");
                    result = Some(Err(reason));
                }
            }
        }
    }
    result
}

fn apply_cookie(
    config: &SessionConfig,
    response: &mut Response<Body>,
    action: CookieAction,
    had_cookie: bool,
) {
    let (value, max_age) = match action {
        CookieAction::Keep => return,
        CookieAction::Set(value) => (value, config.absolute_ttl),
        // Nothing to clear if the client sent nothing.
        CookieAction::Clear if !had_cookie => return,
        CookieAction::Clear => (String::new(), std::time::Duration::ZERO),
    };
    let mut cookie = Cookie::build((config.cookie.name.clone(), value))
        .http_only(true)
        .secure(config.cookie.secure)
        .same_site(config.cookie.same_site)
        .path(config.cookie.path.clone())
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
        ));
    if let Some(domain) = &config.cookie.domain {
        cookie = cookie.domain(domain.clone());
    }
    match HeaderValue::from_str(&cookie.build().to_string()) {
        Ok(value) => {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
        Err(e) => tracing::error!(error = %e, "session cookie is not a valid header value"),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "SessionLayer is not installed on this route",
        ))
    }
}
