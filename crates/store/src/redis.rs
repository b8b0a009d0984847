//! Redis, standalone and Cluster (redis-rs).
//!
//! Layout in Redis (all of it private to this module):
//! - versioned value: string `v:{key}` = `"{version}:{payload}"`;
//! - field map: hash `m:{key}`, the meta field `""` holds the map's version,
//!   size and expiry deadline (`"{version}:{size}:{deadline}"`, see
//!   [`Meta`]), every other field `"{version}:{payload}"`. One key per map,
//!   so all of a map's fields live in one Cluster slot and a Lua script
//!   patches them atomically;
//! - counter: string `c:{key}` handled by INCRBY.
//!
//! Reads are one plain command each (GET; HGETALL: a map's time to live is
//! read from the deadline in its meta field, not by a second command).
//! Conditional writes and map touches are Lua scripts, sent by EVALSHA with
//! a fallback to EVAL after a restart or failover flushed the script cache.
//! New versions are `max(old + 1, TIME in µs)` and deadlines `TIME in ms +
//! TTL`, both computed inside the script from the server's clock.

mod direct;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, Value};

use crate::backend::{Backend, ttl_millis};
use crate::error::{Conflict, Result, StoreError, UnavailableKind, redact_url};
use crate::types::{
    Condition, Existence, FieldCondition, FieldMap, FieldOp, MapPatch, PatchOutcome, Versioned,
    map_too_large,
};

/// A standalone connection manager (reconnects by itself) or a Cluster
/// connection (follows MOVED/ASK and refreshes its slot map by itself).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A reconnecting connection to one Redis server (`redis://`, `rediss://`)
/// or a Redis Cluster (`redis+cluster://HOST:PORT,HOST:PORT`), as the store
/// opens it: connect and response timeouts, bounded reconnect backoff,
/// cluster redirections followed. Clone it freely: clones share the
/// multiplexed connection. Other statehouse crates on Redis (the fan-out
/// broker) open theirs here, so both see the same URLs and failure modes.
#[derive(Clone)]
pub struct RedisConnection(Conn);

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Conn::Single(_) => "RedisConnection(single)",
            Conn::Cluster(_) => "RedisConnection(cluster)",
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// Opens `url` (see [`RedisConnection`]) and checks it with a PING.
/// Errors are `StoreError::Config` naming the server (password redacted)
/// and what failed: refused, timed out, authentication.
pub async fn connect(url: &str, timeout: Duration) -> Result<RedisConnection> {
    let backend = if url.starts_with("redis+cluster://") {
        RedisBackend::open_cluster(url, timeout).await?
    } else {
        // No store policy wraps these callers' commands: the connection
        // bounds each one itself.
        RedisBackend::open_single(url, timeout, Some(timeout)).await?
    };
    Ok(RedisConnection(backend.conn))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis backend.
pub struct RedisBackend {
    conn: Conn,
    /// The plain connection a call made while no other is in flight uses
    /// instead of `conn` (see [`direct`]); standalone servers only.
    direct: Option<Arc<direct::DirectPool>>,
    name: String,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("store", &self.name)
            .finish()
    }
}

impl RedisBackend {
    /// Connects to a standalone server: `redis://[user:password@]host:port[/db]`.
    ///
    /// Commands get no response timeout of their own: the store's policy
    /// layer bounds every call with its timeout, and a second timer per
    /// command (redis-rs's) costs a lock on tokio's timer wheel that the
    /// runtime's threads contend for under load (seen as `sched_yield` in
    /// `strace -c` of session-bench; 1 timer per session read instead of 2).
    ///
    /// A call made while no other is in flight sends its commands on a
    /// plain connection of its own rather than through the multiplexed one's
    /// driver task (see the `direct` module): the shortest path for a caller
    /// alone, the multiplexed connection's batching under load.
    pub async fn open(url: &str, timeout: Duration) -> Result<Self> {
        let mut backend = Self::open_single(url, timeout, None).await?;
        backend.direct = direct::DirectPool::new(url, timeout);
        Ok(backend)
    }

