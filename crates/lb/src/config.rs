//! The load balancer's configuration: a TOML file, optionally amended by `key=value` overrides
//! (the command line's `--set health.interval=1s`), checked before anything starts.
//!
//! Every error names the key it is about and why (see [`ConfigError`]): unknown keys, wrong
//! types and values out of range alike. `lb.example.toml` at the crate root shows every key.
//!
//! Durations are strings with a unit: `"250ms"`, `"2s"`, `"1m"`, `"1h"`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::{ConfigError, LbError};

/// The whole configuration. Built with [`LbConfig::from_toml_str`] or [`LbConfig::load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    /// Where the proxy listens (used by callers that bind the listener themselves from the
    /// configuration; [`run`](crate::run) takes a bound listener).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Proxy worker threads, each with its own event loop and its own keep-alive pool to the
    /// instances; a client connection stays on one worker. `0` (the default): one per core.
    #[serde(default)]
    pub workers: usize,
    /// How an instance is picked for a request.
    #[serde(default)]
    pub policy: PolicyKind,
    /// Settings of `policy = "hash"`.
    #[serde(default)]
    pub hash: HashConfig,
    /// Settings of `policy = "sticky"`.
    #[serde(default)]
    pub sticky: StickyConfig,
    /// Settings of `policy = "p2c_ewma"`.
    #[serde(default)]
    pub p2c: P2cConfig,
    /// The instances at start; the admin API adds and removes instances at run time.
    #[serde(default)]
    pub instances: Vec<InstanceConfig>,
    /// Active health checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// Passive ejection on consecutive failures.
    #[serde(default)]
    pub passive: PassiveConfig,
    /// Retries and the retry budget.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Timeouts on both sides of the proxy.
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// Size limits on requests.
    #[serde(default)]
    pub limits: LimitConfig,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

/// How an instance is picked for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The less loaded of two random instances, load = peak-EWMA latency × (in-flight + 1).
    P2cEwma,
    /// Consistent hashing of a request key (`[hash] key`) on a ring with virtual nodes.
    Hash,
    /// An opaque cookie pins a client to an instance (the stateful contrast mode).
    Sticky,
}

/// `[hash]`: what to hash, and the ring.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashConfig {
    /// `header:NAME`, `cookie:NAME` or `path`. Required when `policy = "hash"`. Requests
    /// without the key are spread round robin.
    #[serde(default, deserialize_with = "de_hash_key")]
    pub key: Option<HashKey>,
    /// Points per instance on the ring: more points, more even spread.
    #[serde(default = "default_virtual_nodes")]
    pub virtual_nodes: u32,
}

impl Default for HashConfig {
    fn default() -> Self {
        Self {
            key: None,
            virtual_nodes: default_virtual_nodes(),
        }
    }
}

/// The part of a request consistent hashing keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The value of a request header (lower-case name).
    Header(http::HeaderName),
    /// The value of a cookie.
    Cookie(String),
    /// The request path (without the query).
    Path,
}

/// `[sticky]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyConfig {
    /// Name of the pinning cookie.
    #[serde(default = "default_sticky_cookie")]
    pub cookie: String,
}

impl Default for StickyConfig {
    fn default() -> Self {
        Self {
            cookie: default_sticky_cookie(),
        }
    }
}

/// `[p2c]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2cConfig {
    /// How fast the latency estimate forgets a peak (the EWMA's time constant).
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub decay: Duration,
    /// The latency assumed for an instance that has answered nothing yet.
    #[serde(default = "d_5ms", deserialize_with = "de_duration")]
    pub default_rtt: Duration,
}

impl Default for P2cConfig {
    fn default() -> Self {
        Self {
            decay: d_10s(),
            default_rtt: d_5ms(),
        }
    }
}

/// One `[[instances]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// A unique name, used in the admin API and the metrics' `instance` label.
    pub name: String,
    /// `host:port` of the instance's plain-HTTP listener.
    pub addr: String,
}

