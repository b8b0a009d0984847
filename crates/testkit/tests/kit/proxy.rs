use std::net::SocketAddr;
use std::time::{Duration, Instant};

use statehouse_testkit::{FaultProxy, RedisServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::must;

/// Generous bound for things that should happen at once; only reached on failure.
const SOON: Duration = Duration::from_secs(5);

async fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).await.expect("proxy accepts"))
}

async fn send_ping(conn: &mut BufReader<TcpStream>) {
    conn.get_mut().write_all(b"PING\r\n").await.unwrap();
}

async fn read_line(conn: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    Ok(line)
}

async fn ping(conn: &mut BufReader<TcpStream>) -> String {
    send_ping(conn).await;
    timeout(SOON, read_line(conn))
        .await
        .expect("reply in time")
        .unwrap()
}

/// The connection was closed by the proxy: EOF or a reset, promptly.
async fn assert_closed(conn: &mut BufReader<TcpStream>) {
    let mut buf = [0u8; 64];
    match timeout(SOON, conn.read(&mut buf))
        .await
        .expect("closed in time")
    {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected EOF, read {:?}", &buf[..n]),
    }
}

#[tokio::test]
async fn cut_blackhole_latency_and_heal() {
    // Blocking start before any async work: nothing else runs on this runtime yet.
    let redis = must(RedisServer::start());
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();

    let mut conn = connect(proxy.addr()).await;
    assert_eq!(ping(&mut conn).await, "+PONG\r\n");

    // Cut: the open connection is dropped, and new ones are closed right after accept.
    proxy.cut();
    assert_closed(&mut conn).await;
    let mut refused = connect(proxy.addr()).await;
    assert_closed(&mut refused).await;

    proxy.heal();
    let mut conn = connect(proxy.addr()).await;
    assert_eq!(ping(&mut conn).await, "+PONG\r\n");

    // Blackhole: the request goes nowhere, the client times out, the connection stays open.
    proxy.blackhole();
    send_ping(&mut conn).await;
    assert!(
        timeout(Duration::from_millis(300), read_line(&mut conn))
            .await
            .is_err()
    );
    let mut held = connect(proxy.addr()).await;
    send_ping(&mut held).await;

    // Heal: the held requests are delivered on both the old and the new connection.
    proxy.heal();
    let late = timeout(SOON, read_line(&mut conn))
        .await
        .expect("held reply arrives");
    assert_eq!(late.unwrap(), "+PONG\r\n");
    let late = timeout(SOON, read_line(&mut held))
        .await
        .expect("held reply arrives");
    assert_eq!(late.unwrap(), "+PONG\r\n");

    // Latency applies to each direction.
    proxy.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(ping(&mut conn).await, "+PONG\r\n");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    proxy.set_latency(Duration::ZERO);

    assert_eq!(proxy.connections_accepted(), 4);
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let redis = must(RedisServer::start());
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    let addr = proxy.addr();
    let mut conn = connect(addr).await;
    assert_eq!(ping(&mut conn).await, "+PONG\r\n");

    drop(proxy);
    assert_closed(&mut conn).await;
}