    async fn open_single(
        url: &str,
        timeout: Duration,
        response_timeout: Option<Duration>,
    ) -> Result<Self> {
        let name = redact_url(url);
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Config(format!("store URL {name:?} is not valid: {e}")))?;
        // Reconnect fast: the policy layer's breaker and timeout bound what
        // callers wait; here we only want a returning server to be used again
        // well within a second.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(response_timeout)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100))
            .set_number_of_retries(2);
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| open_error(&name, &e))?;
        let backend = RedisBackend {
            conn: Conn::Single(manager),
            direct: None,
            name,
        };
        backend.ping(timeout).await?;
        Ok(backend)
    }

    /// Connects to a Cluster: `redis+cluster://host:port[,host:port...]`
    /// (any subset of the nodes; the rest is discovered).
    pub async fn open_cluster(url: &str, timeout: Duration) -> Result<Self> {
        let name = redact_url(url);
        let rest = url
            .strip_prefix("redis+cluster://")
            .ok_or_else(|| StoreError::Config(format!("{name:?} is not a redis+cluster:// URL")))?;
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| match userinfo {
                Some(u) => format!("redis://{u}@{h}"),
                None => format!("redis://{h}"),
            })
            .collect();
        if nodes.is_empty() {
            return Err(StoreError::Config(format!(
                "store URL {name:?} names no cluster node"
            )));
        }
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()
            .map_err(|e| StoreError::Config(format!("store URL {name:?}: {e}")))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| open_error(&name, &e))?;
        let backend = RedisBackend {
            conn: Conn::Cluster(conn),
            direct: None,
            name,
        };
        backend.ping(timeout).await?;
        Ok(backend)
    }

    /// PING within `timeout`, whether or not the connection bounds its
    /// commands.
    async fn ping(&self, timeout: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        let pong: String = tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut conn))
            .await
            .map_err(|_| {
                StoreError::Config(format!(
                    "store {}: no answer to PING within {timeout:?}",
                    self.name
                ))
            })?
            .map_err(|e| open_error(&self.name, &e))?;
        if pong != "PONG" {
            return Err(StoreError::Config(format!(
                "store {}: PING answered {pong:?}",
                self.name
            )));
        }
        Ok(())
    }

    /// The connection for one call's commands: the direct one when the
    /// call is alone and it is idle, the shared one otherwise.
    fn conn(&self) -> direct::Handle<Conn> {
        match &self.direct {
            Some(pool) => pool.handle(self.conn.clone()),
            None => direct::Handle::shared(self.conn.clone()),
        }
    }

    fn error(&self, key: &str, e: RedisError) -> StoreError {
        map_error(&self.name, key, &e)
    }
}

fn open_error(name: &str, e: &RedisError) -> StoreError {
    let what = match e.kind() {
        ErrorKind::AuthenticationFailed => "authentication failed",
        _ if e.is_connection_refusal() => "connection refused",
        _ if e.is_timeout() => "timed out",
        _ => "could not connect",
    };
    StoreError::Config(format!("store {name}: {what} ({e})"))
}

fn map_error(name: &str, key: &str, e: &RedisError) -> StoreError {
    if e.is_timeout() {
        return StoreError::unavailable(name, UnavailableKind::Timeout, e);
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound | ErrorKind::Io
        )
    {
        return StoreError::unavailable(name, UnavailableKind::Connection, e);
    }
    let code = e.code().unwrap_or("");
    let text = e.to_string();
    // Our scripts raise `CORRUPT ...` when a stored value lacks its version.
    if code == "CORRUPT" || text.contains("CORRUPT") {
        return StoreError::corrupt(name, key, text);
    }
    if text.contains("NOTINT") {
        return StoreError::Invalid(format!("key {key:?}: value is not an integer"));
    }
    // A failover or a cluster being resharded is a passing unavailability,
    // not a broken request.
    if matches!(
        code,
        "LOADING" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "BUSY"
    ) || e.is_cluster_error()
    {
        return StoreError::unavailable(name, UnavailableKind::Connection, e);
    }
    if matches!(code, "WRONGTYPE") || text.contains("not an integer") {
        return StoreError::Invalid(format!("key {key:?}: {text}"));
    }
    StoreError::backend(name, e)
}

// `concat` allocates the key once at its length; `format!` would grow it.
fn vkey(key: &str) -> String {
    ["v:", key].concat()
}
fn mkey(key: &str) -> String {
    ["m:", key].concat()
}
fn ckey(key: &str) -> String {
    ["c:", key].concat()
}