/// `[health]`: active HTTP checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Turn active checks off (passive ejection still applies).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Path probed with `GET`; any 2xx is healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between two probes of one instance.
    #[serde(default = "d_2s", deserialize_with = "de_duration")]
    pub interval: Duration,
    /// A probe not answered within this is a failure. At most `interval`.
    #[serde(default = "d_1s", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy instance back.
    #[serde(default = "two")]
    pub rise: u32,
    /// Consecutive failures that take a healthy instance out.
    #[serde(default = "two")]
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_health_path(),
            interval: d_2s(),
            timeout: d_1s(),
            rise: 2,
            fall: 2,
        }
    }
}

/// `[passive]`: ejection on consecutive failures seen in live traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveConfig {
    /// Consecutive connect failures (and 5xx answers, if `on_5xx`) that eject an instance.
    /// 0 turns passive ejection off.
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// Whether 5xx answers count as failures.
    #[serde(default = "yes")]
    pub on_5xx: bool,
    /// How long an ejected instance stays out.
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub ejection_time: Duration,
    /// At most this share of the instances is ejected at once, so a bad deploy cannot eject
    /// everyone.
    #[serde(default = "fifty")]
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            on_5xx: true,
            ejection_time: d_10s(),
            max_ejected_percent: 50,
        }
    }
}

/// `[retry]`. A request whose connection to an instance could not be made was provably never
/// sent, and is always retried on another instance (within the budget). Anything else is
/// retried only if `idempotent` is on, the method is idempotent and the body is replayable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request, the first included (1 = never retry).
    #[serde(default = "three")]
    pub max_attempts: u32,
    /// Opt in to retrying GET/HEAD/OPTIONS/PUT/DELETE/TRACE after a failure that may have
    /// reached the instance (reset connection, upstream timeout).
    #[serde(default)]
    pub idempotent: bool,
    /// Each request earns this fraction of a retry.
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    #[serde(default = "ten")]
    pub budget_min_per_sec: u32,
    /// Request bodies up to this size (known from `Content-Length`) are buffered so that an
    /// idempotent request with a body can be replayed.
    #[serde(default = "default_buffer_body")]
    pub buffer_body_bytes: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            idempotent: false,
            budget_ratio: default_budget_ratio(),
            budget_min_per_sec: 10,
            buffer_body_bytes: default_buffer_body(),
        }
    }
}

/// `[timeouts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Opening a TCP connection to an instance.
    #[serde(default = "d_2s", deserialize_with = "de_duration")]
    pub connect: Duration,
    /// A client's request head, from its first byte to its end.
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub request_head: Duration,
    /// A client connection with no request in flight and no bytes moving is closed after this.
    #[serde(default = "d_60s", deserialize_with = "de_duration")]
    pub idle: Duration,
    /// From sending a request to an instance to receiving its response head.
    #[serde(default = "d_30s", deserialize_with = "de_duration")]
    pub upstream_response: Duration,
    /// Once a response is on its way to the client, the connection is cut when none of its
    /// bytes has moved for this long: an instance that stops sending its body, or a client
    /// that stops reading it (nginx's `proxy_read_timeout` and `send_timeout` in one). A
    /// long-lived response (server-sent events, long polling) must send something more often
    /// than this. On HTTP/2 it is judged per connection: any stream's bytes are progress.
    #[serde(default = "d_60s", deserialize_with = "de_duration")]
    pub response_stall: Duration,
    /// Pooled keep-alive connections to instances are closed after this long unused.
    #[serde(default = "d_60s", deserialize_with = "de_duration")]
    pub upstream_idle: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect: d_2s(),
            request_head: d_10s(),
            idle: d_60s(),
            upstream_response: d_30s(),
            response_stall: d_60s(),
            upstream_idle: d_60s(),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// A request head (request line and headers) larger than this gets 431.
    #[serde(default = "default_max_head")]
    pub max_head_bytes: usize,
    /// More header lines than this gets 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            max_head_bytes: default_max_head(),
            max_headers: default_max_headers(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin API listens. Loopback by default; anything else needs a token.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token required on every admin request (if set, also on loopback).
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the token (read at load time), so the token
    /// need not sit in the file.
    #[serde(default)]
    pub token_env: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            token_env: None,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After the shutdown signal, in-flight requests get this long to finish; then the
    /// remaining connections are cut.
    #[serde(default = "d_30s", deserialize_with = "de_duration")]
    pub drain_deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_deadline: d_30s(),
        }
    }
}

