//! Round robin: each eligible instance in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Pick, PinOutcome, RequestKey, Selector};
use crate::discovery::Backend;

/// Each instance in turn, skipping ineligible ones.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub(crate) fn pick(
        &self,
        backends: &[Arc<Backend>],
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        // Relaxed is enough: the counter only spreads load, it orders nothing.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| eligible(&backends[i]))
    }
}

impl Selector for RoundRobin {
    fn select(
        &self,
        backends: &[Arc<Backend>],
        _key: &RequestKey<'_>,
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<Pick> {
        self.pick(backends, eligible).map(|index| Pick {
            index,
            pin: PinOutcome::NotSticky,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::test_support::backends;

    #[test]
    fn takes_turns_and_skips_ineligible() {
        let b = backends(3);
        let rr = RoundRobin::default();
        let key = RequestKey::default();
        let picks: Vec<usize> = (0..6)
            .map(|_| rr.select(&b, &key, &|_| true).unwrap().index)
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let not_1 = |x: &Backend| x.name() != "i1";
        let picks: Vec<usize> = (0..4)
            .map(|_| rr.select(&b, &key, &not_1).unwrap().index)
            .collect();
        assert!(!picks.contains(&1));
        assert!(rr.select(&b, &key, &|_| false).is_none());
        assert!(rr.select(&[], &key, &|_| true).is_none());
    }
}
