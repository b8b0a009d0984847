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
//! `wait` polls `last` every 10 ms on the shared multiplexed connection (a
//! blocking `XREAD` would stall every other call on it); the WebSocket hub
//! will wake its subscribers from one reader per instance instead.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{RedisError, Script, Value};
use statehouse_store::redis::{RedisConnection, connect};

use crate::broker::{
    Batch, Broker, BrokerConfig, BrokerError, Message, Offset, Published, Result, check_channel,
    check_resume, new_epoch,
};

const POLL: Duration = Duration::from_millis(10);

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
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 100)
local drop = nil
for _, e in ipairs(head) do
  if tonumber(e[2][4]) < cutoff then drop = tonumber(string.match(e[1], '^(%d+)')) else break end
end
if drop then redis.call('XTRIM', KEYS[1], 'MINID', (drop + 1) .. '-0') end
local ttl = tonumber(ARGV[5]) * 2 + 60000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
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
while true do
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
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        Ok(RedisBroker { config, conn, name })
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
            .arg(now_ms())
            .arg(retention.max_messages.max(1))
            .arg(retention.max_age.as_millis() as u64)
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
            .arg(now_ms())
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
        for pair in rest.chunks(2) {
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
        loop {
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
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }
}
