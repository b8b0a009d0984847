//! The wire protocol between the hub and its clients, `statehouse-fanout/1`:
//! one JSON object per WebSocket text frame.
//!
//! Client to server (`op`):
//!
//! | frame | meaning |
//! |---|---|
//! | `{"op":"hello","token":"…"}` | first frame, always; the token is optional when the app authenticates by cookie |
//! | `{"op":"sub","ch":"orders.7"}` | subscribe from now |
//! | `{"op":"sub","ch":"orders.7","after":12,"epoch":"9f…"}` | resume: everything after offset 12 of that epoch |
//! | `{"op":"unsub","ch":"orders.7"}` | stop |
//! | `{"op":"presence","ch":"orders.7"}` | who is subscribed, on every instance |
//! | `{"op":"ping"}` | answered by `{"t":"pong"}` (for clients that cannot send WebSocket pings) |
//!
//! Server to client (`t`):
//!
//! | frame | meaning |
//! |---|---|
//! | `{"t":"welcome","conn":"…","instance":"app-2"}` | hello accepted |
//! | `{"t":"subscribed","ch":…,"epoch":…,"last":N}` | the subscription starts after offset N of that epoch |
//! | `{"t":"msg","ch":…,"off":N,"ep":…,"data":"…"}` | a message; `b64` instead of `data` when the payload is not UTF-8 |
//! | `{"t":"gap","ch":…,"epoch":…,"oldest":N,"last":M}` | cannot recover: reload, the subscription goes on after M |
//! | `{"t":"presence","ch":…,"members":[…]}` | answer to `presence` |
//! | `{"t":"reconnect","reason":"draining"}` | then close 1012: connect to another instance and resume |
//!
//! Every close the hub starts carries one of the codes in [`close`] and a
//! reason a person can read.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Message, Offset, check_channel};

/// The protocol's name, sent by clients as the WebSocket subprotocol.
pub const PROTOCOL: &str = "statehouse-fanout.v1";

/// Close codes. 1000–1015 are RFC 6455's; 4000–4999 are ours.
pub mod close {
    /// The instance is draining or stopping: reconnect elsewhere and resume.
    pub const RECONNECT: u16 = 1012;
    /// The broker could not be read: reconnect (anywhere) and resume.
    pub const BROKER_UNAVAILABLE: u16 = 1011;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// A frame that is not part of the protocol. Do not retry as is.
    pub const BAD_FRAME: u16 = 4400;
    /// No token, a bad one, or an expired one. Reconnect with a fresh token.
    pub const UNAUTHORIZED: u16 = 4401;
    /// A channel this identity may not subscribe to, or an invalid name.
    pub const FORBIDDEN: u16 = 4403;
    /// The connection fell behind its queue: reconnect and resume from the
    /// last offset seen; nothing is lost.
    pub const SLOW_CONSUMER: u16 = 4408;
    /// Over the subscriptions-per-connection limit.
    pub const TOO_MANY_SUBSCRIPTIONS: u16 = 4429;

    /// Whether a client should reconnect after this code (with the same
    /// token), rather than report an error to its owner.
    pub fn should_reconnect(code: u16) -> bool {
        !matches!(
            code,
            BAD_FRAME | UNAUTHORIZED | FORBIDDEN | TOO_MANY_SUBSCRIPTIONS
        )
    }
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ClientFrame {
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Sub {
        ch: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Offset>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    Unsub {
        ch: String,
    },
    Presence {
        ch: String,
    },
    Ping,
}

/// Why a frame was refused; the text goes into the close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub String);

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FrameError {}

/// The longest epoch string accepted from a client (ours are 16 hex digits).
const MAX_EPOCH_BYTES: usize = 64;

/// Parses and checks a client frame: known `op`, valid channel names, sane
/// epochs. Never panics, whatever the input (fuzzed: `fuzz/fanout_frame`).
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let frame: ClientFrame = serde_json::from_str(text).map_err(|e| {
        FrameError(format!(
            "not a statehouse-fanout frame ({e}); expected a JSON object with \"op\": hello, sub, unsub, presence or ping"
        ))
    })?;
    match &frame {
        ClientFrame::Sub { ch, epoch, .. } => {
            check_channel(ch).map_err(|e| FrameError(e.to_string()))?;
            if epoch.as_ref().is_some_and(|e| e.len() > MAX_EPOCH_BYTES) {
                return Err(FrameError(format!(
                    "an epoch is at most {MAX_EPOCH_BYTES} bytes"
                )));
            }
        }
        ClientFrame::Unsub { ch } | ClientFrame::Presence { ch } => {
            check_channel(ch).map_err(|e| FrameError(e.to_string()))?;
        }
        ClientFrame::Hello { .. } | ClientFrame::Ping => {}
    }
    Ok(frame)
}

/// A client frame's JSON text.
pub fn encode_client_frame(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("client frames always serialize")
}

/// A frame the server sends, as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum ServerFrame {
    Welcome {
        conn: String,
        instance: String,
    },
    Subscribed {
        ch: String,
        epoch: String,
        last: Offset,
    },
    Msg {
        ch: String,
        off: Offset,
        ep: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        b64: Option<String>,
    },
    Gap {
        ch: String,
        epoch: String,
        oldest: Offset,
        last: Offset,
    },
    Presence {
        ch: String,
        members: Vec<String>,
    },
    Pong,
    Reconnect {
        reason: String,
    },
}

