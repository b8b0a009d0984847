//! The one read loop the lb's own HTTP/1 code uses on both sides (client connections in
//! `h1_server`, instance connections in `proxy::upstream`).

use std::io;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::Interest;
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
        let offered = buf.capacity() - buf.len();
        let mut short = None;
        // A read that returns less than it was offered took everything the socket held: the
        // closure then reports `WouldBlock`, so tokio marks the socket not readable, as of the
        // readiness it saw *before* the read (a readiness event that came during or after the
        // read is kept). The next read waits for epoll instead of costing an `EAGAIN` system
        // call — nginx does the same, and so does tokio's own `AsyncRead`, but not its
        // `try_read*`, which this loop needs to read into a `BytesMut`'s spare capacity.
        // Without it: one wasted system call per message on each side of a request (the
        // client's next request, the instance's next answer), a third of the lb's system
        // calls on plain keep-alive traffic. A peer's end of stream stays marked: tokio never
        // clears "read closed".
        let result = stream.try_io(Interest::READABLE, || {
            let n = stream.try_read_buf(buf)?;
            if n > 0 && n < offered {
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (result, short) {
            (_, Some(n)) => return Poll::Ready(Ok(n)),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
            (r, None) => return Poll::Ready(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    async fn read(stream: &TcpStream, buf: &mut BytesMut) -> usize {
        let read = std::future::poll_fn(|cx| poll_read_into(stream, cx, buf, 4096));
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a read that should complete hung: a wake-up was lost")
            .unwrap()
    }

    /// Reads until `buf` holds `want` bytes.
    async fn read_up_to(stream: &TcpStream, buf: &mut BytesMut, want: usize) {
        while buf.len() < want {
            assert!(read(stream, buf).await > 0, "end of stream too early");
        }
    }

    /// After a short read has told tokio the socket is empty, what arrives later — more bytes,
    /// or the end of stream, also when it came with the last bytes — is still read, on either
    /// runtime flavor.
    async fn reads_after_a_short_read_still_wake_up() {
        let (mut writer, reader) = pair().await;
        let mut buf = BytesMut::new();
        writer.write_all(b"abc").await.unwrap();
        read_up_to(&reader, &mut buf, 3).await;
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(b"def").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The last bytes and the end of stream together.
            writer.write_all(b"ghi").await.unwrap();
            writer.shutdown().await.unwrap();
        });
        read_up_to(&reader, &mut buf, 9).await;
        late.await.unwrap();
        assert_eq!(read(&reader, &mut buf).await, 0, "the end of stream");
        assert_eq!(&buf[..], b"abcdefghi");
    }

    #[tokio::test]
    async fn on_a_current_thread_runtime() {
        reads_after_a_short_read_still_wake_up().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_thread_runtime() {
        for _ in 0..20 {
            reads_after_a_short_read_still_wake_up().await;
        }
    }
}
