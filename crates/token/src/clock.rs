//! Where "now" comes from.
//!
//! Token lifetimes, refresh-family ages, cookie expiry and the JWKS cooldown all read one
//! [`Clock`]. Production code uses [`Clock::system`]; tests hold a [`ManualClock`] and move it
//! forward explicitly, so an expiry test never sleeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, as a duration since the Unix epoch. Cheap to clone.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// Time since the Unix epoch.
    pub fn now(&self) -> Duration {
        match &self.manual {
            Some(millis) => Duration::from_millis(millis.load(Ordering::SeqCst)),
            // A clock set before 1970 is a broken host; report the epoch rather than panic, so
            // every token looks expired instead of the service falling over.
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// Whole seconds since the Unix epoch (the unit of JWT `exp`, `nbf` and `iat`).
    pub fn unix_secs(&self) -> u64 {
        self.now().as_secs()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            Some(_) => write!(f, "Clock::manual({:?})", self.now()),
            None => f.write_str("Clock::system"),
        }
    }
}

/// A clock that moves only when told to, for tests and simulations.
///
/// ```
/// use statehouse_token::ManualClock;
/// use std::time::Duration;
///
/// let manual = ManualClock::at_unix_secs(1_700_000_000);
/// let clock = manual.clock();
/// manual.advance(Duration::from_secs(301));
/// assert_eq!(clock.unix_secs(), 1_700_000_301);
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `secs` seconds after the Unix epoch.
    pub fn at_unix_secs(secs: u64) -> Self {
        ManualClock {
            millis: Arc::new(AtomicU64::new(secs.saturating_mul(1000))),
        }
    }

    /// A clock standing at the current system time.
    pub fn starting_now() -> Self {
        Self::at_unix_secs(Clock::system().unix_secs())
    }

    /// A [`Clock`] that reads this manual clock.
    pub fn clock(&self) -> Clock {
        Clock {
            manual: Some(self.millis.clone()),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_add(by, Ordering::SeqCst);
    }

    /// Moves the clock backward (a host whose clock was stepped back).
    pub fn rewind(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .millis
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                Some(m.saturating_sub(by))
            });
    }

    /// Whole seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        self.clock().unix_secs()
    }
}
