//! The one read loop the lb's own HTTP/1 code uses on both sides (client connections in
//! `h1_server`, instance connections in `proxy::upstream`).

use std::io;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Reads what `stream` has into `buf`, first growing `buf` by `chunk` bytes when less than an
/// eighth of that is spare (small messages then share one allocation). `Ok(0)` at the peer's
/// end of stream.
pub(crate) fn poll_read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    chunk: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < chunk / 8 {
        buf.reserve(chunk);
    }
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r),
        }
    }
}