/// Splits `"{version}:{payload}"`; the payload keeps `raw`'s buffer (no
/// copy). Advancing past the prefix, unlike slicing, does not make `Bytes`
/// share the buffer, which would allocate.
fn decode_versioned(raw: Vec<u8>) -> Option<Versioned> {
    let colon = raw.iter().position(|&b| b == b':')?;
    let version = std::str::from_utf8(&raw[..colon]).ok()?.parse().ok()?;
    let mut value = Bytes::from(raw);
    value.advance(colon + 1);
    Some(Versioned { value, version })
}

/// A map's meta field, `version [":" size [":" deadline]]`: the map's
/// version; the sum of its field name and payload lengths (empty: not
/// counted yet); the Unix time in ms, by the server's clock, at which the
/// TTL last set ends (empty: no expiry). Maps written before deadlines were
/// recorded have no third part. Only the version and deadline are read here;
/// the size is the patch script's.
struct Meta {
    version: u64,
    deadline: Deadline,
}

enum Deadline {
    At(u64),
    Never,
    Unrecorded,
}

impl Meta {
    fn parse(raw: &[u8]) -> Option<Meta> {
        let mut parts = std::str::from_utf8(raw).ok()?.splitn(3, ':');
        let version = parts.next()?.parse().ok()?;
        let _size = parts.next();
        let deadline = match parts.next() {
            None => Deadline::Unrecorded,
            Some("") => Deadline::Never,
            Some(ms) => Deadline::At(ms.parse().ok()?),
        };
        Some(Meta { version, deadline })
    }
}

/// Now, by this host's clock, in the unit of [`Meta`]'s deadline. The time
/// left that a map read reports is the server's deadline minus this: off by
/// the skew between the two clocks (NTP keeps that to milliseconds; the
/// session layer uses it only to decide when to refresh a session's TTL).
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// Shared Lua helpers, prepended to every script that parses stored values.
const LUA_PRELUDE: &str = r#"
local function split(raw)
  local i = string.find(raw, ':', 1, true)
  local v = i and tonumber(string.sub(raw, 1, i - 1))
  if not v then error('CORRUPT stored value has no version prefix') end
  return v, string.sub(raw, i + 1)
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- Versions are unique over time: max(previous + 1, now in µs).
local function next_version(prev, now)
  return math.max(prev + 1, now)
end
-- The meta field's deadline for a TTL of ttl_ms set at now (µs).
local function deadline_after(now, ttl_ms)
  return string.format('%d', math.floor(now / 1000) + ttl_ms)
end
-- A map's meta field: version [':' size [':' deadline]]. Returns the
-- version, the size (nil: not counted yet) and the deadline as stored (''
-- for no expiry; nil: not recorded, a map written before deadlines were).
local function parse_meta(meta)
  local i = string.find(meta, ':', 1, true)
  local seq = tonumber(i and string.sub(meta, 1, i - 1) or meta)
  if not seq then error('CORRUPT map version is not a number') end
  if not i then return seq, nil, nil end
  local rest = string.sub(meta, i + 1)
  local j = string.find(rest, ':', 1, true)
  if not j then return seq, tonumber(rest), nil end
  return seq, tonumber(string.sub(rest, 1, j - 1)), string.sub(rest, j + 1)
end
local function format_meta(seq, size, deadline)
  local s = size and string.format('%d', size) or ''
  return string.format('%d', seq) .. ':' .. s .. ':' .. deadline
end
"#;

/// KEYS[1] key; ARGV: mode ('any'|'absent'|'version'), expected version,
/// ttl ms (0 = none), payload. Returns {status, version}: 0 ok, -1 exists,
/// -2 not found, -3 version mismatch.
const PUT_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
local curver = 0
if cur then curver = split(cur) end
local mode = ARGV[1]
if mode == 'absent' and cur then return {-1, 0} end
if mode == 'version' then
  if not cur then return {-2, 0} end
  if curver ~= tonumber(ARGV[2]) then return {-3, 0} end
end
local ver = next_version(curver, now_us())
local val = string.format('%d', ver) .. ':' .. ARGV[4]
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('SET', KEYS[1], val, 'PX', ttl) else redis.call('SET', KEYS[1], val) end
return {0, ver}
"#;

