//! Errors of the load balancer. Configuration errors name the key and the reason; run-time
//! errors are few, because a proxy reports failures of single requests as HTTP statuses, never as
//! `Err` from [`run`](crate::run).

use std::fmt;

/// A configuration that cannot be used: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted path of the offending key (`health.interval`, `instances[2].addr`), or `""`
    /// for a file that is not valid TOML at all.
    pub key: String,
    /// Why the value was refused, in words a person can act on.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "invalid configuration: {}", self.reason)
        } else {
            write!(f, "invalid configuration: `{}`: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why [`run`](crate::run) (or loading its configuration) failed.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// The configuration was refused; see [`ConfigError`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or socket operation failed (reading the configuration, accepting connections).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl LbError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
