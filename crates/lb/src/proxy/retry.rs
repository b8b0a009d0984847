//! The retry budget: retries are allowed as a share of recent traffic, plus a small floor per
//! second, so that when every instance fails, retries cannot multiply the load (the failure
//! mode of "retry 3 times" everywhere).
//!
//! Each request deposits `ratio` of a retry (the deposits are capped at what 1,000 requests
//! earn, so a long calm spell does not bank an avalanche); each retry withdraws one. The floor,
//! `min_per_sec` retries, refills continuously and is spent first.

use std::sync::Mutex;

use tokio::time::Instant;

/// A budget shared by every request of one balancer.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    earned: f64,
    floor: f64,
    refilled: Instant,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64, min_per_sec: u32) -> Self {
        let min_per_sec = f64::from(min_per_sec);
        Self {
            ratio,
            min_per_sec,
            state: Mutex::new(State {
                earned: 0.0,
                floor: min_per_sec,
                refilled: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Held for a few float operations, never across an await; a poisoned lock holds valid
        // numbers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request started.
    pub(crate) fn deposit(&self) {
        let mut s = self.lock();
        s.earned = (s.earned + self.ratio).min(self.ratio * 1000.0);
    }

    /// Takes one retry if the budget allows.
    pub(crate) fn withdraw(&self) -> bool {
        let mut s = self.lock();
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.floor = (s.floor + elapsed * self.min_per_sec).min(self.min_per_sec);
        s.refilled = now;
        if s.floor >= 1.0 {
            s.floor -= 1.0;
            true
        } else if s.earned >= 1.0 {
            s.earned -= 1.0;
            true
        } else {
            false
        }
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
