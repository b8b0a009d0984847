//! The broker trait, its types and errors, shared by every backend.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// A message's position in its channel: 1 for the first, then +1 each,
/// never reused within an epoch. 0 means "before the first".
pub type Offset = u64;

/// How much of each channel's log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// At most this many messages per channel (the oldest go first).
    pub max_messages: u64,
    /// Messages older than this are gone.
    pub max_age: Duration,
}

impl Default for Retention {
    /// 10,000 messages or one hour, whichever is less.
    fn default() -> Self {
        Retention {
            max_messages: 10_000,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// Which broker, and its limits.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub url: String,
    pub retention: Retention,
    /// The largest payload accepted.
    pub max_payload_bytes: usize,
    /// Prepended to every key (Redis), so brokers can share a server.
    pub prefix: String,
}

impl BrokerConfig {
    /// Default retention and a 64 KiB payload limit.
    pub fn new(url: impl Into<String>) -> Self {
        BrokerConfig {
            url: url.into(),
            retention: Retention::default(),
            max_payload_bytes: 64 * 1024,
            prefix: String::new(),
        }
    }

    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }
}

/// One message as a subscriber receives it.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: String,
    pub offset: Offset,
    pub epoch: String,
    pub payload: Bytes,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("channel", &self.channel)
            .field("offset", &self.offset)
            .field("epoch", &self.epoch)
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// Where a published message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: Offset,
    pub epoch: String,
}

/// What a read returns: the messages after the offset asked for (oldest
/// first), and where the channel stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The channel's epoch; empty while nothing was ever published to it.
    pub epoch: String,
    pub messages: Vec<Message>,
    /// The newest offset in the channel (0 if none was ever published).
    pub last: Offset,
}

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("channel {0:?}: a channel name is 1 to 128 of A-Z a-z 0-9 _ - . :")]
    InvalidChannel(String),
    #[error("a message of {size} bytes is over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The messages after `after` are no longer all there (retention), or
    /// the offset belongs to another epoch: the subscriber cannot resume and
    /// must reload, then continue from `last` in `epoch`.
    #[error(
        "channel {channel}: cannot resume after offset {after} (epoch {asked:?}); the log is at epoch {epoch}, oldest retained offset {oldest}, newest {last}"
    )]
    Gap {
        channel: String,
        after: Offset,
        asked: Option<String>,
        epoch: String,
        oldest: Offset,
        last: Offset,
    },
    /// The broker could not be reached in time: nothing was published.
    #[error("broker {broker} is unavailable: {detail}")]
    Unavailable { broker: String, detail: String },
    #[error("broker configuration: {0}")]
    Config(String),
    /// Stored data this version cannot read.
    #[error("broker {broker}: corrupt data: {detail}")]
    Corrupt { broker: String, detail: String },
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Checks a channel name: 1 to 128 of `A-Z a-z 0-9 _ - . :`.
pub fn check_channel(channel: &str) -> Result<()> {
    let ok = !channel.is_empty()
        && channel.len() <= 128
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidChannel(
            channel.chars().take(140).collect(),
        ))
    }
}