impl LbConfig {
    /// Parses and checks a configuration.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the reason.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_overrides(s, &[])
    }

    /// Reads `path` (if any) and applies `overrides`, each `dotted.key=value` where the value is
    /// TOML (`3`, `true`, `"x"`) or else taken as a string (`policy=hash`). Then checks it.
    ///
    /// # Errors
    /// [`LbError::Io`] if the file cannot be read, [`LbError::Config`] naming the key otherwise.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, LbError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| LbError::io(format!("reading {}", p.display()), e))?,
            None => String::new(),
        };
        Ok(Self::from_toml_with_overrides(&text, overrides)?)
    }

    /// [`from_toml_str`](Self::from_toml_str) with `key=value` overrides applied on top.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the reason.
    pub fn from_toml_with_overrides(s: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table: toml::Table = s.parse().map_err(|e: toml::de::Error| {
            ConfigError::new("", format!("not valid TOML: {}", e.message().trim()))
        })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let mut config: LbConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." { String::new() } else { key };
                ConfigError::new(key, e.into_inner().message().trim().to_owned())
            })?;
        config.resolve_token()?;
        config.validate()?;
        Ok(config)
    }

    /// The admin token after `token_env` is resolved.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin.token.as_deref()
    }

    fn resolve_token(&mut self) -> Result<(), ConfigError> {
        if let Some(var) = &self.admin.token_env {
            if self.admin.token.is_some() {
                return Err(ConfigError::new(
                    "admin.token_env",
                    "set either admin.token or admin.token_env, not both",
                ));
            }
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => self.admin.token = Some(v),
                _ => {
                    return Err(ConfigError::new(
                        "admin.token_env",
                        format!("environment variable {var} is not set or empty"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the relations between values that serde cannot (ranges, required-if).
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |k: &str, r: &str| Err(ConfigError::new(k, r));
        if self.policy == PolicyKind::Hash && self.hash.key.is_none() {
            return err(
                "hash.key",
                "required when policy = \"hash\" (header:NAME, cookie:NAME or path)",
            );
        }
        if !(1..=4096).contains(&self.hash.virtual_nodes) {
            return err("hash.virtual_nodes", "must be between 1 and 4096");
        }
        if self.sticky.cookie.is_empty()
            || !self
                .sticky
                .cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return err(
                "sticky.cookie",
                "must be a non-empty cookie name of letters, digits, '_' or '-'",
            );
        }
        if self.p2c.decay.is_zero() {
            return err("p2c.decay", "must be greater than zero");
        }
        let mut names = std::collections::HashSet::new();
        for (i, inst) in self.instances.iter().enumerate() {
            validate_instance(inst).map_err(|(field, reason)| {
                ConfigError::new(format!("instances[{i}].{field}"), reason)
            })?;
            if !names.insert(inst.name.as_str()) {
                return Err(ConfigError::new(
                    format!("instances[{i}].name"),
                    format!("duplicate instance name {:?}", inst.name),
                ));
            }
        }
        let h = &self.health;
        if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
            return err("health.path", "must be an absolute path such as /health");
        }
        if h.interval.is_zero() {
            return err("health.interval", "must be greater than zero");
        }
        if h.timeout.is_zero() || h.timeout > h.interval {
            return err(
                "health.timeout",
                "must be greater than zero and at most health.interval",
            );
        }
        if h.rise == 0 {
            return err("health.rise", "must be at least 1");
        }
        if h.fall == 0 {
            return err("health.fall", "must be at least 1");
        }
        if self.passive.max_ejected_percent > 100 {
            return err("passive.max_ejected_percent", "must be between 0 and 100");
        }
        if self.passive.consecutive_failures > 0 && self.passive.ejection_time.is_zero() {
            return err("passive.ejection_time", "must be greater than zero");
        }
        let r = &self.retry;
        if !(1..=10).contains(&r.max_attempts) {
            return err("retry.max_attempts", "must be between 1 and 10");
        }
        if !(0.0..=1.0).contains(&r.budget_ratio) {
            return err("retry.budget_ratio", "must be between 0.0 and 1.0");
        }
        if r.buffer_body_bytes > 16 * 1024 * 1024 {
            return err("retry.buffer_body_bytes", "must be at most 16 MiB");
        }
        let t = &self.timeouts;
        for (k, v) in [
            ("timeouts.connect", t.connect),
            ("timeouts.request_head", t.request_head),
            ("timeouts.idle", t.idle),
            ("timeouts.upstream_response", t.upstream_response),
            ("timeouts.response_stall", t.response_stall),
            ("timeouts.upstream_idle", t.upstream_idle),
        ] {
            if v.is_zero() {
                return err(k, "must be greater than zero");
            }
        }
        if self.workers > 1024 {
            return err("workers", "must be at most 1024 (0: one per core)");
        }
        if !(1024..=1024 * 1024).contains(&self.limits.max_head_bytes) {
            return err("limits.max_head_bytes", "must be between 1024 and 1048576");
        }
        if !(1..=1000).contains(&self.limits.max_headers) {
            return err("limits.max_headers", "must be between 1 and 1000");
        }
        if self.admin.token.as_ref().is_some_and(|t| t.len() < 16) {
            return err("admin.token", "must be at least 16 characters");
        }
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return err(
                "admin.token",
                "required when admin.listen is not a loopback address (or set admin.token_env)",
            );
        }
        if self.shutdown.drain_deadline.is_zero() {
            return err("shutdown.drain_deadline", "must be greater than zero");
        }
        Ok(())
    }
}

impl LbConfig {
    /// The number of proxy workers to run: `workers`, or one per core when it is 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => n,
        }
    }
}

