//! The shop facing bad input: malformed and oversized bodies, unknown
//! products, path tricks, cross-site requests, bad idempotency keys, tampered
//! cookies. Each gets a clear 4xx, nothing is stored, and nothing is a 500.

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

mod common;

struct Shop {
    base: String,
    http: Client,
    cookie: Option<String>,
    _dir: tempfile::TempDir,
}

async fn shop() -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path(), "test-1");
    let (router, _) = statehouse_app::shop::app(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Shop {
        base,
        http: Client::new(),
        cookie: None,
        _dir: dir,
    }
}

impl Shop {
    async fn raw(
        &mut self,
        method: Method,
        path: &str,
        origin: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
        extra: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let r = req.body(body).send().await.unwrap();
        if let Some(set) = r.headers().get("set-cookie") {
            self.cookie = Some(set.to_str().unwrap().split(';').next().unwrap().to_owned());
        }
        assert_eq!(r.headers()["x-served-by"], "test-1");
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}: {text}");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn json(&mut self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        let origin = self.base.clone();
        self.raw(
            method,
            path,
            Some(&origin),
            Some("application/json"),
            body.to_string().into_bytes(),
            &[],
        )
        .await
    }

    async fn get(&mut self, path: &str) -> (StatusCode, Value) {
        self.raw(Method::GET, path, None, None, Vec::new(), &[])
            .await
    }
}

