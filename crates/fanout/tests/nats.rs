//! The conformance suite on NATS JetStream: a private nats-server with
//! JetStream, started by the testkit.

use std::sync::Arc;

use statehouse_fanout::{Broker, BrokerConfig, Retention, open};
use statehouse_testkit::{shared_nats, unique_prefix};

async fn open_nats(test: &str, retention: Retention) -> Arc<dyn Broker> {
    open(
        BrokerConfig::new(shared_nats().url())
            .retention(retention)
            .prefix(unique_prefix(test)),
    )
    .await
    .unwrap()
}

statehouse_fanout::fanout_conformance!(open_nats);
