//! Redis Streams, on one server or a Cluster.
//!
//! A channel is two keys in one hash slot (`{channel}` is their hash tag):
//! a stream whose entry ids are `OFFSET-0` (fields `p` payload, `t` publish
//! time in ms) and a hash with the channel's `epoch` and `last` offset.
//! Publish and read are Lua scripts, so each is one atomic round trip:
//! publish creates the epoch if the channel has none, bumps `last`, appends,
//! trims by count and by age, and renews both keys' TTL (when a channel is
//! idle past twice its retention both keys expire together, and the next
//! publish starts a new epoch — readers of the old one get a `Gap`).
//!
//! Wake-ups: publish also `PUBLISH`es the new offset on the channel's wake
//! channel, and each broker keeps one Pub/Sub connection `PSUBSCRIBE`d to
//! its prefix's wake channels (in a Cluster, to one node: classic Pub/Sub
//! reaches every node). `wait` checks `last`, then sleeps until a wake-up —
//! sub-millisecond after the publish. Pub/Sub is fire-and-forget, so the
//! wake-up only shortens the wait: a lost one costs at most the 1 s safety
//! poll, and while the Pub/Sub connection is down `wait` polls every 10 ms.
//! (A blocking `XREAD` would stall every other call on the shared
//! multiplexed connection, and would need a connection per channel.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use redis::{RedisError, Script, Value};
use statehouse_store::redis::{RedisConnection, connect};
use tokio::sync::Notify;

use crate::broker::{
    Batch, Broker, BrokerConfig, BrokerError, Message, Offset, Published, Result, check_channel,
    check_resume, new_epoch, unix_millis,
};

/// How often `wait` looks while no wake-up can come (Pub/Sub down).
const POLL: Duration = Duration::from_millis(10);
/// How often `wait` looks anyway, in case a wake-up was lost.
const SAFETY_POLL: Duration = Duration::from_secs(1);

static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local n = redis.call('HINCRBY', KEYS[2], 'last', 1)
local now = tonumber(ARGV[3])
redis.call('XADD', KEYS[1], n .. '-0', 'p', ARGV[2], 't', now)
local keep = tonumber(ARGV[4])
if n > keep then
  redis.call('XTRIM', KEYS[1], 'MINID', (n - keep + 1) .. '-0')
end
local cutoff = now - tonumber(ARGV[5])
-- The oldest entry first: only when it has expired is a page worth reading.
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first and tonumber(first[2][4]) < cutoff then
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 100)
  local drop = nil
  for _, e in ipairs(head) do
    if tonumber(e[2][4]) < cutoff then drop = tonumber(string.match(e[1], '^(%d+)')) else break end
  end
  if drop then redis.call('XTRIM', KEYS[1], 'MINID', (drop + 1) .. '-0') end
end
local ttl = tonumber(ARGV[5]) * 2 + 60000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PUBLISH', ARGV[6], n)
return {n, epoch}
",
    )
});

/// Returns `{epoch, last, oldest, offset1, payload1, ...}`; `oldest` is the
/// first retained, unexpired offset (`last + 1` if none).
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'last')
if not meta[1] then return {'', 0, 1} end
local last = tonumber(meta[2])
local after = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[4])
local oldest = last + 1
local start = '-'
-- The common case in one entry: the oldest kept entry has not expired.
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first and tonumber(first[2][4]) >= cutoff then
  oldest = tonumber(string.match(first[1], '^(%d+)'))
  start = nil
end
while start do
  local page = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 100)
  if #page == 0 then break end
  local found = false
  for _, e in ipairs(page) do
    if tonumber(e[2][4]) >= cutoff then
      oldest = tonumber(string.match(e[1], '^(%d+)'))
      found = true
      break
    end
  end
  if found or #page < 100 then break end
  start = '(' .. page[#page][1]
end
local out = {meta[1], last, oldest}
local entries = redis.call('XRANGE', KEYS[1], (after + 1) .. '-0', '+', 'COUNT', limit)
for _, e in ipairs(entries) do
  if tonumber(e[2][4]) >= cutoff then
    table.insert(out, tonumber(string.match(e[1], '^(%d+)')))
    table.insert(out, e[2][2])
  end
end
return out
",
    )
});