fn creds() -> Value {
    json!({ "email": "ann@shop.example", "password": "correct horse" })
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_4xx() {
    let mut s = shop().await;
    let origin = s.base.clone();
    for (body, ct) in [
        (&b"{\"email\": "[..], Some("application/json")),
        (&b"[]"[..], Some("application/json")),
        (
            &b"{\"email\": 5, \"password\": \"x\"}"[..],
            Some("application/json"),
        ),
        (&b"{\"email\": \"a@b.c\"}"[..], Some("application/json")),
        (
            &b"email=a%40b.c&password=xxxxxxxx"[..],
            Some("application/x-www-form-urlencoded"),
        ),
        (&b"\xff\xfe"[..], Some("application/json")),
        (&b"{}"[..], None),
    ] {
        let (status, body) = s
            .raw(
                Method::POST,
                "/api/signup",
                Some(&origin),
                ct,
                body.to_vec(),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    for bad in [
        json!({ "email": "no-at-sign", "password": "correct horse" }),
        json!({ "email": "a@b.example", "password": "short" }),
    ] {
        assert_eq!(
            s.json(Method::POST, "/api/signup", bad).await.0,
            StatusCode::BAD_REQUEST
        );
    }
    let huge = json!({ "email": "a@b.example", "password": "x".repeat(64 * 1024) });
    assert_eq!(
        s.json(Method::POST, "/api/signup", huge).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Nothing of that signed anyone up.
    assert_eq!(
        s.json(Method::POST, "/api/login", creds()).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn cross_site_requests_are_refused_and_store_nothing() {
    let mut s = shop().await;
    for origin in [None, Some("http://evil.example"), Some("null")] {
        let (status, body) = s
            .raw(
                Method::POST,
                "/api/signup",
                origin,
                Some("application/json"),
                creds().to_string().into_bytes(),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin:?}: {body}");
    }
    assert_eq!(
        s.json(Method::POST, "/api/login", creds()).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn cart_rejects_unknown_products_and_path_tricks() {
    let mut s = shop().await;
    for path in [
        "/api/cart/caviar",
        "/api/cart/..%2F..%2Fetc%2Fpasswd",
        "/api/cart/tea%00",
    ] {
        let (status, _) = s.json(Method::PUT, path, json!({ "qty": 1 })).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    for qty in [json!(100), json!(-1), json!("2"), json!(1.5)] {
        let (status, _) = s
            .json(Method::PUT, "/api/cart/tea", json!({ "qty": qty }))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{qty}");
    }
    let (_, me) = s.get("/api/me").await;
    assert_eq!(me["cart"], json!({}));
}

#[tokio::test]
async fn checkout_needs_login_a_good_key_and_a_cart() {
    let mut s = shop().await;
    let origin = s.base.clone();
    let checkout = |key: &'static str| (Method::POST, "/api/checkout", key);
    let (m, p, _) = checkout("k");
    let (status, _) = s
        .raw(
            m,
            p,
            Some(&origin),
            None,
            Vec::new(),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.json(Method::POST, "/api/signup", creds()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        s.json(Method::POST, "/api/signup", creds()).await.0,
        StatusCode::CONFLICT
    );
    for headers in [
        &[][..],
        &[("idempotency-key", "../../x")][..],
        &[("idempotency-key", "")][..],
    ] {
        let (status, body) = s
            .raw(
                Method::POST,
                "/api/checkout",
                Some(&origin),
                None,
                Vec::new(),
                headers,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{headers:?}: {body}");
    }
    let (status, body) = s
        .raw(
            Method::POST,
            "/api/checkout",
            Some(&origin),
            None,
            Vec::new(),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, orders) = s.get("/api/orders").await;
    assert_eq!(orders["orders"], json!([]));
}

#[tokio::test]
async fn avatars_are_checked_and_never_stored_when_bad() {
    let mut s = shop().await;
    let origin = s.base.clone();
    let png = b"\x89PNG\r\n\x1a\n0000".to_vec();
    let (status, _) = s
        .raw(
            Method::PUT,
            "/api/avatar",
            Some(&origin),
            None,
            png.clone(),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.json(Method::POST, "/api/signup", creds()).await.0,
        StatusCode::CREATED
    );
    let mut big = png.clone();
    big.resize(statehouse_app::objects::MAX_AVATAR_BYTES + 1, 0);
    let (status, _) = s
        .raw(Method::PUT, "/api/avatar", Some(&origin), None, big, &[])
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = s
        .raw(
            Method::PUT,
            "/api/avatar",
            Some(&origin),
            None,
            b"#!/bin/sh\nrm -rf /".to_vec(),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(s.get("/api/avatar").await.0, StatusCode::NOT_FOUND);
    let (status, _) = s
        .raw(Method::PUT, "/api/avatar", Some(&origin), None, png, &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.get("/api/avatar").await.0, StatusCode::OK);
}

#[tokio::test]
async fn tampered_cookies_mean_no_session_never_an_error() {
    let mut s = shop().await;
    assert_eq!(
        s.json(Method::POST, "/api/signup", creds()).await.0,
        StatusCode::CREATED
    );
    let good = s.cookie.clone().unwrap();
    for bad in [
        format!("{good}x"),
        good.replacen("shop_session=", "shop_session=A", 1),
        "shop_session=".to_owned(),
        "shop_session=....".to_owned(),
        good[..good.len() / 2].to_owned(),
    ] {
        s.cookie = Some(bad.clone());
        let (status, me) = s.get("/api/me").await;
        assert_eq!(status, StatusCode::OK, "{bad}");
        assert!(me["user"].is_null(), "{bad}: {me}");
    }
}

#[tokio::test]
async fn internal_stats_need_the_admin_token() {
    let mut s = shop().await;
    s.get("/api/catalog").await;
    let (status, _) = s.get("/internal/stats").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s
        .raw(
            Method::GET,
            "/internal/stats",
            None,
            None,
            Vec::new(),
            &[("authorization", "Bearer nope")],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, stats) = s
        .raw(
            Method::GET,
            "/internal/stats",
            None,
            None,
            Vec::new(),
            &[("authorization", "Bearer dash")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let recent = stats["recent"].as_array().unwrap();
    assert!(
        recent.iter().any(|r| r["path"] == "/api/catalog"),
        "{stats}"
    );
    assert!(recent.iter().all(|r| r["path"] != "/internal/stats"));
}