/// Checks one instance; on error returns the field and the reason. Shared with the admin API.
pub(crate) fn validate_instance(inst: &InstanceConfig) -> Result<(), (&'static str, String)> {
    if inst.name.is_empty()
        || inst.name.len() > 64
        || !inst
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err((
            "name",
            "must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
        ));
    }
    match inst.addr.parse::<http::uri::Authority>() {
        Ok(a) if a.port_u16().is_some() && !a.as_str().contains('@') => Ok(()),
        _ => Err(("addr", format!("{:?} is not host:port", inst.addr))),
    }
}

fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let Some((key, raw)) = spec.split_once('=') else {
        return Err(ConfigError::new(
            spec,
            "an override must look like key=value",
        ));
    };
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::new(key, "not a dotted key"));
    }
    // A value that parses as TOML keeps its type (`3`, `true`, `"x"`, `[..]`); anything else
    // (`hash`, `1s`) is a string, so the command line needs no quotes for the common case.
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let (last, path) = parts
        .split_last()
        .expect("split always yields at least one part");
    let mut cur = table;
    for (i, p) in path.iter().enumerate() {
        let entry = cur
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| {
            ConfigError::new(
                parts[..=i].join("."),
                "is not a table; cannot set a key inside it",
            )
        })?;
    }
    cur.insert((*last).to_owned(), value);
    Ok(())
}

