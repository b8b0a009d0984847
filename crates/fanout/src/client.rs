//! A client of the hub that reconnects and resumes.
//!
//! [`Client::next`] drives everything: it connects (trying the configured
//! URLs in turn, with backoff), sends `hello`, re-subscribes every channel
//! from the last offset it delivered, and returns events. The caller sees
//! each message once, in order, across reconnects; a position the broker no
//! longer holds comes back as [`Event::Gap`], the caller's cue to reload.
//!
//! ```no_run
//! # async fn demo() -> Result<(), statehouse_fanout::client::ClientError> {
//! use statehouse_fanout::client::{Client, ClientConfig, Event};
//! let mut client = Client::new(
//!     ClientConfig::new(["ws://127.0.0.1:8081/ws", "ws://127.0.0.1:8082/ws"]).token("eyJ..."),
//! );
//! client.subscribe("orders.42");
//! loop {
//!     if let Event::Message(m) = client.next().await? {
//!         println!("{} #{}: {:?}", m.channel, m.offset, m.payload);
//!     }
//! }
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{
    ClientFrame, ServerFrame, close, decode_server_frame, encode_client_frame, message_payload,
};
use crate::{Message, Offset};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where to connect and how.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Hub URLs (`ws://host:port/path`); the client starts with the first
    /// and moves to the next after each lost connection.
    pub urls: Vec<String>,
    /// Sent in `hello`.
    pub token: Option<String>,
    /// The first retry delay after a failed connect; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            token: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
}

/// What [`Client::next`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Connected (or reconnected) to `url`, served by `instance`; the
    /// subscriptions are being resumed.
    Connected {
        url: String,
        instance: String,
    },
    /// A subscription is in place after offset `last` of `epoch`.
    Subscribed {
        channel: String,
        epoch: String,
        last: Offset,
    },
    /// The next message of a channel: never one seen before, never out of
    /// order.
    Message(Message),
    /// The broker no longer holds what came after this client's position
    /// (beyond retention, or the log was recreated): reload the state the
    /// channel describes; messages go on after `last`.
    Gap {
        channel: String,
        epoch: String,
        oldest: Offset,
        last: Offset,
    },
    Presence {
        channel: String,
        members: Vec<String>,
    },
    Pong,
    /// The connection ended (`code` and `reason` from the hub's close frame
    /// when it sent one); the next call reconnects.
    Disconnected {
        code: Option<u16>,
        reason: String,
    },
}

/// An error the client cannot get past by reconnecting.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub refused this client (bad frame, token refused or expired,
    /// forbidden channel, too many subscriptions); the code is in
    /// [`crate::protocol::close`].
    #[error("the hub closed the connection with {code}: {reason}")]
    Refused { code: u16, reason: String },
    #[error("no hub URL configured")]
    NoUrls,
}

#[derive(Debug, Clone)]
struct Position {
    last: Offset,
    epoch: String,
    /// Known once the hub said `subscribed` (or a message came).
    anchored: bool,
}

/// The client. One connection at a time; not shared between tasks.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    next_url: usize,
    url: String,
    socket: Option<Socket>,
    channels: BTreeMap<String, Position>,
    events: VecDeque<Event>,
    failures: u32,
    connects: u64,
}

impl Client {
    pub fn new(config: ClientConfig) -> Self {
        Client {
            config,
            next_url: 0,
            url: String::new(),
            socket: None,
            channels: BTreeMap::new(),
            events: VecDeque::new(),
            failures: 0,
            connects: 0,
        }
    }

    /// Starts the URL rotation at `index` (spreads many clients over hubs).
    pub fn start_at(mut self, index: usize) -> Self {
        self.next_url = index;
        self
    }

    /// Replaces the token, for the next connection.
    pub fn set_token(&mut self, token: impl Into<String>) {
        self.config.token = Some(token.into());
    }

    /// How many connections were made so far (1 + reconnects).
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Subscribes `channel` from now.
    pub async fn subscribe(&mut self, channel: &str) {
        self.channels.insert(
            channel.to_owned(),
            Position {
                last: 0,
                epoch: String::new(),
                anchored: false,
            },
        );
        self.send_sub(channel).await;
    }

    /// Subscribes `channel` after `offset` of `epoch` (a position saved
    /// earlier); `offset` 0 with an empty epoch is everything retained.
    pub async fn resume(&mut self, channel: &str, offset: Offset, epoch: &str) {
        self.channels.insert(
            channel.to_owned(),
            Position {
                last: offset,
                epoch: epoch.to_owned(),
                anchored: true,
            },
        );
        self.send_sub(channel).await;
    }

    pub async fn unsubscribe(&mut self, channel: &str) {
        if self.channels.remove(channel).is_some() {
            let frame = ClientFrame::Unsub { ch: channel.into() };
            self.send(&frame).await;
        }
    }

    /// Asks who is on `channel`; the answer comes as [`Event::Presence`].
    pub async fn presence(&mut self, channel: &str) {
        let frame = ClientFrame::Presence { ch: channel.into() };
        self.send(&frame).await;
    }

    /// The last offset delivered on `channel` and its epoch.
    pub fn position(&self, channel: &str) -> Option<(Offset, &str)> {
        self.channels
            .get(channel)
            .map(|p| (p.last, p.epoch.as_str()))
    }

