//! Arbitrary bytes as what an instance answers, through the in-task exchange's response
//! reading (`proxy::h1`): the head (with `1xx` heads before it), then the body by its framing.
//! Must hold for every input:
//! - no panic;
//! - the same head, body, trailers and error however the bytes are split across reads;
//! - a `Content-Length` body is exactly that long, or an error;
//! - a connection is only reusable when the body's end is known without the connection closing.
#![no_main]

use bytes::BytesMut;
use http::{HeaderMap, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use statehouse_lb::proxy::h1::{BodyDecoder, Decoded, Framing, H1Error, read_response_head};

#[derive(Debug, PartialEq)]
struct Read {
    status: Option<StatusCode>,
    framing: Option<Framing>,
    reusable: bool,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    error: Option<H1Error>,
}

/// Feeds `data` `piece` bytes at a time, as reads from the instance would bring it.
fn read(data: &[u8], method: &Method, piece: usize) -> Read {
    let mut out = Read {
        status: None,
        framing: None,
        reusable: false,
        body: Vec::new(),
        trailers: None,
        error: None,
    };
    let mut pieces = data.chunks(piece.max(1));
    let mut buf = BytesMut::new();
    let head = loop {
        match read_response_head(&mut buf, method) {
            Ok(Some(h)) => break h,
            Ok(None) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => {
                    out.error = Some(H1Error::Truncated);
                    return out;
                }
            },
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
    };
    assert!(!head.status.is_informational());
    if head.reusable {
        assert_ne!(head.framing, Framing::UntilClose);
    }
    out.status = Some(head.status);
    out.framing = Some(head.framing);
    out.reusable = head.reusable;
    let mut decoder = BodyDecoder::new(head.framing);
    loop {
        let step = match decoder.decode(&mut buf) {
            Ok(Decoded::NeedMore) => match pieces.next() {
                Some(p) => {
                    buf.extend_from_slice(p);
                    continue;
                }
                None => decoder.eof(),
            },
            step => step,
        };
        match step {
            Ok(Decoded::Data(b)) => {
                assert!(!b.is_empty(), "an empty data frame");
                out.body.extend_from_slice(&b);
            }
            Ok(Decoded::Trailers(t)) => {
                assert!(decoder.is_done());
                out.trailers = Some(t);
            }
            Ok(Decoded::End) => break,
            Ok(Decoded::NeedMore) => unreachable!("handled above"),
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
    }
    if let Framing::Length(n) = head.framing {
        assert_eq!(out.body.len() as u64, n);
    }
    if head.framing == Framing::Empty {
        assert!(out.body.is_empty());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (method, data) = match data.split_first() {
        Some((&b, rest)) if b % 2 == 0 => (Method::HEAD, rest),
        Some((_, rest)) => (Method::GET, rest),
        None => (Method::GET, data),
    };
    let whole = read(data, &method, data.len());
    for piece in [1, 7] {
        assert_eq!(read(data, &method, piece), whole, "pieces of {piece} changed the result");
    }
});
