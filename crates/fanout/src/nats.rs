//! NATS JetStream: one stream per channel.
//!
//! A stream's sequence numbers are contiguous per stream, so a stream per
//! channel gives each channel its own offsets 1, 2, 3… with no holes — the
//! property resume depends on. (One stream for every channel would number
//! messages across channels, and a client could not tell a gap from
//! another channel's traffic.) The stream's creation time is the epoch: a
//! stream deleted and recreated starts a new log.
//!
//! Streams are created (idempotently) before a process's first publish to them, with the broker's retention
//! (`max_msgs`, `max_age`, discard old, file storage, direct get allowed).
//! Reads take the stream's state (one request) and then the wanted
//! sequences by direct get, pipelined on the one connection. `wait`
//! subscribes to the channel's subject: a JetStream publish is also
//! delivered to plain subscribers, so a waiter wakes as soon as NATS has the
//! message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::broker::no_log;
use crate::{
    Batch, Broker, BrokerConfig, BrokerError, Message, Offset, Published, Result, check_channel,
};

/// Requests to JetStream fail after this (the client's default is 5 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Direct gets in flight per read.
const PIPELINE: usize = 32;

#[derive(Debug)]
pub(crate) struct NatsBroker {
    config: BrokerConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Epochs of the streams this broker has seen, by stream name.
    epochs: Mutex<HashMap<String, String>>,
}

/// The state of one channel's stream.
struct Log {
    epoch: String,
    oldest: Offset,
    last: Offset,
}

impl NatsBroker {
    pub(crate) async fn open(config: BrokerConfig) -> Result<NatsBroker> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(config.url.as_str())
            .await
            .map_err(|e| BrokerError::Unavailable {
                broker: config.url.clone(),
                detail: e.to_string(),
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        Ok(NatsBroker {
            config,
            client,
            js,
            epochs: Mutex::default(),
        })
    }

    fn down(&self, detail: impl std::fmt::Display) -> BrokerError {
        BrokerError::Unavailable {
            broker: self.config.url.clone(),
            detail: detail.to_string(),
        }
    }

    /// The stream's name: the prefix and channel with every byte outside
    /// `[A-Za-z0-9-]` escaped as `_XX` (so distinct channels never share a
    /// stream), shortened with a hash past 200 bytes.
    fn stream_name(&self, channel: &str) -> String {
        let mut name = String::from("FANOUT_");
        for b in self
            .config
            .prefix
            .bytes()
            .chain([b'/'])
            .chain(channel.bytes())
        {
            if b.is_ascii_alphanumeric() || b == b'-' {
                name.push(b as char);
            } else {
                name.push_str(&format!("_{b:02X}"));
            }
        }
        if name.len() > 200 {
            let hash = fnv1a(name.as_bytes());
            name.truncate(180);
            name.push_str(&format!("_{hash:016x}"));
        }
        name
    }

    fn subject(stream: &str) -> String {
        format!("statehouse.fanout.{stream}")
    }

    fn cached_epoch(&self, stream: &str) -> Option<String> {
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .cloned()
    }

    fn remember(&self, stream: &str, epoch: &str) {
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stream.to_owned(), epoch.to_owned());
    }

    fn forget(&self, stream: &str) {
        self.epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
    }

    async fn create(&self, stream: &str) -> Result<String> {
        let retention = self.config.retention;
        let config = stream::Config {
            name: stream.to_owned(),
            subjects: vec![Self::subject(stream)],
            max_messages: i64::try_from(retention.max_messages).unwrap_or(i64::MAX),
            max_age: retention.max_age,
            // JetStream requires the de-duplication window within max_age.
            duplicate_window: retention.max_age.min(Duration::from_secs(120)),
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        let info = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.down(format!("creating stream {stream}: {e}")))?
            .cached_info()
            .clone();
        let epoch = epoch_of(&info);
        self.remember(stream, &epoch);
        Ok(epoch)
    }

