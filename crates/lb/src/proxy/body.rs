//! Bodies on both sides of the proxy.
//!
//! [`UpstreamBody`] is what an instance receives: empty, buffered (replayable), or the client's
//! stream *lent* through a slot. A lent body is taken from its slot only when the connection to
//! the instance first polls it; if the attempt failed before that (the connection could not be
//! made), the body is still in the slot and can be lent to the next attempt. That is the
//! "provably never sent" of the retry rule, for bodies that are not buffered.
//!
//! [`ProxyBody`] is what the client receives; it holds the in-flight guards until its last byte,
//! so a drain waits for responses still streaming.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::discovery::InFlight;
use crate::proxy::upstream::{Lent, RawBody};
use crate::proxy::{BoxError, ConnRequest};

/// The client's body as the source of each attempt's body.
#[derive(Debug)]
pub(crate) enum BodySource {
    /// Buffered (or empty): every attempt gets a copy.
    Full(Bytes),
    /// Streamed once; available again only if no attempt ever polled it.
    Lent {
        slot: Arc<Mutex<Option<Incoming>>>,
        hint: SizeHint,
    },
}

impl BodySource {
    pub(crate) fn streamed(body: Incoming) -> Self {
        let hint = body.size_hint();
        Self::Lent {
            slot: Arc::new(Mutex::new(Some(body))),
            hint,
        }
    }

    pub(crate) fn is_replayable(&self) -> bool {
        matches!(self, Self::Full(_))
    }

    /// A body for the next attempt, or `None` if the stream is gone (an attempt started it).
    pub(crate) fn next(&self) -> Option<UpstreamBody> {
        match self {
            Self::Full(b) => Some(UpstreamBody::Full(Some(b.clone()))),
            Self::Lent { slot, hint } => {
                let present = slot.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                present.then(|| UpstreamBody::Lent {
                    slot: Arc::clone(slot),
                    taken: None,
                    hint: *hint,
                })
            }
        }
    }
}

/// A request body sent to an instance.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    Full(Option<Bytes>),
    Lent {
        slot: Arc<Mutex<Option<Incoming>>>,
        taken: Option<Incoming>,
        hint: SizeHint,
    },
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Self::Lent { slot, taken, .. } => {
                if taken.is_none() {
                    // First poll: from here on the body may have left; the slot is empty, and
                    // no later attempt can have it.
                    *taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                match taken {
                    Some(b) => Pin::new(b).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Self::Lent { taken: Some(b), .. } => b.is_end_stream(),
            Self::Lent { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Lent { hint, .. } => *hint,
        }
    }
}

/// A response body sent to the client.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// Released after the last byte, a failure (counted as the instance's error), or when the
    /// client goes away.
    guards: Option<Guards>,
}

/// What a response body holds until its last byte: the instance's in-flight count, the client
/// connection's, and a hyper connection lent to the exchange.
pub(crate) type Guards = (InFlight, ConnRequest, Option<Lent>);

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
    Raw(RawBody),
}

impl ProxyBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Full(Some(b.into())),
            guards: None,
        }
    }

    /// A body from hyper's connection to the instance.
    pub(crate) fn upstream(b: Incoming, guards: Guards) -> Self {
        Self {
            kind: Kind::Upstream(b),
            guards: Some(guards),
        }
    }

    /// A body of the in-task exchange: bytes already read, or the rest still on the connection.
    pub(crate) fn raw(b: crate::proxy::upstream::RawResponseBody, guards: Guards) -> Self {
        use crate::proxy::upstream::RawResponseBody;
        Self {
            kind: match b {
                RawResponseBody::Whole(b) => Kind::Full(Some(b)),
                RawResponseBody::Streaming(b) => Kind::Raw(b),
            },
            guards: Some(guards),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Kind::Upstream(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            Kind::Raw(b) => b.poll_frame(cx),
        };
        match &r {
            Poll::Ready(None) => this.guards = None,
            Poll::Ready(Some(Err(_))) => {
                // The instance's body broke off: a failed attempt, though its head was fine.
                if let Some((in_flight, _, _)) = &this.guards {
                    crate::metrics::inc(&in_flight.backend().metrics.errors);
                }
                this.guards = None;
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Raw(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(b) => b.size_hint(),
            Kind::Raw(b) => b.size_hint(),
        }
    }
}
