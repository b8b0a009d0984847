//! Just enough of the Redis protocol (RESP2) to ask a server PING, INFO, ROLE and CLUSTER
//! questions without depending on a Redis client crate.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text, for simple and bulk strings.
    pub(crate) fn text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// Sends one command on a fresh connection and reads its reply.
pub(crate) fn command(addr: SocketAddr, args: &[&str], timeout: Duration) -> io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    stream.write_all(&request)?;
    read_reply(&mut BufReader::new(stream))
}

/// Like [`command`], but a RESP error reply or unreadable text becomes an `Err` describing it.
pub(crate) fn text_command(
    addr: SocketAddr,
    args: &[&str],
    timeout: Duration,
) -> Result<String, String> {
    match command(addr, args, timeout) {
        Ok(Reply::Error(e)) => Err(format!("{addr} answered {args:?} with error {e}")),
        Ok(reply) => reply
            .text()
            .ok_or_else(|| format!("{addr} answered {args:?} with {reply:?}, expected text")),
        Err(e) => Err(format!("{addr} {args:?}: {e}")),
    }
}

fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| bad("empty reply line"))?;
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| bad("bad length or integer"))
    };
    Ok(match kind {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Integer(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body)?;
                body.truncate(len);
                Reply::Bulk(Some(body))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(len) => Reply::Array(Some(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<io::Result<_>>()?,
            )),
        },
        _ => return Err(bad("unknown reply type")),
    })
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed RESP: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_replies() {
        let wire = b"*3\r\n$6\r\nmaster\r\n:42\r\n*1\r\n+OK\r\n";
        let reply = read_reply(&mut &wire[..]).unwrap();
        assert_eq!(
            reply,
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"master".to_vec())),
                Reply::Integer(42),
                Reply::Array(Some(vec![Reply::Simple("OK".into())])),
            ]))
        );
        assert_eq!(read_reply(&mut &b"$-1\r\n"[..]).unwrap(), Reply::Bulk(None));
        assert_eq!(
            read_reply(&mut &b"-ERR no\r\n"[..]).unwrap(),
            Reply::Error("ERR no".into())
        );
    }
}