    /// The stream's state, or `None` when it does not exist.
    async fn log(&self, stream: &str) -> Result<Option<(Log, stream::Stream<()>)>> {
        let handle = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| self.down(e))?;
        match handle.get_info().await {
            Ok(info) => {
                let epoch = epoch_of(&info);
                self.remember(stream, &epoch);
                let log = Log {
                    epoch,
                    oldest: info.state.first_sequence.max(1),
                    last: info.state.last_sequence,
                };
                Ok(Some((log, handle)))
            }
            Err(e) if is_stream_not_found(&e) => Ok(None),
            Err(e) => Err(self.down(e)),
        }
    }
}

fn epoch_of(info: &stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos())
}

fn is_stream_not_found(e: &impl std::fmt::Display) -> bool {
    // JetStream's "stream not found" is API error 10059 (status 404).
    let text = e.to_string();
    text.contains("10059") || text.contains("stream not found")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[async_trait]
impl Broker for NatsBroker {
    fn describe(&self) -> &str {
        &self.config.url
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.config.check_publish(channel, &payload)?;
        let stream = self.stream_name(channel);
        // The stream must exist before the publish: a hub's waiter
        // subscribes to the subject, and a publish with no stream would go
        // to it alone and never be acknowledged.
        let epoch = match self.cached_epoch(&stream) {
            Some(epoch) => epoch,
            None => self.create(&stream).await?,
        };
        let ack = self
            .js
            .publish(Self::subject(&stream), payload)
            .await
            .map_err(|e| self.down(e))?
            .await;
        match ack {
            Ok(ack) => Ok(Published {
                offset: ack.sequence,
                epoch,
            }),
            // Not acknowledged: the message may or may not be stored; the
            // caller must not count it as sent. The stream is looked up
            // again next time (it may have been deleted).
            Err(e) => {
                self.forget(&stream);
                Err(self.down(format!("publish not acknowledged: {e}")))
            }
        }
    }

    async fn read(
        &self,
        channel: &str,
        after: Offset,
        epoch: Option<&str>,
        limit: usize,
    ) -> Result<Batch> {
        check_channel(channel)?;
        let stream = self.stream_name(channel);
        let Some((log, handle)) = self.log(&stream).await? else {
            return no_log(channel, after, epoch);
        };
        crate::broker::check_resume(channel, after, epoch, &log.epoch, log.oldest, log.last)?;
        let first = (after + 1).max(log.oldest);
        let end = log.last.min(after.saturating_add(limit as u64));
        let mut messages = Vec::new();
        if first <= end {
            let mut gets = futures::stream::iter(first..=end)
                .map(|seq| {
                    let handle = &handle;
                    async move { (seq, handle.direct_get(seq).await) }
                })
                .buffered(PIPELINE);
            while let Some((seq, got)) = gets.next().await {
                match got {
                    Ok(m) => messages.push(Message {
                        channel: channel.to_owned(),
                        offset: m.sequence,
                        epoch: log.epoch.clone(),
                        payload: m.payload,
                    }),
                    Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                        // Expired since the state was read: the reader's
                        // next offset is gone, so it is a gap; a later one
                        // ends this batch (retention trims the front only).
                        if messages.is_empty() && after > 0 {
                            return Err(BrokerError::Gap {
                                channel: channel.to_owned(),
                                after,
                                asked: epoch.map(str::to_owned),
                                epoch: log.epoch,
                                oldest: seq + 1,
                                last: log.last,
                            });
                        }
                        if !messages.is_empty() {
                            break;
                        }
                    }
                    Err(e) => return Err(self.down(e)),
                }
            }
        }
        Ok(Batch {
            epoch: log.epoch,
            messages,
            last: log.last,
        })
    }

    async fn wait(&self, channel: &str, after: Offset, timeout: Duration) -> Result<()> {
        check_channel(channel)?;
        let stream = self.stream_name(channel);
        // Subscribe first, then look: a publish in between is either seen
        // by the look or delivered to the subscription.
        let mut subscription = self
            .client
            .subscribe(Self::subject(&stream))
            .await
            .map_err(|e| self.down(e))?;
        let last = self.log(&stream).await?.map_or(0, |(log, _)| log.last);
        if last > after {
            return Ok(());
        }
        let _ = tokio::time::timeout(timeout, subscription.next()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
