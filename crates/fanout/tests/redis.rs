//! The conformance suite on Redis Streams: a private standalone server, and
//! a private six-node Redis Cluster.

use std::sync::Arc;

use statehouse_fanout::{Broker, BrokerConfig, Retention, open};
use statehouse_testkit::{shared_cluster, shared_redis, unique_prefix};

async fn open_redis(test: &str, retention: Retention) -> Arc<dyn Broker> {
    open(
        BrokerConfig::new(shared_redis().url())
            .retention(retention)
            .prefix(unique_prefix(test)),
    )
    .await
    .unwrap()
}

async fn open_cluster(test: &str, retention: Retention) -> Arc<dyn Broker> {
    let hosts: Vec<String> = shared_cluster()
        .urls()
        .iter()
        .map(|u| u.trim_start_matches("redis://").to_owned())
        .collect();
    open(
        BrokerConfig::new(format!("redis+cluster://{}", hosts.join(",")))
            .retention(retention)
            .prefix(unique_prefix(test)),
    )
    .await
    .unwrap()
}

mod standalone {
    statehouse_fanout::fanout_conformance!(super::open_redis);
}

mod cluster {
    statehouse_fanout::fanout_conformance!(super::open_cluster);
}
