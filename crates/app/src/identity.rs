//! Who is calling, and their cart, whichever way the architecture keeps
//! them: in a server-side session ([`statehouse_session`]), or — `--arch
//! token` — in a signed access token, a rotating refresh token and an
//! encrypted cart cookie ([`statehouse_token`]), with no session at all.
//!
//! Handlers see one [`Visitor`]; the two ways differ only here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};
use statehouse_session::Session;
use statehouse_token::{
    CookieKeys, IssuerConfig, KeyRing, RefreshConfig, RefreshTokens, SealedCookie,
    SealedCookieConfig, TokenIssuer, TokenVerifier, VerifierConfig,
};

use crate::db::{Db, User};
use crate::error::AppError;

const ACCESS_COOKIE: &str = "shop_access";
const REFRESH_COOKIE: &str = "shop_refresh";
const CART_COOKIE: &str = "shop_cart";
const ISSUER: &str = "statehouse-shop";
const AUDIENCE: &str = "shop";

/// The variable holding the shop's token key ring (access tokens, and the
/// live tokens of [`crate::live`]).
pub(crate) const TOKEN_KEYS_VAR: &str = "STATEHOUSE_TOKEN_KEYS";

/// The keys token mode needs; every instance must share them.
#[derive(Debug, Clone)]
pub struct TokenKeys {
    /// Signs and verifies access tokens.
    pub ring: KeyRing,
    /// Seals the cart cookie.
    pub cookie: CookieKeys,
}

impl TokenKeys {
    /// From `STATEHOUSE_TOKEN_KEYS` and `STATEHOUSE_COOKIE_KEYS` (key specs;
    /// see `KeyRing::from_spec` and `CookieKeys::from_spec`).
    pub fn from_env() -> Result<TokenKeys, AppError> {
        let bad = |what: &str, e: statehouse_token::KeyError| {
            AppError::BadRequest(format!("{what}: {e}"))
        };
        Ok(TokenKeys {
            ring: KeyRing::from_env(TOKEN_KEYS_VAR).map_err(|e| bad(TOKEN_KEYS_VAR, e))?,
            cookie: CookieKeys::from_env("STATEHOUSE_COOKIE_KEYS")
                .map_err(|e| bad("STATEHOUSE_COOKIE_KEYS", e))?,
        })
    }
}

/// Token mode's machinery, built once per instance.
#[derive(Debug)]
pub(crate) struct Tokens {
    issuer: TokenIssuer,
    verifier: TokenVerifier,
    refresh: RefreshTokens,
    cart: SealedCookie,
    db: Db,
    secure: bool,
}

/// What the cart cookie holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CartState {
    cart: BTreeMap<String, u32>,
    /// The idempotency key of the checkout that last emptied the cart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkout: Option<String>,
}

impl Tokens {
    pub(crate) fn new(
        keys: TokenKeys,
        store: statehouse_store::Store,
        db: Db,
        secure: bool,
    ) -> Result<Tokens, AppError> {
        let issuer = TokenIssuer::new(keys.ring.clone(), IssuerConfig::new(ISSUER, AUDIENCE))
            .map_err(|e| AppError::BadRequest(format!("token keys: {e}")))?;
        let cart = SealedCookie::new(
            CART_COOKIE,
            keys.cookie,
            SealedCookieConfig::new(Duration::from_secs(30 * 24 * 3600)),
        )
        .map_err(|e| AppError::internal("cart cookie", e))?;
        Ok(Tokens {
            issuer,
            verifier: TokenVerifier::new(keys.ring, VerifierConfig::new(ISSUER, AUDIENCE)),
            refresh: RefreshTokens::new(store, RefreshConfig::new()),
            cart,
            db,
            secure,
        })
    }

    fn cookie(&self, name: &str, value: &str, max_age: Duration) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            max_age.as_secs()
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
    }

    fn without_secure(&self, v: HeaderValue) -> HeaderValue {
        if self.secure {
            return v;
        }
        let text = v.to_str().unwrap_or_default().replace("; Secure", "");
        HeaderValue::from_str(&text).unwrap_or(v)
    }
}

/// The value of the first cookie named `name` in the request's `Cookie`
/// headers.
pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// One request's token-mode state; the middleware turns changes into
/// cookies on the way out.
#[derive(Debug)]
pub(crate) struct TokenVisitor {
    tokens: Arc<Tokens>,
    user: Mutex<Option<User>>,
    state: Mutex<CartState>,
    cart_changed: Mutex<bool>,
    refresh_token: Option<String>,
    set_cookies: Mutex<Vec<HeaderValue>>,
}

