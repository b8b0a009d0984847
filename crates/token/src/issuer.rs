//! Issuing access tokens.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Header;

use crate::claims::{Claims, RESERVED_CLAIMS};
use crate::clock::Clock;
use crate::error::IssueError;
use crate::keys::KeyRing;
use crate::random;

/// The default access-token lifetime: short, because an access token is checked without a
/// round trip (unless a revocation list is configured) and so cannot be withdrawn cheaply.
pub const DEFAULT_ACCESS_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// Who issues, for whom, and for how long.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The `iss` claim, e.g. `https://shop.example`.
    pub issuer: String,
    /// The `aud` claim: the services the token is meant for.
    pub audience: Vec<String>,
    /// `exp - iat`. Default [`DEFAULT_ACCESS_LIFETIME`] (5 minutes).
    pub access_lifetime: Duration,
}

impl IssuerConfig {
    /// Tokens from `issuer` for one `audience`, living [`DEFAULT_ACCESS_LIFETIME`].
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        IssuerConfig {
            issuer: issuer.into(),
            audience: vec![audience.into()],
            access_lifetime: DEFAULT_ACCESS_LIFETIME,
        }
    }

    pub fn access_lifetime(mut self, lifetime: Duration) -> Self {
        self.access_lifetime = lifetime;
        self
    }
}

/// Signs access tokens with the newest signing key of a [`KeyRing`].
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    keys: KeyRing,
    config: IssuerConfig,
    clock: Clock,
}

impl TokenIssuer {
    /// Fails with [`IssueError::NoSigningKey`] when no key of the ring has a private part.
    pub fn new(keys: KeyRing, config: IssuerConfig) -> Result<Self, IssueError> {
        if keys.signing_key().is_none() {
            return Err(IssueError::NoSigningKey);
        }
        Ok(TokenIssuer {
            keys,
            config,
            clock: Clock::system(),
        })
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    /// A signed access token for `subject`, and its claims. `extra` claims are added as they are;
    /// they may not use a registered name ([`RESERVED_CLAIMS`]).
    pub fn issue_access(
        &self,
        subject: &str,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, Claims), IssueError> {
        self.issue_access_at(subject, extra, self.clock.unix_secs())
    }

    /// [`TokenIssuer::issue_access`] as if the time were `now` (seconds since the Unix epoch).
    pub fn issue_access_at(
        &self,
        subject: &str,
        extra: serde_json::Map<String, serde_json::Value>,
        now: u64,
    ) -> Result<(String, Claims), IssueError> {
        if subject.is_empty() {
            return Err(IssueError::EmptySubject);
        }
        if let Some(reserved) = extra.keys().find(|k| RESERVED_CLAIMS.contains(&k.as_str())) {
            return Err(IssueError::ReservedClaim(reserved.clone()));
        }
        let key = self.keys.signing_key().ok_or(IssueError::NoSigningKey)?;
        // `new` refused a ring without a signing key, and the ring is immutable.
        let encoding = key.encoding().ok_or(IssueError::NoSigningKey)?;
        let jti = random::bytes::<16>().map_err(|e| IssueError::Random(e.to_string()))?;
        let claims = Claims {
            iss: self.config.issuer.clone(),
            sub: subject.to_owned(),
            aud: self.config.audience.clone(),
            exp: now.saturating_add(self.config.access_lifetime.as_secs()),
            nbf: Some(now),
            iat: now,
            jti: URL_SAFE_NO_PAD.encode(jti),
            extra,
        };
        let mut header = Header::new(key.alg().jwt());
        header.kid = Some(key.kid().to_owned());
        let token = jsonwebtoken::encode(&header, &claims, encoding)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok((token, claims))
    }
}
