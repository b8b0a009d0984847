//! The architectures `serve` and `up` can run (`--arch`).

use std::fmt;
use std::str::FromStr;

/// Where an instance keeps its sessions, and so how the balancer must route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Sessions in each instance's memory; the balancer pins clients with a
    /// cookie. The design the lab measures against: an instance's death
    /// takes its sessions with it.
    StickyMemory,
    /// Sessions in an SQLite file shared by the instances on one host.
    SharedSqlite,
    /// Sessions in Redis.
    SharedRedis,
    /// Sessions in a Redis Cluster.
    SharedRedisCluster,
    /// Sessions (and the orders) in Postgres.
    SharedPostgres,
    /// Identity in signed tokens and the cart in an encrypted cookie.
    Token,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Arch::StickyMemory,
        Arch::SharedSqlite,
        Arch::SharedRedis,
        Arch::SharedRedisCluster,
        Arch::SharedPostgres,
        Arch::Token,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::StickyMemory => "sticky-memory",
            Arch::SharedSqlite => "shared-sqlite",
            Arch::SharedRedis => "shared-redis",
            Arch::SharedRedisCluster => "shared-redis-cluster",
            Arch::SharedPostgres => "shared-postgres",
            Arch::Token => "token",
        }
    }

    /// The balancer policy this architecture needs.
    pub fn lb_policy(self) -> &'static str {
        match self {
            Arch::StickyMemory => "sticky",
            _ => "round_robin",
        }
    }

    /// Which store URL schemes can hold this architecture's sessions.
    pub(crate) fn session_schemes(self) -> &'static [&'static str] {
        match self {
            Arch::StickyMemory => &["memory"],
            Arch::SharedSqlite => &["sqlite"],
            Arch::SharedRedis => &["redis", "rediss"],
            Arch::SharedRedisCluster => &["redis+cluster"],
            Arch::SharedPostgres => &["postgres", "postgresql"],
            // Only the refresh-token families: any shared store.
            Arch::Token => &[
                "sqlite",
                "redis",
                "rediss",
                "redis+cluster",
                "postgres",
                "postgresql",
            ],
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Arch::ALL.iter().map(|a| a.as_str()).collect();
                format!(
                    "unknown architecture {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.as_str().parse::<Arch>(), Ok(a));
        }
        assert!(
            "sticky"
                .parse::<Arch>()
                .unwrap_err()
                .contains("sticky-memory")
        );
    }
}