impl ServerFrame {
    /// The frame's JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    /// The frame that carries `message`: `data` when the payload is UTF-8,
    /// `b64` otherwise.
    pub fn message(message: &Message) -> ServerFrame {
        let (data, b64) = match std::str::from_utf8(&message.payload) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(B64.encode(&message.payload))),
        };
        ServerFrame::Msg {
            ch: message.channel.clone(),
            off: message.offset,
            ep: message.epoch.clone(),
            data,
            b64,
        }
    }
}

/// Parses a server frame (the client's side); a `msg` comes back as a
/// [`Message`].
pub fn decode_server_frame(text: &str) -> Result<ServerFrame, FrameError> {
    serde_json::from_str(text).map_err(|e| FrameError(format!("not a server frame: {e}")))
}

/// The payload a `msg` frame carries.
pub fn message_payload(data: Option<String>, b64: Option<String>) -> Result<Bytes, FrameError> {
    match (data, b64) {
        (Some(text), None) => Ok(Bytes::from(text)),
        (None, Some(encoded)) => B64
            .decode(encoded)
            .map(Bytes::from)
            .map_err(|e| FrameError(format!("msg: b64 is not base64: {e}"))),
        _ => Err(FrameError(
            "msg: exactly one of data and b64 is expected".into(),
        )),
    }
}

/// Encodes a message once, for every subscriber it goes to.
#[cfg(feature = "hub")]
pub(crate) fn encode_message(message: &Message) -> String {
    ServerFrame::message(message).encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_round_trip() {
        for frame in [
            ClientFrame::Hello {
                token: Some("t".into()),
            },
            ClientFrame::Hello { token: None },
            ClientFrame::Sub {
                ch: "orders.7".into(),
                after: Some(12),
                epoch: Some("9f".into()),
            },
            ClientFrame::Sub {
                ch: "a".into(),
                after: None,
                epoch: None,
            },
            ClientFrame::Unsub { ch: "a".into() },
            ClientFrame::Presence { ch: "a".into() },
            ClientFrame::Ping,
        ] {
            let text = serde_json::to_string(&frame).unwrap();
            assert_eq!(decode_client_frame(&text).unwrap(), frame, "{text}");
        }
    }

    #[test]
    fn bad_client_frames_are_refused_with_a_reason() {
        for bad in [
            "",
            "null",
            "[]",
            "{}",
            r#"{"op":"launch"}"#,
            r#"{"op":"sub"}"#,
            r#"{"op":"sub","ch":""}"#,
            r#"{"op":"sub","ch":"a b"}"#,
            r#"{"op":"sub","ch":"a","after":-1}"#,
            r#"{"op":"sub","ch":"a","after":"7"}"#,
            r#"{"op":"sub","ch":"a","after":1e400}"#,
            r#"{"op":"unsub","ch":"é"}"#,
            "{\"op\":\"hello\",\"token\":\"\u{0}\"",
        ] {
            let err = decode_client_frame(bad).unwrap_err();
            assert!(!err.0.is_empty(), "{bad:?}");
        }
        let long_epoch = format!(
            r#"{{"op":"sub","ch":"a","after":1,"epoch":"{}"}}"#,
            "e".repeat(65)
        );
        assert!(decode_client_frame(&long_epoch).is_err());
    }

    #[test]
    fn messages_encode_text_and_binary_payloads() {
        let text = Message {
            channel: "c".into(),
            offset: 3,
            epoch: "e".into(),
            payload: Bytes::from_static(b"{\"status\":\"paid\"}"),
        };
        let frame = decode_server_frame(&ServerFrame::message(&text).encode()).unwrap();
        let ServerFrame::Msg { data, b64, off, .. } = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(off, 3);
        assert_eq!(message_payload(data, b64).unwrap(), text.payload);

        let binary = Message {
            payload: Bytes::from_static(&[0xff, 0, 1]),
            ..text
        };
        let ServerFrame::Msg { data, b64, .. } =
            decode_server_frame(&ServerFrame::message(&binary).encode()).unwrap()
        else {
            panic!()
        };
        assert!(data.is_none());
        assert_eq!(message_payload(data, b64).unwrap(), binary.payload);
    }
}