impl TokenVisitor {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the request's cookies: a valid access token names the user;
    /// without one, a refresh token is rotated for a new pair.
    async fn from_headers(tokens: Arc<Tokens>, headers: &HeaderMap) -> Result<Self, AppError> {
        let state = tokens
            .cart
            .open_request(headers)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let visitor = TokenVisitor {
            refresh_token: cookie_value(headers, REFRESH_COOKIE).map(str::to_owned),
            tokens,
            user: Mutex::new(None),
            state: Mutex::new(state),
            cart_changed: Mutex::new(false),
            set_cookies: Mutex::new(Vec::new()),
        };
        if let Some(access) = cookie_value(headers, ACCESS_COOKIE)
            && let Ok(claims) = visitor.tokens.verifier.verify(access).await
            && let (Ok(id), Some(email)) = (claims.sub.parse(), claims.extra.get("email"))
        {
            *Self::lock(&visitor.user) = Some(User {
                id,
                email: email.as_str().unwrap_or_default().to_owned(),
            });
        } else if let Some(refresh) = visitor.refresh_token.clone() {
            visitor.refresh(&refresh).await?;
        }
        Ok(visitor)
    }

    /// Exchanges the refresh token for a new one and a new access token.
    /// An invalid, reused or revoked refresh token means "logged out" (and
    /// its cookies are cleared); an unreachable store is a 503.
    async fn refresh(&self, token: &str) -> Result<(), AppError> {
        match self.tokens.refresh.rotate(token).await {
            Ok(grant) => {
                let user = match grant.subject.parse() {
                    Ok(id) => self.tokens.db.user_by_id(id).await?,
                    Err(_) => None,
                };
                match user {
                    Some(user) => self.issue(&user, &grant.token, grant.expires_in)?,
                    None => self.clear_login(),
                }
                Ok(())
            }
            Err(e) if e.status() == http::StatusCode::SERVICE_UNAVAILABLE => {
                Err(AppError::Unavailable(e.to_string()))
            }
            Err(e) => {
                tracing::info!("refresh token refused: {e}");
                self.clear_login();
                Ok(())
            }
        }
    }

    fn issue(&self, user: &User, refresh: &str, refresh_ttl: Duration) -> Result<(), AppError> {
        let mut extra = serde_json::Map::new();
        extra.insert("email".into(), user.email.clone().into());
        let (access, claims) = self
            .tokens
            .issuer
            .issue_access(&user.id.to_string(), extra)
            .map_err(|e| AppError::internal("issuing an access token", e))?;
        let access_ttl = Duration::from_secs(claims.exp.saturating_sub(claims.iat));
        let mut cookies = Self::lock(&self.set_cookies);
        cookies.push(self.tokens.cookie(ACCESS_COOKIE, &access, access_ttl));
        cookies.push(self.tokens.cookie(REFRESH_COOKIE, refresh, refresh_ttl));
        *Self::lock(&self.user) = Some(user.clone());
        Ok(())
    }

    fn clear_login(&self) {
        let mut cookies = Self::lock(&self.set_cookies);
        cookies.push(self.tokens.cookie(ACCESS_COOKIE, "", Duration::ZERO));
        cookies.push(self.tokens.cookie(REFRESH_COOKIE, "", Duration::ZERO));
        *Self::lock(&self.user) = None;
    }

    /// The Set-Cookie headers this request earned.
    fn cookies(&self) -> Result<Vec<HeaderValue>, AppError> {
        let mut out = std::mem::take(&mut *Self::lock(&self.set_cookies));
        if *Self::lock(&self.cart_changed) {
            let state = Self::lock(&self.state).clone();
            let sealed = self
                .tokens
                .cart
                .seal_json(&state)
                .map_err(|e| AppError::TooLarge(format!("the cart cookie: {e}")))?;
            if let Some(v) = self.tokens.cart.set_cookie(&sealed) {
                out.push(self.tokens.without_secure(v));
            }
        }
        Ok(out)
    }
}

/// Token mode's middleware: builds the request's [`TokenVisitor`], runs the
/// handler, and sets the cookies it changed.
pub(crate) async fn token_layer(
    State(tokens): State<Arc<Tokens>>,
    mut req: Request,
    next: Next,
) -> Response {
    let visitor = match TokenVisitor::from_headers(tokens, req.headers()).await {
        Ok(v) => Arc::new(v),
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(visitor.clone());
    let mut response = next.run(req).await;
    match visitor.cookies() {
        Ok(cookies) => {
            for c in cookies {
                response.headers_mut().append(header::SET_COOKIE, c);
            }
            response
        }
        Err(e) => e.into_response(),
    }
}

/// The caller, as a handler sees them.
#[derive(Debug)]
pub(crate) enum Visitor {
    Session(Session),
    Token(Arc<TokenVisitor>),
}

impl<S: Send + Sync> FromRequestParts<S> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(v) = parts.extensions.get::<Arc<TokenVisitor>>() {
            return Ok(Visitor::Token(v.clone()));
        }
        Session::from_request_parts(parts, state)
            .await
            .map(Visitor::Session)
            .map_err(IntoResponse::into_response)
    }
}