/// KEYS[1] key; ARGV[1] expected version. Returns 1 deleted, -2 not found,
/// -3 mismatch.
const DELETE_IF_VERSION_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return -2 end
if split(cur) ~= tonumber(ARGV[1]) then return -3 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// KEYS[1] map key. ARGV: ttl ms (0 keeps), existence ('any'|'exist'|'new'),
/// max bytes (0 = no limit), ncond, ncond × (field, 'a'|'v', version), nops,
/// nops × (op 's'|'d'|'i', field, payload-or-delta). Returns
/// {0, version, counters...} or {-1} exists, {-2} not found, {-3, cond
/// index} mismatch, {-4, op index} not an integer, {-5, size} over max bytes.
///
/// The meta field `""` holds `"{version}:{size}:{deadline}"` ([`Meta`]),
/// size being the sum of field name and payload lengths, kept up to date by
/// every patch so the limit costs no scan. A script cannot roll back, so
/// pass 1 computes every outcome (counters, size) before pass 2 writes
/// anything.
const PATCH_LUA: &str = r#"
local k = KEYS[1]
local exists = redis.call('EXISTS', k) == 1
local ex = ARGV[2]
if ex == 'exist' and not exists then return {-2} end
if ex == 'new' and exists then return {-1} end
local max = tonumber(ARGV[3])
local idx = 5
for c = 1, tonumber(ARGV[4]) do
  local f, kind, want = ARGV[idx], ARGV[idx + 1], ARGV[idx + 2]
  idx = idx + 3
  local raw = redis.call('HGET', k, f)
  if kind == 'a' then
    if raw then return {-3, c} end
  else
    if not raw or split(raw) ~= tonumber(want) then return {-3, c} end
  end
end
local nops = tonumber(ARGV[idx])
idx = idx + 1
local seq, size, deadline = 0, nil, nil
local meta = redis.call('HGET', k, '')
if meta then seq, size, deadline = parse_meta(meta) end
if not size then
  -- A map written without its size yet: count it once.
  size = 0
  local all = redis.call('HGETALL', k)
  for j = 1, #all, 2 do
    if all[j] ~= '' then
      local _, p = split(all[j + 1])
      size = size + #all[j] + #p
    end
  end
end
local function as_int(payload)
  if string.match(payload, '^%-?%d+$') and #payload <= 16 then return tonumber(payload) end
  return false
end
-- Pass 1: each touched field's payload as the patch leaves it (false:
-- removed), the counters in op order, and the new size.
local cur = {}
local function current(f)
  local c = cur[f]
  if c == nil then
    local raw = redis.call('HGET', k, f)
    if raw then
      local _, p = split(raw)
      c = p
    else
      c = false
    end
    cur[f] = c
  end
  return c
end
local counters = {}
for o = 1, nops do
  local op, f, arg = ARGV[idx], ARGV[idx + 1], ARGV[idx + 2]
  idx = idx + 3
  local old = current(f)
  if old then size = size - #f - #old end
  if op == 's' then
    cur[f] = arg
  elseif op == 'd' then
    cur[f] = false
  else
    local base = 0
    if old then base = as_int(old) end
    if base == false then return {-4, o} end
    local n = base + tonumber(arg)
    if math.abs(n) > 9007199254740991 then return {-4, o} end
    cur[f] = string.format('%d', n)
    table.insert(counters, n)
  end
  if cur[f] then size = size + #f + #cur[f] end
end
if max > 0 and size > max then return {-5, size} end
-- Pass 2: write the final state of every touched field.
local now = now_us()
local ver = next_version(seq, now)
local vs = string.format('%d', ver)
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  deadline = deadline_after(now, ttl)
elseif not exists then
  deadline = ''
elseif not deadline then
  -- A map written before deadlines were recorded: record its expiry now.
  local left = redis.call('PTTL', k)
  if left >= 0 then deadline = deadline_after(now, left) else deadline = '' end
end
redis.call('HSET', k, '', format_meta(ver, size, deadline))
for f, v in pairs(cur) do
  if v then
    redis.call('HSET', k, f, vs .. ':' .. v)
  else
    redis.call('HDEL', k, f)
  end
end
if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
local out = {0, ver}
for _, n in ipairs(counters) do table.insert(out, n) end
return out
"#;

/// KEYS[1] map key; ARGV[1] ttl ms. Returns 1, or 0 if the map is absent.
/// The new deadline goes into the meta field with the expiry, so a read
/// needs no PTTL.
const MAP_TOUCH_LUA: &str = r#"
local k = KEYS[1]
local ttl = tonumber(ARGV[1])
if redis.call('PEXPIRE', k, ttl) == 0 then return 0 end
local meta = redis.call('HGET', k, '')
if not meta then error('CORRUPT map has no version field') end
local seq, size = parse_meta(meta)
redis.call('HSET', k, '', format_meta(seq, size, deadline_after(now_us(), ttl)))
return 1
"#;

