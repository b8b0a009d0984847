//! The revocation list: access tokens withdrawn before their expiry, by `jti`.
//!
//! Each entry is one store key, `revoked:{jti}`, whose TTL runs out when the token would have
//! expired anyway (plus the leeway), so the list never holds more than the tokens revoked within
//! one access-token lifetime and needs no cleanup job.

use std::time::Duration;

use statehouse_store::{Condition, Store, StoreError};

use crate::claims::Claims;
use crate::clock::Clock;
use crate::verifier::DEFAULT_LEEWAY;

/// Revoked token ids in a shared store.
#[derive(Debug, Clone)]
pub struct RevocationList {
    store: Store,
    leeway: Duration,
    clock: Clock,
}

impl RevocationList {
    /// A list in `store`, keeping each entry [`DEFAULT_LEEWAY`] past its token's expiry. The
    /// leeway must be at least the verifiers' leeway, or a revoked token could verify again in
    /// the gap between its entry expiring and the verifier giving up on it.
    pub fn new(store: Store) -> Self {
        RevocationList {
            store,
            leeway: DEFAULT_LEEWAY,
            clock: Clock::system(),
        }
    }

    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Revokes the token `jti` that expires at `exp` (seconds since the Unix epoch). A token
    /// already past `exp + leeway` needs no entry; nothing is written for it.
    pub async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError> {
        let until = Duration::from_secs(exp).saturating_add(self.leeway);
        let now = self.clock.now();
        let Some(ttl) = until.checked_sub(now).filter(|t| !t.is_zero()) else {
            return Ok(());
        };
        // Stores resolve TTLs to the millisecond; a sub-millisecond remainder rounds up.
        let ttl = ttl.max(Duration::from_millis(1));
        self.store
            .put(&entry_key(jti), "1", Some(ttl), Condition::Any)
            .await?;
        Ok(())
    }

    /// Revokes the token these claims came from.
    pub async fn revoke_claims(&self, claims: &Claims) -> Result<(), StoreError> {
        self.revoke(&claims.jti, claims.exp).await
    }

    /// True if `jti` is on the list. One GET.
    ///
    /// Under a store policy of `FailOpen` a read while the store is down answers "absent", so a
    /// revoked token is accepted until the store returns (at most one access-token lifetime of
    /// exposure); `FailClosed` (the default) makes verification fail with 503 instead.
    pub async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let read = self.store.get(&entry_key(jti)).await?;
        match read.state {
            statehouse_store::ReadState::Fresh => Ok(read.value.is_some()),
            // A fail-open "absent" says nothing about revocation: accepting
            // the token would let a revoked one through while the store is
            // down. Security checks fail closed whatever the store's policy.
            statehouse_store::ReadState::Degraded => Err(StoreError::Unavailable {
                store: self.store.describe().to_owned(),
                kind: statehouse_store::UnavailableKind::Connection,
                detail: "revocation list unreachable (fail-open read refused)".into(),
            }),
            // A cached answer at most `max_age` old: a revocation newer than
            // that can be missed, as the policy documents.
            statehouse_store::ReadState::Stale { age } => {
                tracing::debug!(?age, "revocation list answered from the stale cache");
                Ok(read.value.is_some())
            }
        }
    }
}

fn entry_key(jti: &str) -> String {
    format!("revoked:{jti}")
}
