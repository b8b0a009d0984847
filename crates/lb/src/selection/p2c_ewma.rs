//! Least-requests by power of two choices: of two eligible instances drawn at random, the one
//! with the lower load, load = peak-EWMA latency × (in-flight + 1). Two random choices avoid the
//! herd that "always the least loaded" causes when many balancers see the same numbers.

use std::sync::Arc;

use super::{Pick, PinOutcome, RequestKey, Selector};
use crate::discovery::Backend;

/// Power of two choices over peak-EWMA load.
#[derive(Debug, Default, Clone, Copy)]
pub struct P2cEwma;

impl Selector for P2cEwma {
    fn select(
        &self,
        backends: &[Arc<Backend>],
        _key: &RequestKey<'_>,
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<Pick> {
        let candidates: Vec<usize> = (0..backends.len())
            .filter(|&i| eligible(&backends[i]))
            .collect();
        let index = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                if backends[b].load_cost() < backends[a].load_cost() {
                    b
                } else {
                    a
                }
            }
        };
        Some(Pick {
            index,
            pin: PinOutcome::NotSticky,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::selection::test_support::backends;

    #[test]
    fn prefers_the_faster_instance() {
        let b = backends(2);
        let decay = Duration::from_secs(10);
        b[0].observe_latency(Duration::from_millis(200), decay);
        b[1].observe_latency(Duration::from_millis(2), decay);
        let key = RequestKey::default();
        for _ in 0..50 {
            assert_eq!(P2cEwma.select(&b, &key, &|_| true).unwrap().index, 1);
        }
    }

    #[test]
    fn prefers_the_instance_with_fewer_requests_in_flight() {
        let b = backends(2);
        let _held: Vec<_> = (0..5).map(|_| b[0].start_request()).collect();
        let key = RequestKey::default();
        for _ in 0..50 {
            assert_eq!(P2cEwma.select(&b, &key, &|_| true).unwrap().index, 1);
        }
    }

    #[test]
    fn peak_is_taken_at_once_and_forgotten_slowly() {
        let b = backends(1);
        let decay = Duration::from_secs(10);
        b[0].observe_latency(Duration::from_millis(100), decay);
        let peak = b[0].load_cost();
        b[0].observe_latency(Duration::from_millis(1), decay);
        let after = b[0].load_cost();
        // Immediately after the peak almost no time has passed: the estimate barely moves.
        assert!(after > peak * 0.9, "peak {peak} after {after}");
    }

    #[test]
    fn only_eligible_instances_are_picked() {
        let b = backends(4);
        let key = RequestKey::default();
        for _ in 0..100 {
            let p = P2cEwma
                .select(&b, &key, &|x| x.name() == "i2" || x.name() == "i3")
                .unwrap();
            assert!(p.index >= 2);
        }
    }
}
