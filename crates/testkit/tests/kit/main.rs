//! The kit against real servers. One test binary with a module per server, so the crate's tests
//! link once.

mod cluster;
mod lifecycle;
mod nats;
mod postgres;
mod proxy;
mod redis;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Unwraps a kit result, printing the error with `Display`: it carries the command line and the
/// server's log tail, which `Debug` would squash onto one line.
#[track_caller]
pub(crate) fn must<T>(result: statehouse_testkit::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// An inline `PING` on a fresh connection; returns the reply line, e.g. `+PONG`.
pub(crate) fn ping(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"PING\r\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}
