use std::io::ErrorKind;
use std::net::TcpStream;

use statehouse_testkit::{RedisServer, shared_redis};

use crate::{must, ping};

#[test]
fn kill_then_restart_on_the_same_port() {
    let mut server = must(RedisServer::start());
    let addr = server.addr();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", addr.port()));
    assert_eq!(ping(addr).unwrap(), "+PONG");

    server.kill();
    assert!(!server.is_running());
    let refused = TcpStream::connect(addr).expect_err("nothing listens after a kill");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    must(server.restart());
    assert!(server.is_running());
    assert_eq!(server.addr(), addr);
    assert_eq!(ping(addr).unwrap(), "+PONG");
}

#[test]
fn shared_redis_is_one_server() {
    let first = shared_redis();
    assert!(std::ptr::eq(first, shared_redis()));
    assert_eq!(ping(first.addr()).unwrap(), "+PONG");
}