/// Parses `"250ms"`, `"2s"`, `"1m"`, `"1h"`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected a number and a unit, like \"2s\"")
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: the unit must be ms, s, m or h"
            ));
        }
    };
    Ok(d)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_hash_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HashKey>, D::Error> {
    let s = String::deserialize(d)?;
    let bad = || {
        serde::de::Error::custom(format!(
            "invalid hash key {s:?}: expected header:NAME, cookie:NAME or path"
        ))
    };
    let key = match s.split_once(':') {
        None if s == "path" => HashKey::Path,
        Some(("header", name)) => {
            HashKey::Header(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?)
        }
        Some(("cookie", name)) if !name.is_empty() && !name.contains([';', '=', ' ']) => {
            HashKey::Cookie(name.to_owned())
        }
        _ => return Err(bad()),
    };
    Ok(Some(key))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_virtual_nodes() -> u32 {
    160
}
fn default_sticky_cookie() -> String {
    "statehouse_lb".to_owned()
}
fn default_health_path() -> String {
    "/health".to_owned()
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_buffer_body() -> u64 {
    64 * 1024
}
fn default_max_head() -> usize {
    16 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn yes() -> bool {
    true
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn five() -> u32 {
    5
}
fn ten() -> u32 {
    10
}
fn fifty() -> u32 {
    50
}
fn d_5ms() -> Duration {
    Duration::from_millis(5)
}
fn d_1s() -> Duration {
    Duration::from_secs(1)
}
fn d_2s() -> Duration {
    Duration::from_secs(2)
}
fn d_10s() -> Duration {
    Duration::from_secs(10)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(toml: &str) -> String {
        LbConfig::from_toml_str(toml)
            .expect_err("config should be refused")
            .key
    }

    #[test]
    fn empty_file_is_a_valid_config_with_defaults() {
        let c = LbConfig::from_toml_str("").unwrap();
        assert_eq!(c.policy, PolicyKind::RoundRobin);
        assert_eq!(c.health.interval, Duration::from_secs(2));
        assert_eq!(c.limits.max_head_bytes, 16384);
        assert!(c.admin.listen.ip().is_loopback());
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../lb.example.toml");
        let c = LbConfig::from_toml_str(text).unwrap();
        assert_eq!(c.instances.len(), 3);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(key_of("[health]\ninterval = \"2x\""), "health.interval");
        assert_eq!(key_of("[health]\nintervall = \"2s\""), "health.intervall");
        assert_eq!(key_of("[health]\nrise = \"two\""), "health.rise");
        assert_eq!(key_of("policy = \"fastest\""), "policy");
        assert_eq!(key_of("policy = \"hash\""), "hash.key");
        assert_eq!(key_of("[hash]\nkey = \"query:x\""), "hash.key");
        assert_eq!(
            key_of("[health]\ninterval = \"1s\"\ntimeout = \"2s\""),
            "health.timeout"
        );
        assert_eq!(
            key_of(
                "[[instances]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n[[instances]]\nname = \"a\"\naddr = \"127.0.0.1:2\""
            ),
            "instances[1].name"
        );
        assert_eq!(
            key_of("[[instances]]\nname = \"a\"\naddr = \"nope\""),
            "instances[0].addr"
        );
        assert_eq!(key_of("[admin]\nlisten = \"0.0.0.0:9901\""), "admin.token");
        assert_eq!(key_of("[retry]\nmax_attempts = 0"), "retry.max_attempts");
        assert_eq!(
            key_of("[limits]\nmax_head_bytes = 10"),
            "limits.max_head_bytes"
        );
        assert_eq!(key_of("workers = 5000"), "workers");
        assert_eq!(
            key_of("[timeouts]\nresponse_stall = \"0s\""),
            "timeouts.response_stall"
        );
    }

    #[test]
    fn workers_default_to_one_per_core() {
        let c = LbConfig::from_toml_str("").unwrap();
        assert_eq!(c.workers, 0);
        assert!(c.worker_count() >= 1);
        let c = LbConfig::from_toml_str("workers = 3").unwrap();
        assert_eq!(c.worker_count(), 3);
    }

    #[test]
    fn error_message_says_why() {
        let e = LbConfig::from_toml_str("[health]\ninterval = \"2x\"").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`health.interval`"), "{msg}");
        assert!(msg.contains("unit must be ms, s, m or h"), "{msg}");
        let e = LbConfig::from_toml_str("listen = [").unwrap_err();
        assert!(e.to_string().contains("not valid TOML"), "{e}");
    }

    #[test]
    fn overrides_apply_on_top_of_the_file_and_are_checked() {
        let c = LbConfig::from_toml_with_overrides(
            "[health]\ninterval = \"5s\"",
            &[
                "health.interval=1s".into(),
                "policy=p2c_ewma".into(),
                "retry.idempotent=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.health.interval, Duration::from_secs(1));
        assert_eq!(c.policy, PolicyKind::P2cEwma);
        assert!(c.retry.idempotent);
        let e =
            LbConfig::from_toml_with_overrides("", &["retry.max_attempts=99".into()]).unwrap_err();
        assert_eq!(e.key, "retry.max_attempts");
        let e = LbConfig::from_toml_with_overrides("", &["policy".into()]).unwrap_err();
        assert!(e.reason.contains("key=value"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