/// KEYS[1] counter; ARGV: delta, ttl ms (0 none). TTL only on creation.
const INCR_LUA: &str = r#"
local ok, v = pcall(redis.call, 'INCRBY', KEYS[1], ARGV[1])
if not ok then return redis.error_reply('NOTINT counter is not an integer') end
local ttl = tonumber(ARGV[2])
if ttl > 0 and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return v
"#;

static PUT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{LUA_PRELUDE}{PUT_LUA}")));
static DELETE_IF_VERSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{LUA_PRELUDE}{DELETE_IF_VERSION_LUA}")));
static PATCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{LUA_PRELUDE}{PATCH_LUA}")));
static INCR: LazyLock<Script> = LazyLock::new(|| Script::new(INCR_LUA));
static MAP_TOUCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{LUA_PRELUDE}{MAP_TOUCH_LUA}")));

fn ttl_arg(ttl: Option<Duration>) -> i64 {
    ttl.map_or(0, ttl_millis)
}

fn status_conflict(status: i64, field: Option<String>) -> StoreError {
    StoreError::Conflict(match status {
        -1 => Conflict::AlreadyExists,
        -2 => Conflict::NotFound,
        _ => Conflict::VersionMismatch { field },
    })
}

#[async_trait]
impl Backend for RedisBackend {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let mut conn = self.conn();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(vkey(key))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        raw.map(|raw| {
            decode_versioned(raw)
                .ok_or_else(|| StoreError::corrupt(&self.name, key, "value has no version prefix"))
        })
        .transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<u64> {
        let (mode, expected) = match condition {
            Condition::Any => ("any", 0),
            Condition::IfAbsent => ("absent", 0),
            Condition::IfVersion(v) => ("version", v),
        };
        let mut conn = self.conn();
        let (status, version): (i64, u64) = PUT
            .key(vkey(key))
            .arg(mode)
            .arg(expected)
            .arg(ttl_arg(ttl))
            .arg(value.as_ref())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        match status {
            0 => Ok(version),
            s => Err(status_conflict(s, None)),
        }
    }

