//! Shutting an instance down: `/readyz` turns 503 at once (so a balancer or
//! Kubernetes stops sending), requests keep being answered for the drain
//! delay, then the listener closes.

use std::time::Duration;

mod common;

#[tokio::test]
async fn readyz_turns_503_while_draining() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), "drain-1");
    config.drain_delay = Duration::from_millis(800);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(statehouse_app::serve(listener, config, async {
        let _ = stop_rx.await;
    }));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let ready = async |http: &reqwest::Client| http.get(format!("{base}/readyz")).send().await;
    let mut up = false;
    for _ in 0..100 {
        if ready(&http).await.is_ok_and(|r| r.status() == 200) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the instance became ready");
    stop_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = ready(&http).await.expect("still answering while draining");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-served-by"], "drain-1");
    let ok = http
        .get(format!("{base}/api/catalog"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.status(),
        200,
        "requests are still served during the drain delay"
    );
    server.await.unwrap().unwrap();
    assert!(
        ready(&http).await.is_err(),
        "the listener is closed after the drain"
    );
}