fn cart_field(item: &str) -> String {
    format!("cart.{item}")
}

impl Visitor {
    pub(crate) async fn user(&self) -> Result<Option<User>, AppError> {
        match self {
            Visitor::Session(s) => Ok(s.get::<User>("user").await?),
            Visitor::Token(t) => Ok(TokenVisitor::lock(&t.user).clone()),
        }
    }

    /// Logs `user` in: a new session id (fixation defence) with the cart
    /// kept, or a new access token and refresh-token family.
    pub(crate) async fn log_in(&self, user: &User) -> Result<(), AppError> {
        match self {
            Visitor::Session(s) => {
                s.rotate_id().await?;
                s.insert("user", user)?;
            }
            Visitor::Token(t) => {
                let grant =
                    t.tokens
                        .refresh
                        .issue(&user.id.to_string())
                        .await
                        .map_err(|e| match e.status() {
                            http::StatusCode::SERVICE_UNAVAILABLE => {
                                AppError::Unavailable(e.to_string())
                            }
                            _ => AppError::internal("issuing a refresh token", e),
                        })?;
                t.issue(user, &grant.token, grant.expires_in)?;
            }
        }
        Ok(())
    }

    /// Logs out: the session is destroyed, or the refresh family revoked
    /// and the cookies cleared (an access token already handed out stays
    /// valid until it expires, at most its 5-minute lifetime).
    pub(crate) async fn log_out(&self) -> Result<(), AppError> {
        match self {
            Visitor::Session(s) => s.destroy().await?,
            Visitor::Token(t) => {
                if let Some(refresh) = &t.refresh_token
                    && let Err(e) = t.tokens.refresh.revoke(refresh).await
                    && e.status() == http::StatusCode::SERVICE_UNAVAILABLE
                {
                    return Err(AppError::Unavailable(e.to_string()));
                }
                t.clear_login();
            }
        }
        Ok(())
    }

    /// Every cart line, for the products in `items`.
    pub(crate) async fn cart(&self, items: &[&str]) -> Result<BTreeMap<String, u32>, AppError> {
        match self {
            Visitor::Session(s) => {
                let mut cart = BTreeMap::new();
                for item in items {
                    if let Some(qty) = s.get::<u32>(&cart_field(item)).await?
                        && qty > 0
                    {
                        cart.insert((*item).to_owned(), qty);
                    }
                }
                Ok(cart)
            }
            Visitor::Token(t) => Ok(TokenVisitor::lock(&t.state)
                .cart
                .iter()
                .filter(|(item, qty)| items.contains(&item.as_str()) && **qty > 0)
                .map(|(i, q)| (i.clone(), *q))
                .collect()),
        }
    }

    /// Sets one line (0 removes it). In a session it is one field, so a
    /// concurrent change to another line on another instance is kept.
    pub(crate) fn set_line(&self, item: &str, qty: u32) -> Result<(), AppError> {
        match self {
            Visitor::Session(s) if qty == 0 => s.remove(&cart_field(item))?,
            Visitor::Session(s) => s.insert(&cart_field(item), &qty)?,
            Visitor::Token(t) => {
                let mut state = TokenVisitor::lock(&t.state);
                if qty == 0 {
                    state.cart.remove(item);
                } else {
                    state.cart.insert(item.to_owned(), qty);
                }
                *TokenVisitor::lock(&t.cart_changed) = true;
            }
        }
        Ok(())
    }

    /// Takes an order's lines out of the cart once per checkout key: a
    /// retry of a checkout whose first attempt already did it does nothing.
    /// In a session each line is a compare-and-set, so a line changed
    /// meanwhile on another instance keeps the change.
    pub(crate) async fn take_order(
        &self,
        key: &str,
        items: &BTreeMap<String, u32>,
    ) -> Result<(), AppError> {
        match self {
            Visitor::Session(s) => {
                if s.get::<String>("checkout").await?.as_deref() == Some(key) {
                    return Ok(());
                }
                for (item, ordered) in items {
                    s.update::<u32, _>(&cart_field(item), |qty| {
                        qty.map(|q| q.saturating_sub(*ordered)).filter(|q| *q > 0)
                    })
                    .await?;
                }
                s.insert("checkout", &key)?;
            }
            Visitor::Token(t) => {
                let mut state = TokenVisitor::lock(&t.state);
                if state.checkout.as_deref() == Some(key) {
                    return Ok(());
                }
                for (item, ordered) in items {
                    let left = state
                        .cart
                        .get(item)
                        .map_or(0, |q| q.saturating_sub(*ordered));
                    if left == 0 {
                        state.cart.remove(item);
                    } else {
                        state.cart.insert(item.clone(), left);
                    }
                }
                state.checkout = Some(key.to_owned());
                *TokenVisitor::lock(&t.cart_changed) = true;
            }
        }
        Ok(())
    }
}