    /// The next event, connecting or reconnecting as needed.
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let Some(socket) = self.socket.as_mut() else {
                self.connect().await?;
                continue;
            };
            let frame = socket.next().await;
            let text = match frame {
                Some(Ok(WsMessage::Text(text))) => text,
                Some(Ok(WsMessage::Close(frame))) => {
                    return self.lost(frame);
                }
                Some(Ok(_)) => continue, // pings are answered by tungstenite
                Some(Err(e)) => return Ok(self.dropped(e.to_string())),
                None => return Ok(self.dropped("connection closed".into())),
            };
            match decode_server_frame(&text) {
                Ok(frame) => {
                    if let Some(event) = self.on_frame(frame) {
                        return Ok(event);
                    }
                }
                // A hub speaking something else: drop it, try another.
                Err(e) => return Ok(self.dropped(e.0)),
            }
        }
    }

    /// The connection ended without a close frame; the next call reconnects.
    fn dropped(&mut self, reason: String) -> Event {
        self.socket = None;
        Event::Disconnected { code: None, reason }
    }

    fn lost(&mut self, frame: Option<CloseFrame>) -> Result<Event, ClientError> {
        self.socket = None;
        let (code, reason) = frame
            .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
            .unwrap_or((None, String::new()));
        if let Some(code) = code
            && !close::should_reconnect(code)
        {
            return Err(ClientError::Refused { code, reason });
        }
        Ok(Event::Disconnected { code, reason })
    }

    fn on_frame(&mut self, frame: ServerFrame) -> Option<Event> {
        match frame {
            ServerFrame::Welcome { instance, .. } => Some(Event::Connected {
                url: self.url.clone(),
                instance,
            }),
            ServerFrame::Subscribed { ch, epoch, last } => {
                let position = self.channels.get_mut(&ch)?;
                if !position.anchored {
                    *position = Position {
                        last,
                        epoch: epoch.clone(),
                        anchored: true,
                    };
                }
                Some(Event::Subscribed {
                    channel: ch,
                    epoch,
                    last,
                })
            }
            ServerFrame::Msg {
                ch,
                off,
                ep,
                data,
                b64,
            } => {
                let position = self.channels.get_mut(&ch)?;
                // The hub never repeats itself within a connection; across
                // connections this keeps the promise even if one did.
                if position.anchored && position.epoch == ep && off <= position.last {
                    return None;
                }
                let payload = message_payload(data, b64).ok()?;
                *position = Position {
                    last: off,
                    epoch: ep.clone(),
                    anchored: true,
                };
                Some(Event::Message(Message {
                    channel: ch,
                    offset: off,
                    epoch: ep,
                    payload,
                }))
            }
            ServerFrame::Gap {
                ch,
                epoch,
                oldest,
                last,
            } => {
                let position = self.channels.get_mut(&ch)?;
                *position = Position {
                    last,
                    epoch: epoch.clone(),
                    anchored: true,
                };
                Some(Event::Gap {
                    channel: ch,
                    epoch,
                    oldest,
                    last,
                })
            }
            ServerFrame::Presence { ch, members } => Some(Event::Presence {
                channel: ch,
                members,
            }),
            ServerFrame::Pong => Some(Event::Pong),
            ServerFrame::Reconnect { .. } => None, // the close frame follows
        }
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        if self.config.urls.is_empty() {
            return Err(ClientError::NoUrls);
        }
        loop {
            if self.failures > 0 {
                let exp = self.config.backoff_min * 2u32.saturating_pow(self.failures.min(10) - 1);
                let delay = exp.min(self.config.backoff_max);
                let jitter = delay.mul_f64(fastrand_fraction());
                tokio::time::sleep(delay / 2 + jitter / 2).await;
            }
            let url = self.config.urls[self.next_url % self.config.urls.len()].clone();
            self.next_url = (self.next_url + 1) % self.config.urls.len();
            match self.open(&url).await {
                Ok(socket) => {
                    // Assigned only once hello and every subscription are
                    // sent, so a `next` cancelled mid-connect (it sits in a
                    // select) never leaves a connection without them.
                    self.socket = Some(socket);
                    self.url = url;
                    self.failures = 0;
                    self.connects += 1;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(%url, error = %e, "fan-out connect failed");
                    self.failures += 1;
                }
            }
        }
    }

    /// Connects to `url` and sends `hello` and every subscription.
    async fn open(&self, url: &str) -> Result<Socket, String> {
        // tungstenite's default 128 KiB read buffer per client adds up in a
        // load test of thousands; hub frames are small.
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
        let (mut socket, _) = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let hello = ClientFrame::Hello {
            token: self.config.token.clone(),
        };
        let frames =
            std::iter::once(hello).chain(self.channels.keys().filter_map(|c| self.sub_frame(c)));
        for frame in frames {
            socket
                .feed(WsMessage::text(encode_client_frame(&frame)))
                .await
                .map_err(|e| e.to_string())?;
        }
        socket.flush().await.map_err(|e| e.to_string())?;
        Ok(socket)
    }

    /// `sub` from this client's position on `channel`: a resume when it
    /// has one, from now otherwise.
    fn sub_frame(&self, channel: &str) -> Option<ClientFrame> {
        let position = self.channels.get(channel)?;
        Some(if position.anchored {
            ClientFrame::Sub {
                ch: channel.into(),
                after: Some(position.last),
                epoch: (!position.epoch.is_empty()).then(|| position.epoch.clone()),
            }
        } else {
            ClientFrame::Sub {
                ch: channel.into(),
                after: None,
                epoch: None,
            }
        })
    }

    async fn send_sub(&mut self, channel: &str) {
        if let Some(frame) = self.sub_frame(channel) {
            self.send(&frame).await;
        }
    }

    /// Sends if connected; a failure shows up as a disconnect on the next
    /// read, and the reconnect re-sends every subscription.
    async fn send(&mut self, frame: &ClientFrame) {
        if let Some(socket) = self.socket.as_mut() {
            let _ = socket
                .send(WsMessage::text(encode_client_frame(frame)))
                .await;
        }
    }
}

/// A number in [0, 1) for jitter, without a random-number dependency.
fn fastrand_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX) * 0.999
}
