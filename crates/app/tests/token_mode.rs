//! `--arch token`: no server-side session. The access token names the user,
//! an expired or missing one is replaced by rotating the refresh token, a
//! reused refresh token logs the family out, and the cart lives in a sealed
//! cookie that a tampered value cannot open.

use std::collections::BTreeMap;

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use statehouse_app::{Arch, TokenKeys};

mod common;
use statehouse_token::{CookieKeys, Key, KeyRing};

async fn shop(dir: &std::path::Path) -> String {
    let secret = [7u8; 32];
    let mut config = common::config(dir, "token-1");
    config.arch = Arch::Token;
    config.session_store = format!("sqlite://{}", dir.join("refresh.db").display());
    config.token_keys = Some(TokenKeys {
        ring: KeyRing::new()
            .with_key(Key::hmac("t1", &secret).unwrap())
            .unwrap(),
        cookie: CookieKeys::new().with_key(1, [9u8; 32]).unwrap(),
    });
    let (router, _) = statehouse_app::shop::app(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

/// A client with a cookie jar it controls.
struct Browser {
    base: String,
    http: Client,
    jar: BTreeMap<String, String>,
}

impl Browser {
    async fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("origin", &self.base);
        if !self.jar.is_empty() {
            let cookies: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header("cookie", cookies.join("; "));
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().await.unwrap();
        for set in r.headers().get_all("set-cookie") {
            let set = set.to_str().unwrap();
            assert!(
                set.contains("HttpOnly") && set.contains("SameSite=Lax"),
                "{set}"
            );
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            if value.is_empty() {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_owned(), value.to_owned());
            }
        }
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test]
async fn tokens_carry_identity_and_the_cookie_carries_the_cart() {
    let dir = tempfile::tempdir().unwrap();
    let base = shop(dir.path()).await;
    let mut b = Browser {
        base,
        http: Client::new(),
        jar: BTreeMap::new(),
    };
    let creds = json!({ "email": "tok@shop.example", "password": "correct horse" });
    assert_eq!(
        b.call("POST", "/api/signup", Some(creds.clone())).await.0,
        StatusCode::CREATED
    );
    assert!(b.jar.contains_key("shop_access") && b.jar.contains_key("shop_refresh"));
    assert!(
        !b.jar.contains_key("shop_session"),
        "token mode keeps no session"
    );
    b.call("PUT", "/api/cart/tea", Some(json!({ "qty": 3 })))
        .await;
    let (_, me) = b.call("GET", "/api/me", None).await;
    assert_eq!(me["user"]["email"], "tok@shop.example");
    assert_eq!(me["cart"], json!({ "tea": 3 }));

    // No access token (expired, say): the refresh token is rotated.
    let first_refresh = b.jar["shop_refresh"].clone();
    b.jar.remove("shop_access");
    let (_, me) = b.call("GET", "/api/me", None).await;
    assert_eq!(me["user"]["email"], "tok@shop.example");
    assert_ne!(b.jar["shop_refresh"], first_refresh, "rotated");
    assert!(b.jar.contains_key("shop_access"));

    // A stolen, already-used refresh token: refused, and the whole family
    // with it — the legitimate holder is logged out too.
    let mut thief = Browser {
        base: b.base.clone(),
        http: Client::new(),
        jar: BTreeMap::new(),
    };
    thief.jar.insert("shop_refresh".into(), first_refresh);
    let (_, me) = thief.call("GET", "/api/me", None).await;
    assert!(me["user"].is_null());
    b.jar.remove("shop_access");
    let (_, me) = b.call("GET", "/api/me", None).await;
    assert!(me["user"].is_null(), "the family was revoked on reuse");

    // The cart survived in its cookie; a tampered cart cookie opens as empty.
    assert_eq!(me["cart"], json!({ "tea": 3 }));
    let cart = b.jar["shop_cart"].clone();
    let flipped = if &cart[10..11] == "A" { "B" } else { "A" };
    b.jar.insert(
        "shop_cart".into(),
        format!("{}{flipped}{}", &cart[..10], &cart[11..]),
    );
    let (status, me) = b.call("GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["cart"], json!({}));

    // Log in again, log out: the refresh family is revoked.
    b.jar.insert("shop_cart".into(), cart);
    assert_eq!(
        b.call("POST", "/api/login", Some(creds)).await.0,
        StatusCode::OK
    );
    let refresh = b.jar["shop_refresh"].clone();
    assert_eq!(b.call("POST", "/api/logout", None).await.0, StatusCode::OK);
    assert!(!b.jar.contains_key("shop_access") && !b.jar.contains_key("shop_refresh"));
    b.jar.insert("shop_refresh".into(), refresh);
    let (_, me) = b.call("GET", "/api/me", None).await;
    assert!(me["user"].is_null(), "a logged-out refresh token is dead");
}
