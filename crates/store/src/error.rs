//! Errors a caller can tell apart.
//!
//! The failure policy and the layers above (sessions, tokens) decide by the
//! variant: a `Conflict` is retried or reported as a lost race, `Unavailable`
//! goes through the `OnStoreDown` policy, `Corrupt` is logged and treated as
//! absent by sessions, `TooLarge` becomes a 413.

use std::time::Duration;

/// Result alias used across the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a conditional write did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The key (or map) exists but the write required it to be absent.
    AlreadyExists,
    /// The key (or map) is absent or expired but the write required it to exist.
    NotFound,
    /// A version condition did not hold. `field` is set for field-map conditions.
    VersionMismatch { field: Option<String> },
}

/// Why a store could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableKind {
    /// The call did not finish within the per-call timeout. A write that timed
    /// out may or may not have been applied.
    Timeout,
    /// The connection failed or was refused.
    Connection,
    /// The circuit breaker is open: the call was not attempted.
    CircuitOpen,
}

/// Every error the store reports.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict: {0:?}")]
    Conflict(Conflict),

    #[error("store {store} unavailable ({kind:?}): {detail}")]
    Unavailable {
        /// Which store, e.g. `redis://127.0.0.1:6379`, with credentials removed.
        store: String,
        kind: UnavailableKind,
        detail: String,
    },

    #[error("corrupt data in store {store} at key {key:?}: {reason}")]
    Corrupt {
        store: String,
        key: String,
        reason: String,
    },

    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },

    /// The request itself is malformed (empty key, non-integer field given to
    /// an increment, ...). Not retryable.
    #[error("invalid request: {0}")]
    Invalid(String),

    /// The store could not be opened: wrong URL, wrong credentials, a missing
    /// feature. The message names the store and what was tried.
    #[error("store configuration: {0}")]
    Config(String),

    /// The server answered with an error that fits none of the above.
    #[error("store {store} error: {detail}")]
    Backend { store: String, detail: String },
}

impl StoreError {
    /// True when the store could not be reached (timeout, connection, open
    /// circuit): the `OnStoreDown` policy applies.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// True for a lost compare-and-set race or an existence condition.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    /// A hint for `Retry-After` when the store is unavailable.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StoreError::Unavailable { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    pub(crate) fn unavailable(
        store: &str,
        kind: UnavailableKind,
        detail: impl std::fmt::Display,
    ) -> Self {
        StoreError::Unavailable {
            store: store.to_owned(),
            kind,
            detail: detail.to_string(),
        }
    }

    #[cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]
    pub(crate) fn corrupt(store: &str, key: &str, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            store: store.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    #[cfg(any(feature = "sqlite", feature = "redis", feature = "postgres"))]
    pub(crate) fn backend(store: &str, detail: impl std::fmt::Display) -> Self {
        StoreError::Backend {
            store: store.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// Removes a password from a URL before it goes into an error or a log line.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("redis://127.0.0.1:1"), "redis://127.0.0.1:1");
        assert_eq!(redact_url("redis://user@h:1"), "redis://user@h:1");
    }
}
