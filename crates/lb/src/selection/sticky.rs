//! Sticky cookie: the stateful contrast mode. A cookie names the instance (opaquely, by
//! [`Backend::sticky_id`]); while that instance is eligible every request of the client goes
//! there. When it is gone, down or draining, the request is re-picked by the inner selector and
//! the outcome says [`PinOutcome::Broken`], so the proxy re-sets the cookie and counts the broken
//! pin: the number the lab compares against the externalized-state designs.

use std::sync::Arc;

use super::{Pick, PinOutcome, RequestKey, RoundRobin, Selector};
use crate::discovery::Backend;

/// Pins clients by cookie; new and broken pins are placed round robin.
#[derive(Debug)]
pub struct Sticky {
    inner: RoundRobin,
}

impl Sticky {
    /// Sticky selection over `inner` for new and broken pins.
    pub fn new(inner: RoundRobin) -> Self {
        Self { inner }
    }
}

impl Selector for Sticky {
    fn select(
        &self,
        backends: &[Arc<Backend>],
        key: &RequestKey<'_>,
        eligible: &dyn Fn(&Backend) -> bool,
    ) -> Option<Pick> {
        let outcome = match key.pin {
            None => PinOutcome::New,
            Some(pin) => match backends.iter().position(|b| b.sticky_id() == pin) {
                Some(i) if eligible(&backends[i]) => {
                    return Some(Pick {
                        index: i,
                        pin: PinOutcome::Kept,
                    });
                }
                // A pin naming an instance that is ineligible or no longer exists: broken. An
                // unknown value may also be a forged or stale cookie; it is treated the same.
                _ => PinOutcome::Broken,
            },
        };
        self.inner.pick(backends, eligible).map(|index| Pick {
            index,
            pin: outcome,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::test_support::backends;

    #[test]
    fn pins_keep_and_break() {
        let b = backends(3);
        let s = Sticky::new(RoundRobin::default());
        let first = s.select(&b, &RequestKey::default(), &|_| true).unwrap();
        assert_eq!(first.pin, PinOutcome::New);
        let pin = b[first.index].sticky_id().to_owned();
        let key = RequestKey {
            hash_key: None,
            pin: Some(&pin),
        };
        for _ in 0..5 {
            assert_eq!(
                s.select(&b, &key, &|_| true).unwrap(),
                Pick {
                    index: first.index,
                    pin: PinOutcome::Kept
                }
            );
        }
        let down = b[first.index].name().to_owned();
        let re = s.select(&b, &key, &|x| x.name() != down).unwrap();
        assert_eq!(re.pin, PinOutcome::Broken);
        assert_ne!(re.index, first.index);
        let forged = RequestKey {
            hash_key: None,
            pin: Some("0000"),
        };
        assert_eq!(
            s.select(&b, &forged, &|_| true).unwrap().pin,
            PinOutcome::Broken
        );
    }
}
