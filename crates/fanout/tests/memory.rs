//! The conformance suite on the memory broker.

use std::sync::Arc;

use statehouse_fanout::{Broker, BrokerConfig, Retention, open};

async fn open_broker(_test: &str, retention: Retention) -> Arc<dyn Broker> {
    open(BrokerConfig::new("memory://").retention(retention))
        .await
        .unwrap()
}

statehouse_fanout::fanout_conformance!(open_broker);