/// The Redis Streams broker.
#[derive(Debug)]
pub(crate) struct RedisBroker {
    config: BrokerConfig,
    conn: RedisConnection,
    name: String,
    wakers: Arc<Wakers>,
    waker_task: tokio::task::AbortHandle,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.waker_task.abort();
    }
}

/// The waiters of this broker, by channel, woken from the Pub/Sub
/// connection.
#[derive(Debug, Default)]
struct Wakers {
    /// Whether the Pub/Sub connection is subscribed (wake-ups can come).
    alive: AtomicBool,
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, channel: &str) {
        if let Some(notify) = self.waiting().get(channel) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for notify in self.waiting().values() {
            notify.notify_waiters();
        }
    }
}

/// One waiter's hold on its channel's `Notify`; the entry goes when the
/// last waiter does (cancelled or not).
struct Waiting<'a> {
    wakers: &'a Wakers,
    channel: &'a str,
    notify: Arc<Notify>,
}

impl<'a> Waiting<'a> {
    fn new(wakers: &'a Wakers, channel: &'a str) -> Self {
        let notify = wakers
            .waiting()
            .entry(channel.to_owned())
            .or_default()
            .clone();
        Waiting {
            wakers,
            channel,
            notify,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.wakers.waiting();
        // Two references: the map's and ours.
        if waiting
            .get(self.channel)
            .is_some_and(|n| Arc::strong_count(n) <= 2)
        {
            waiting.remove(self.channel);
        }
    }
}

/// The wake channel of a fan-out channel: `{prefix}fanout-wake:{channel}`.
fn wake_channel(prefix: &str, channel: &str) -> String {
    format!("{prefix}fanout-wake:{channel}")
}

/// The URL of one node to hold the Pub/Sub connection on.
fn pubsub_url(url: &str) -> String {
    let Some(rest) = url.strip_prefix("redis+cluster://") else {
        return url.to_owned();
    };
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let first = hosts.split([',', '/', '?']).next().unwrap_or_default();
    format!("redis://{auth}{first}")
}

/// Escapes `*?[]\` for a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Holds the Pub/Sub connection: reconnects every second while it cannot,
/// and on each (re)subscription wakes every waiter to look again.
async fn run_wakers(url: String, prefix: String, wakers: std::sync::Weak<Wakers>) {
    let start = wake_channel(&prefix, "");
    let pattern = format!("{}*", glob_escape(&start));
    loop {
        let connected = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, RedisError>(pubsub)
        };
        if let Ok(Ok(pubsub)) = tokio::time::timeout(Duration::from_secs(2), connected).await {
            let Some(w) = wakers.upgrade() else { return };
            w.alive.store(true, Ordering::SeqCst);
            w.wake_all();
            drop(w);
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Some(w) = wakers.upgrade() else { return };
                if let Some(channel) = message.get_channel_name().strip_prefix(&start) {
                    w.wake(channel);
                }
            }
            let Some(w) = wakers.upgrade() else { return };
            w.alive.store(false, Ordering::SeqCst);
            tracing::warn!("fan-out wake-up connection lost; polling until it is back");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl RedisBroker {
    pub(crate) async fn open(config: BrokerConfig) -> Result<Self> {
        let conn = connect(&config.url, Duration::from_secs(2))
            .await
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        let name = match (config.url.find("://"), config.url.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                format!("{}***{}", &config.url[..s + 3], &config.url[at..])
            }
            _ => config.url.clone(),
        };
        let wakers = Arc::new(Wakers::default());
        let waker_task = tokio::spawn(run_wakers(
            pubsub_url(&config.url),
            config.prefix.clone(),
            Arc::downgrade(&wakers),
        ))
        .abort_handle();
        Ok(RedisBroker {
            config,
            conn,
            name,
            wakers,
            waker_task,
        })
    }

    fn keys(&self, channel: &str) -> (String, String) {
        let base = format!("{}fanout:{{{channel}}}", self.config.prefix);
        (format!("{base}:log"), format!("{base}:meta"))
    }

    fn error(&self, e: &RedisError) -> BrokerError {
        if e.is_timeout()
            || e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_cluster_error()
        {
            BrokerError::Unavailable {
                broker: self.name.clone(),
                detail: e.to_string(),
            }
        } else {
            BrokerError::Corrupt {
                broker: self.name.clone(),
                detail: e.to_string(),
            }
        }
    }

    fn corrupt(&self, what: &str) -> BrokerError {
        BrokerError::Corrupt {
            broker: self.name.clone(),
            detail: what.to_owned(),
        }
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.config.check_publish(channel, &payload)?;
        let (log, meta) = self.keys(channel);
        let retention = &self.config.retention;
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = PUBLISH
            .key(&log)
            .key(&meta)
            .arg(new_epoch())
            .arg(payload.as_ref())
            .arg(unix_millis())
            .arg(retention.max_messages.max(1))
            .arg(retention.max_age.as_millis() as u64)
            .arg(wake_channel(&self.config.prefix, channel))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(&e))?;
        match reply.as_slice() {
            [offset, epoch] => Ok(Published {
                offset: as_u64(offset).ok_or_else(|| self.corrupt("publish: offset"))?,
                epoch: as_string(epoch).ok_or_else(|| self.corrupt("publish: epoch"))?,
            }),
            _ => Err(self.corrupt("publish: unexpected reply")),
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
        let (log, meta) = self.keys(channel);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = READ
            .key(&log)
            .key(&meta)
            .arg(after)
            .arg(limit.max(1))
            .arg(unix_millis())
            .arg(self.config.retention.max_age.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(&e))?;
        let [log_epoch, last, oldest, rest @ ..] = reply.as_slice() else {
            return Err(self.corrupt("read: unexpected reply"));
        };
        let log_epoch = as_string(log_epoch).ok_or_else(|| self.corrupt("read: epoch"))?;
        let last = as_u64(last).ok_or_else(|| self.corrupt("read: last"))?;
        let oldest = as_u64(oldest).ok_or_else(|| self.corrupt("read: oldest"))?;
        check_resume(channel, after, epoch, &log_epoch, oldest, last)?;
        let mut messages = Vec::with_capacity(rest.len() / 2);
        // The script reads at least one entry; limit 0 asks for the tail only.
        for pair in rest.chunks(2).take(limit) {
            let [offset, payload] = pair else {
                return Err(self.corrupt("read: odd entry list"));
            };
            let Value::BulkString(payload) = payload else {
                return Err(self.corrupt("read: payload"));
            };
            messages.push(Message {
                channel: channel.to_owned(),
                offset: as_u64(offset).ok_or_else(|| self.corrupt("read: offset"))?,
                epoch: log_epoch.clone(),
                payload: Bytes::from(payload.clone()),
            });
        }
        Ok(Batch {
            epoch: log_epoch,
            messages,
            last,
        })
    }

    async fn wait(&self, channel: &str, after: Offset, timeout: Duration) -> Result<()> {
        check_channel(channel)?;
        let (_, meta) = self.keys(channel);
        let deadline = tokio::time::Instant::now() + timeout;
        let waiting = Waiting::new(&self.wakers, channel);
        loop {
            // Registered before the look: a publish after it wakes us.
            let woken = waiting.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let mut conn = self.conn.clone();
            let last: Option<u64> = redis::cmd("HGET")
                .arg(&meta)
                .arg("last")
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error(&e))?;
            if last.unwrap_or(0) > after {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let poll = if self.wakers.alive.load(Ordering::SeqCst) {
                SAFETY_POLL
            } else {
                POLL
            };
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(poll.min(deadline - now)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubsub_goes_to_one_node() {
        assert_eq!(pubsub_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(pubsub_url("redis+cluster://a:1,b:2"), "redis://a:1");
        assert_eq!(pubsub_url("redis+cluster://u:p@a:1,b:2"), "redis://u:p@a:1");
    }

    #[test]
    fn patterns_match_only_this_prefix() {
        assert_eq!(glob_escape("t[1]*?"), "t\\[1\\]\\*\\?");
        assert_eq!(wake_channel("p:", "orders.7"), "p:fanout-wake:orders.7");
    }
}
