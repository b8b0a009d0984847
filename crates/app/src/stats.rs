//! What an instance tells the dashboard about itself: the requests it served
//! most recently and how many visitors it served lately. Kept in memory and
//! lost with the instance — it is observation, not state anyone relies on.
//!
//! Served at `GET /internal/stats` only with `Authorization: Bearer
//! <STATEHOUSE_ADMIN_TOKEN>`; without a configured token, or with a wrong
//! one, the route answers 404 like any unknown path.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use serde::Serialize;

/// How many recent requests an instance remembers.
const RECENT: usize = 20;
/// A visitor counts as active this long after their last request.
const ACTIVE: Duration = Duration::from_secs(300);
/// At most this many visitors are tracked (the oldest are forgotten).
const MAX_VISITORS: usize = 100_000;

/// One served request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Served {
    /// Milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) micros: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    recent: Mutex<VecDeque<Served>>,
    visitors: Mutex<HashMap<u64, Instant>>,
    hasher: std::collections::hash_map::RandomState,
}

/// The part of the identity cookie that stays the same across a visit: the
/// session id, or the refresh-token family (never the secret part).
pub(crate) fn visitor_id(headers: &HeaderMap) -> Option<&str> {
    ["shop_session", "shop_refresh"]
        .into_iter()
        .find_map(|name| crate::identity::cookie_value(headers, name))
        .and_then(|value| value.split('.').next())
        .filter(|id| !id.is_empty())
}

impl Stats {
    /// Records a served request and its visitor (see [`visitor_id`]).
    pub(crate) fn record(&self, visitor: Option<&str>, served: Served) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(served);
        }
        if let Some(id) = visitor {
            let key = self.hasher.hash_one(id);
            let now = Instant::now();
            let mut visitors = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
            if visitors.len() >= MAX_VISITORS {
                visitors.retain(|_, seen| now.duration_since(*seen) < ACTIVE);
            }
            if visitors.len() < MAX_VISITORS {
                visitors.insert(key, now);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> serde_json::Value {
        let recent: Vec<Served> = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let active = {
            let mut visitors = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            visitors.retain(|_, seen| now.duration_since(*seen) < ACTIVE);
            visitors.len()
        };
        serde_json::json!({ "recent": recent, "active_visitors": active })
    }
}

/// Constant-time comparison of a presented bearer token with ours.
pub(crate) fn authorized(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(expected) = token else {
        return false;
    };
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        h
    }

    #[test]
    fn counts_visitors_by_session_or_family_and_keeps_the_last_requests() {
        let stats = Stats::default();
        let served = |i: u64| Served {
            at_ms: i,
            method: "GET".into(),
            path: format!("/{i}"),
            status: 200,
            micros: 1,
        };
        let seen = |cookie: &str| visitor_id(&headers(cookie)).map(str::to_owned);
        assert_eq!(
            seen("x=1; shop_session=abc.2.k1.mac2").as_deref(),
            Some("abc")
        );
        assert_eq!(seen("shop_refresh=fam.3.secret").as_deref(), Some("fam"));
        assert_eq!(seen("shop_cart=zzz"), None);
        stats.record(seen("shop_session=abc.1.k1.mac").as_deref(), served(0));
        stats.record(
            seen("x=1; shop_session=abc.2.k1.mac2").as_deref(),
            served(1),
        );
        stats.record(seen("shop_refresh=fam.3.secret").as_deref(), served(2));
        for i in 3..30 {
            stats.record(None, served(i));
        }
        let snap = stats.snapshot();
        assert_eq!(snap["active_visitors"], 2);
        let recent = snap["recent"].as_array().unwrap();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent.last().unwrap()["at_ms"], 29);
    }

    #[test]
    fn the_token_must_match() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, Some("secret")));
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        assert!(authorized(&h, Some("secret")));
        assert!(!authorized(&h, Some("secreT")));
        assert!(!authorized(&h, None), "no token configured: never");
    }
}
