use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};

use statehouse_testkit::Nats;

use crate::must;

fn info_line(addr: SocketAddr) -> String {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn greets_with_info_and_restarts_on_the_same_port() {
    let mut nats = must(Nats::start());
    assert_eq!(
        nats.url(),
        format!("nats://127.0.0.1:{}", nats.addr().port())
    );
    let info = info_line(nats.addr());
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains(r#""jetstream":true"#), "{info}");

    nats.kill();
    assert!(TcpStream::connect(nats.addr()).is_err());
    must(nats.restart());
    assert!(info_line(nats.addr()).starts_with("INFO {"));
}
