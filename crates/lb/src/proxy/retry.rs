//! The retry budget: retries are allowed as a share of recent traffic, plus a small floor per
//! second, so that when every instance fails, retries cannot multiply the load (the failure
//! mode of "retry 3 times" everywhere).
//!
//! Each request deposits `ratio` of a retry (the deposits are capped at what 1,000 requests
//! earn, so a long calm spell does not bank an avalanche); each retry withdraws one. The floor,
//! `min_per_sec` retries, refills continuously and is spent first.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

/// Budget amounts are kept in millionths of a retry, so that deposits are integer atomics.
const UNIT: f64 = 1_000_000.0;

/// A budget shared by every request of one balancer.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// `ratio` in units.
    ratio: u64,
    /// The cap on `earned`: what 1,000 requests earn.
    cap: u64,
    min_per_sec: f64,
    /// Earned by requests, in units. An atomic and not part of `floor`'s lock: every request
    /// deposits, and once the cap is reached a deposit is a plain read (no write to bounce
    /// between cores).
    earned: AtomicU64,
    floor: Mutex<Floor>,
}

#[derive(Debug)]
struct Floor {
    available: f64,
    refilled: Instant,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64, min_per_sec: u32) -> Self {
        let min_per_sec = f64::from(min_per_sec);
        let ratio = (ratio * UNIT).round() as u64;
        Self {
            ratio,
            cap: ratio.saturating_mul(1000),
            min_per_sec,
            earned: AtomicU64::new(0),
            floor: Mutex::new(Floor {
                available: min_per_sec,
                refilled: Instant::now(),
            }),
        }
    }

    /// A request started.
    pub(crate) fn deposit(&self) {
        let (ratio, cap) = (self.ratio, self.cap);
        // `None` (no write) once the cap is reached.
        let _ = self
            .earned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                (e < cap).then(|| (e + ratio).min(cap))
            });
    }

    /// Takes one retry if the budget allows.
    pub(crate) fn withdraw(&self) -> bool {
        {
            // Held for a few float operations, never across an await; a poisoned lock holds
            // valid numbers.
            let mut f = self.floor.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(f.refilled).as_secs_f64();
            f.available = (f.available + elapsed * self.min_per_sec).min(self.min_per_sec);
            f.refilled = now;
            if f.available >= 1.0 {
                f.available -= 1.0;
                return true;
            }
        }
        let one = UNIT as u64;
        self.earned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                (e >= one).then(|| e - one)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn floor_then_ratio_then_nothing() {
        let b = RetryBudget::new(0.1, 2);
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "floor spent, nothing earned");
        for _ in 0..20 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "20 requests at 10% earn 2 retries");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "the floor refills to min_per_sec, no more");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_are_capped() {
        let b = RetryBudget::new(0.5, 0);
        for _ in 0..100_000 {
            b.deposit();
        }
        let mut n = 0;
        while b.withdraw() {
            n += 1;
        }
        assert_eq!(n, 500);
    }
}
