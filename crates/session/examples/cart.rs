//! Run: `cargo run -p statehouse-session --example cart`, then
//! `curl -c jar -b jar -X POST localhost:3000/cart/book` a few times and
//! `curl -b jar localhost:3000/cart`. Start a second copy with `PORT=3001`:
//! both instances share the SQLite file, so either one serves the cart.
//!
//! The session keys come from `STATEHOUSE_SESSION_KEYS` (`kid:base64secret`);
//! without it the example makes a throwaway key and says so.

use axum::extract::Path;
use axum::routing::{get, post};
use axum::{Json, Router};
use statehouse_session::{Session, SessionConfig, SessionError, SessionKeys, SessionLayer};
use statehouse_store::{StoreConfig, open};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys = match SessionKeys::from_env("STATEHOUSE_SESSION_KEYS") {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("{e}; using a throwaway key (sessions end when this process does)");
            SessionKeys::generate("dev")
        }
    };
    let store = open(StoreConfig::new("sqlite://./example-sessions.db")).await?;
    let config = SessionConfig::new(keys).insecure_cookie_for_local_dev();

    let app = Router::new()
        .route(
            "/cart",
            get(|session: Session| async move {
                let cart: Vec<String> = session.get("cart").await?.unwrap_or_default();
                Ok::<_, SessionError>(Json(cart))
            }),
        )
        .route(
            "/cart/{item}",
            post(|session: Session, Path(item): Path<String>| async move {
                // Read-modify-write of one field: compare-and-set, so two
                // tabs adding at once on two instances both land.
                let cart = session
                    .update::<Vec<String>, _>("cart", |cart| {
                        let mut cart = cart.unwrap_or_default();
                        cart.push(item.clone());
                        Some(cart)
                    })
                    .await?;
                Ok::<_, SessionError>(Json(cart.unwrap_or_default()))
            }),
        )
        .route(
            "/login",
            post(|session: Session| async move {
                session.rotate_id().await?;
                session.insert("user", &"alice")?;
                Ok::<_, SessionError>("logged in")
            }),
        )
        .route(
            "/logout",
            post(|session: Session| async move {
                session.destroy().await?;
                Ok::<_, SessionError>("logged out")
            }),
        )
        .layer(SessionLayer::new(store, config));

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