    async fn delete(&self, key: &str, condition: Condition) -> Result<bool> {
        let mut conn = self.conn();
        match condition {
            Condition::IfVersion(v) => {
                let status: i64 = DELETE_IF_VERSION
                    .key(vkey(key))
                    .arg(v)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| self.error(key, e))?;
                match status {
                    1 => Ok(true),
                    s => Err(status_conflict(s, None)),
                }
            }
            _ => {
                let n: i64 = redis::cmd("DEL")
                    .arg(vkey(key))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.error(key, e))?;
                Ok(n > 0)
            }
        }
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.pexpire(&vkey(key), key, ttl).await
    }

    async fn map_read(&self, key: &str) -> Result<Option<FieldMap>> {
        let mut conn = self.conn();
        let k = mkey(key);
        // HGETALL's flat reply read as pairs: no intermediate hash map.
        let raw: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        if raw.is_empty() {
            return Ok(None);
        }
        let corrupt = |why: &str| StoreError::corrupt(&self.name, key, why);
        let mut map = FieldMap::default();
        let mut meta = None;
        for (field, value) in raw {
            if field.is_empty() {
                let parsed =
                    Meta::parse(&value).ok_or_else(|| corrupt("map version is not a number"))?;
                map.version = parsed.version;
                meta = Some(parsed);
                continue;
            }
            let name = String::from_utf8(field).map_err(|_| corrupt("field name is not UTF-8"))?;
            let versioned =
                decode_versioned(value).ok_or_else(|| corrupt("field has no version prefix"))?;
            map.fields.insert(name, versioned);
        }
        let meta = meta.ok_or_else(|| corrupt("map has no version field"))?;
        map.expires_in = match meta.deadline {
            Deadline::At(ms) => Some(Duration::from_millis(ms.saturating_sub(unix_millis()))),
            Deadline::Never => None,
            Deadline::Unrecorded => {
                // Written before deadlines were recorded (its next patch or
                // touch records one): ask the server.
                let pttl: i64 = redis::cmd("PTTL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.error(key, e))?;
                u64::try_from(pttl).ok().map(Duration::from_millis)
            }
        };
        Ok(Some(map))
    }

    async fn map_patch(&self, key: &str, patch: &MapPatch) -> Result<PatchOutcome> {
        let mut invocation = PATCH.key(mkey(key));
        invocation
            .arg(ttl_arg(patch.ttl))
            .arg(match patch.existence {
                Existence::Any => "any",
                Existence::MustExist => "exist",
                Existence::MustNotExist => "new",
            })
            .arg(patch.max_bytes.unwrap_or(0))
            .arg(patch.conditions.len());
        for (field, condition) in &patch.conditions {
            match condition {
                FieldCondition::Absent => invocation.arg(field).arg("a").arg(0),
                FieldCondition::Version(v) => invocation.arg(field).arg("v").arg(*v),
            };
        }
        invocation.arg(patch.ops.len());
        for op in &patch.ops {
            match op {
                FieldOp::Set(f, value) => invocation.arg("s").arg(f).arg(value.as_ref()),
                FieldOp::Remove(f) => invocation.arg("d").arg(f).arg(""),
                FieldOp::Incr(f, delta) => invocation.arg("i").arg(f).arg(*delta),
            };
        }
        let mut conn = self.conn();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        match reply.as_slice() {
            [0, version, counters @ ..] => Ok(PatchOutcome {
                version: *version as u64,
                counters: counters.to_vec(),
            }),
            [-3, index, ..] => {
                let field = usize::try_from(*index - 1)
                    .ok()
                    .and_then(|i| patch.conditions.get(i))
                    .map(|(f, _)| f.clone());
                Err(status_conflict(-3, field))
            }
            [-4, index, ..] => {
                let field = usize::try_from(*index - 1)
                    .ok()
                    .and_then(|i| patch.ops.get(i))
                    .map(|op| op.field().to_owned())
                    .unwrap_or_default();
                Err(StoreError::Invalid(format!(
                    "field {field:?} is not an integer (or the result exceeds ±2^53)"
                )))
            }
            [-5, size, ..] => Err(map_too_large(
                usize::try_from(*size).unwrap_or(usize::MAX),
                patch.max_bytes.unwrap_or_default(),
            )),
            [status, ..] if *status < 0 => Err(status_conflict(*status, None)),
            other => Err(StoreError::backend(
                &self.name,
                format!("unexpected patch reply {other:?}"),
            )),
        }
    }

    async fn map_delete(&self, key: &str) -> Result<bool> {
        let mut conn = self.conn();
        let n: i64 = redis::cmd("DEL")
            .arg(mkey(key))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(n > 0)
    }

    async fn map_touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn();
        let touched: i64 = MAP_TOUCH
            .key(mkey(key))
            .arg(ttl_millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(touched == 1)
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64> {
        let mut conn = self.conn();
        INCR.key(ckey(key))
            .arg(delta)
            .arg(ttl_arg(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))
    }

    async fn counter(&self, key: &str) -> Result<Option<i64>> {
        let mut conn = self.conn();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(ckey(key))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        raw.map(|raw| {
            crate::backend::parse_counter(&raw)
                .ok_or_else(|| StoreError::corrupt(&self.name, key, "counter is not an integer"))
        })
        .transpose()
    }
}

impl RedisBackend {
    async fn pexpire(&self, redis_key: &str, key: &str, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn();
        let n: i64 = redis::cmd("PEXPIRE")
            .arg(redis_key)
            .arg(ttl_millis(ttl))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_values_split_at_the_first_colon() {
        let v = decode_versioned(b"42:a:b".to_vec()).unwrap();
        assert_eq!((v.version, v.value.as_ref()), (42, &b"a:b"[..]));
        let v = decode_versioned(b"7:".to_vec()).unwrap();
        assert_eq!((v.version, v.value.as_ref()), (7, &b""[..]));
        // Advanced, not sliced: a clone of it is still just the payload.
        let payload = decode_versioned(b"1:payload".to_vec()).unwrap().value;
        assert_eq!(payload.clone(), Bytes::from_static(b"payload"));
        assert!(decode_versioned(b"no colon".to_vec()).is_none());
        assert!(decode_versioned(b"x1:payload".to_vec()).is_none());
        assert!(decode_versioned(Vec::new()).is_none());
    }
}
