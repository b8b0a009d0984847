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
        let offered = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(n) if n > 0 && n < offered => {
                forget_readable(stream);
                return Poll::Ready(Ok(n));
            }
            r => return Poll::Ready(r),
        }
    }
}

/// Tells tokio that `stream` has nothing more to read, after a read that returned less than it
/// was offered (so it took everything the socket held), as nginx does. Without this tokio
/// keeps the socket marked readable until a read fails with `EAGAIN`: one wasted system call
/// per message on each side of a request (the client's next request, the instance's next
/// answer), a sixth of the balancer's system calls.
///
/// Only on a current-thread runtime, where the lb's workers serve every connection: there the
/// I/O driver cannot run between the read and this, so no readiness event that came after the
/// read can be the one cleared. (A readiness event that came before it is for bytes the read
/// took.) A peer's end of stream is never cleared: tokio keeps "read closed" set.
fn forget_readable(stream: &TcpStream) {
    let single_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if single_thread {
        // The closure reports `WouldBlock` without a system call; `try_io` then clears the
        // readiness it saw.
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
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

    /// After a short read has told tokio the socket is empty, what arrives later — more bytes,
    /// or the end of stream, also when it came with the last bytes — is still read.
    #[tokio::test]
    async fn reads_after_a_short_read_still_wake_up() {
        assert_eq!(
            tokio::runtime::Handle::current().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread,
            "the case forget_readable acts in"
        );
        let (mut writer, reader) = pair().await;
        let mut buf = BytesMut::new();
        writer.write_all(b"abc").await.unwrap();
        assert_eq!(read(&reader, &mut buf).await, 3);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(b"def").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The last bytes and the end of stream together.
            writer.write_all(b"ghi").await.unwrap();
            writer.shutdown().await.unwrap();
        });
        assert_eq!(read(&reader, &mut buf).await, 3);
        late.await.unwrap();
        assert_eq!(read(&reader, &mut buf).await, 3);
        assert_eq!(read(&reader, &mut buf).await, 0, "the end of stream");
        assert_eq!(&buf[..], b"abcdefghi");
    }
}
