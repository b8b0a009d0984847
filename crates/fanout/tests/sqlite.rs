//! The conformance suite on the SQLite broker, each test in its own file;
//! and two processes' worth of brokers sharing one file.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use statehouse_fanout::{Broker, BrokerConfig, Retention, open};

async fn open_broker(test: &str, retention: Retention) -> Arc<dyn Broker> {
    // Kept for the test binary's life: the broker holds the file open.
    let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    let url = format!(
        "sqlite://{}",
        dir.path().join(format!("{test}.db")).display()
    );
    open(BrokerConfig::new(url).retention(retention))
        .await
        .unwrap()
}

statehouse_fanout::fanout_conformance!(open_broker);

/// Two brokers on one file (as two processes would have): offsets stay
/// unique and ordered, and one broker's waiter sees the other's publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let a = open(BrokerConfig::new(&url)).await.unwrap();
    let b = open(BrokerConfig::new(&url)).await.unwrap();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait("c", 0, Duration::from_secs(3600)).await })
    };
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|broker| {
            tokio::spawn(async move {
                for i in 0..100 {
                    broker
                        .publish("c", Bytes::from(i.to_string()))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the other broker's publish wakes the waiter")
        .unwrap()
        .unwrap();
    let batch = a.read("c", 0, None, 1000).await.unwrap();
    assert_eq!(batch.last, 200);
    let offsets: Vec<u64> = batch.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=200).collect::<Vec<_>>());
}
