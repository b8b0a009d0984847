//! `bench-backend`: the trivial instance behind the load balancers in
//! `lb-bench`. Answers `200 ok` (2 bytes) on every path, `/health` included,
//! on 127.0.0.1 and the port given as the first argument (0: any free one);
//! prints the port it listens on.

use axum::Router;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{}", listener.local_addr()?.port());
    let app = Router::new().fallback(|| async { "ok" });
    axum::serve(listener, app).await
}
