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

/// The other side of `two_processes_share_one_file`: when started by it (the
/// variable names the file), publishes 100 messages and exits; in a normal
/// run it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_publisher() {
    let Ok(url) = std::env::var("STATEHOUSE_FANOUT_CHILD_URL") else {
        return;
    };
    let broker = open(BrokerConfig::new(url)).await.unwrap();
    for i in 0..100 {
        broker
            .publish("c", Bytes::from(format!("child-{i}")))
            .await
            .unwrap();
    }
}

/// Two real processes on one file: this one and a copy of this test binary
/// running `child_publisher`. A waiter here is woken by the other process's
/// first publish (by polling; SQLite has no cross-process signal), then both
/// publish at once: every message gets its own offset, the log is gap-free
/// and ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let here = open(BrokerConfig::new(&url)).await.unwrap();
    let waiter = {
        let here = here.clone();
        tokio::spawn(async move { here.wait("c", 0, Duration::from_secs(3600)).await })
    };
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_publisher", "--test-threads", "1"])
        .env("STATEHOUSE_FANOUT_CHILD_URL", &url)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Nothing published here yet: only the other process can end the wait.
    tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the other process's publish wakes the waiter")
        .unwrap()
        .unwrap();
    for i in 0..100 {
        here.publish("c", Bytes::from(format!("parent-{i}")))
            .await
            .unwrap();
    }
    assert!(
        child.wait().await.unwrap().success(),
        "the child publisher failed"
    );
    let batch = here.read("c", 0, None, 1000).await.unwrap();
    assert_eq!(batch.last, 200);
    let offsets: Vec<u64> = batch.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=200).collect::<Vec<_>>());
    let from_child = batch
        .messages
        .iter()
        .filter(|m| m.payload.starts_with(b"child-"))
        .count();
    assert_eq!(
        from_child, 100,
        "every message of the other process is there"
    );
}