impl BrokerConfig {
    /// What every backend checks before publishing: the channel name and
    /// the payload size.
    pub(crate) fn check_publish(&self, channel: &str, payload: &[u8]) -> Result<()> {
        check_channel(channel)?;
        if payload.len() > self.max_payload_bytes {
            return Err(BrokerError::TooLarge {
                size: payload.len(),
                limit: self.max_payload_bytes,
            });
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch (publish times, retention by age,
/// presence expiry).
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new random epoch: 16 hex digits.
pub fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    // The OS random source failing is not recoverable here; a time-based
    // epoch is still unique enough to tell logs apart.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = nanos.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decides a read against the log's state: `Ok(())` when the messages
/// after `after` are all retained in `epoch`, else the [`BrokerError::Gap`]
/// to return. `oldest` is the oldest retained offset (`last + 1` when
/// nothing is retained).
pub(crate) fn check_resume(
    channel: &str,
    after: Offset,
    asked: Option<&str>,
    epoch: &str,
    oldest: Offset,
    last: Offset,
) -> Result<()> {
    // A channel nobody has published to has the empty epoch; a reader that
    // saw it may have seen no offset either, so it matches any log at 0.
    let asked = asked.filter(|a| !a.is_empty());
    let other_epoch = asked.is_some_and(|a| a != epoch);
    // `after == 0` with no epoch is a fresh reader: it takes what is kept.
    let fresh = after == 0 && asked.is_none();
    // An offset means nothing without the epoch it came from.
    let unanchored = after > 0 && asked.is_none();
    let lost = !fresh && after + 1 < oldest;
    let ahead = after > last;
    if other_epoch || unanchored || lost || ahead {
        return Err(BrokerError::Gap {
            channel: channel.to_owned(),
            after,
            asked: asked.map(str::to_owned),
            epoch: epoch.to_owned(),
            oldest,
            last,
        });
    }
    Ok(())
}

/// What a read of a channel nobody has published to returns: an empty batch
/// in the empty epoch (the first publish chooses the real one), or the
/// [`BrokerError::Gap`] for a reader that claims an offset in it.
pub(crate) fn no_log(channel: &str, after: Offset, asked: Option<&str>) -> Result<Batch> {
    check_resume(channel, after, asked, "", 1, 0)?;
    Ok(Batch {
        epoch: String::new(),
        messages: Vec::new(),
        last: 0,
    })
}

/// An ordered, retained log per channel.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug {
    /// What the broker is, for messages (never a password).
    fn describe(&self) -> &str;

    /// Appends `payload` to `channel`'s log. `Ok` only once the message is
    /// stored: a message is never acknowledged and then lost by the broker.
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published>;

    /// The messages with an offset above `after`, oldest first, at most
    /// `limit`. `epoch` is the epoch `after` belongs to (`None` only for a
    /// reader starting fresh at 0). Fails with [`BrokerError::Gap`] when
    /// those messages are not all retained, or `after` comes without its
    /// epoch, from another epoch, or beyond the newest offset.
    async fn read(
        &self,
        channel: &str,
        after: Offset,
        epoch: Option<&str>,
        limit: usize,
    ) -> Result<Batch>;

    /// Resolves when `channel` may hold messages above `after`, or when
    /// `timeout` has passed. May resolve early; callers read and wait again.
    async fn wait(&self, channel: &str, after: Offset, timeout: Duration) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for ok in ["a", "orders.42", "user:7_x-y", &"c".repeat(128)] {
            assert!(check_channel(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"c".repeat(129), "a\0"] {
            assert!(check_channel(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resume_rules() {
        let ok = |after, asked: Option<&str>, oldest, last| {
            check_resume("c", after, asked, "e1", oldest, last).is_ok()
        };
        assert!(ok(0, None, 5, 9), "fresh readers take what is kept");
        assert!(ok(4, Some("e1"), 5, 9), "exactly the gap");
        assert!(ok(9, Some("e1"), 10, 9), "up to date, nothing kept");
        assert!(!ok(3, Some("e1"), 5, 9), "offset 4 is gone");
        assert!(!ok(4, Some("e0"), 5, 9), "another epoch");
        assert!(!ok(4, None, 1, 9), "an offset without its epoch");
        assert!(!ok(10, Some("e1"), 5, 9), "beyond the newest");
        assert!(!ok(0, Some("e0"), 1, 0), "an old epoch at 0");
        assert!(ok(0, Some("e1"), 1, 0), "the same epoch at 0");
        assert!(ok(0, Some(""), 1, 0), "the empty epoch of a new channel");
        assert_eq!(new_epoch().len(), 16);
        assert_ne!(new_epoch(), new_epoch());
    }
}
