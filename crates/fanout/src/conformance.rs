//! The conformance suite: written once, run unchanged on every backend.
//!
//! Each backend's test file calls [`fanout_conformance!`](crate::fanout_conformance)
//! with an async function that opens a fresh broker with the given
//! retention. Every check is a plain async function, so a failure names one
//! behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;

use crate::{Broker, BrokerError, Retention};

/// Expands to one `#[tokio::test]` per check. `$open` is the path of an
/// `async fn(&str, Retention) -> Arc<dyn Broker>` that opens an isolated
/// broker for the named test.
#[macro_export]
macro_rules! fanout_conformance {
    ($open:path) => {
        $crate::fanout_conformance!(@tests $open;
            offsets_increase_from_one, read_returns_exactly_the_gap, new_channels_are_empty,
            retention_by_count, retention_by_age, other_epochs_and_future_offsets_are_gaps,
            bad_input_is_refused, concurrent_publishes_lose_nothing, wait_wakes_on_publish,
            channels_are_separate, payloads_round_trip);
    };
    (@tests $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::conformance::$name(|retention| $open(stringify!($name), retention)).await;
            }
        )*
    };
}

fn wide() -> Retention {
    Retention {
        max_messages: 10_000,
        max_age: Duration::from_secs(3600),
    }
}

fn gap(e: BrokerError) -> (u64, u64) {
    match e {
        BrokerError::Gap { oldest, last, .. } => (oldest, last),
        other => panic!("expected a gap, got {other:?}"),
    }
}

async fn publish_n(b: &dyn Broker, channel: &str, n: usize) -> String {
    let mut epoch = String::new();
    for i in 0..n {
        let p = b
            .publish(channel, Bytes::from(format!("m{}", i + 1)))
            .await
            .unwrap();
        assert_eq!(p.offset, i as u64 + 1);
        if i > 0 {
            assert_eq!(p.epoch, epoch, "one epoch");
        }
        epoch = p.epoch;
    }
    epoch
}

pub async fn offsets_increase_from_one<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let epoch = publish_n(&*b, "c", 5).await;
    assert!(!epoch.is_empty());
    let batch = b.read("c", 0, None, 100).await.unwrap();
    assert_eq!(batch.last, 5);
    assert_eq!(batch.epoch, epoch);
    let got: Vec<(u64, &[u8])> = batch
        .messages
        .iter()
        .map(|m| (m.offset, &m.payload[..]))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, &b"m1"[..]),
            (2, b"m2"),
            (3, b"m3"),
            (4, b"m4"),
            (5, b"m5")
        ]
    );
    assert!(
        batch
            .messages
            .iter()
            .all(|m| m.channel == "c" && m.epoch == epoch)
    );
}

pub async fn read_returns_exactly_the_gap<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let epoch = publish_n(&*b, "c", 6).await;
    let batch = b.read("c", 2, Some(&epoch), 100).await.unwrap();
    let offsets: Vec<u64> = batch.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![3, 4, 5, 6]);
    let batch = b.read("c", 2, Some(&epoch), 2).await.unwrap();
    let offsets: Vec<u64> = batch.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![3, 4], "limit");
    let batch = b.read("c", 6, Some(&epoch), 100).await.unwrap();
    assert!(batch.messages.is_empty(), "up to date");
    assert_eq!(batch.last, 6);
    // Limit 0 is how the hub reads a channel's tail: no messages, the end.
    let tail = b.read("c", 0, None, 0).await.unwrap();
    assert!(tail.messages.is_empty(), "limit 0 reads no message");
    assert_eq!((tail.last, tail.epoch.as_str()), (6, epoch.as_str()));
}

pub async fn new_channels_are_empty<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let batch = b.read("never", 0, None, 10).await.unwrap();
    assert_eq!((batch.last, batch.messages.len()), (0, 0));
    assert_eq!(batch.epoch, "");
    // A reader that saw the empty epoch resumes once the log exists.
    let p = b.publish("never", Bytes::from_static(b"x")).await.unwrap();
    let batch = b.read("never", 0, Some(""), 10).await.unwrap();
    assert_eq!(batch.messages.len(), 1);
    assert_eq!(batch.epoch, p.epoch);
    b.wait("idle", 0, Duration::from_millis(20)).await.unwrap();
}

pub async fn retention_by_count<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(Retention {
        max_messages: 3,
        max_age: Duration::from_secs(3600),
    })
    .await;
    let epoch = publish_n(&*b, "c", 5).await;
    let batch = b.read("c", 0, None, 100).await.unwrap();
    let offsets: Vec<u64> = batch.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![3, 4, 5], "the newest three");
    assert_eq!(
        gap(b.read("c", 1, Some(&epoch), 100).await.unwrap_err()),
        (3, 5)
    );
    let batch = b.read("c", 2, Some(&epoch), 100).await.unwrap();
    assert_eq!(batch.messages.len(), 3, "after 2 the gap is all retained");
}

pub async fn retention_by_age<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(Retention {
        max_messages: 100,
        max_age: Duration::from_millis(300),
    })
    .await;
    let epoch = publish_n(&*b, "c", 2).await;
    // The wait is the behaviour under test (expiry).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let batch = b.read("c", 0, None, 100).await.unwrap();
    assert!(
        batch.messages.is_empty(),
        "expired messages are never returned"
    );
    assert_eq!(batch.last, 2);
    gap(b.read("c", 1, Some(&epoch), 100).await.unwrap_err());
    assert!(
        b.read("c", 2, Some(&epoch), 100)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    b.publish("c", Bytes::from_static(b"new")).await.unwrap();
    let batch = b.read("c", 2, Some(&epoch), 100).await.unwrap();
    assert_eq!(batch.messages[0].offset, 3);
}

pub async fn other_epochs_and_future_offsets_are_gaps<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let epoch = publish_n(&*b, "c", 3).await;
    gap(b
        .read("c", 1, Some("0000000000000000"), 10)
        .await
        .unwrap_err());
    gap(b.read("c", 9, Some(&epoch), 10).await.unwrap_err());
    gap(b.read("c", 2, None, 10).await.unwrap_err());
}

pub async fn bad_input_is_refused<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    for channel in ["", "a b", "../x", &"c".repeat(200)] {
        assert!(matches!(
            b.publish(channel, Bytes::from_static(b"x")).await,
            Err(BrokerError::InvalidChannel(_))
        ));
        assert!(matches!(
            b.read(channel, 0, None, 1).await,
            Err(BrokerError::InvalidChannel(_))
        ));
    }
    let big = Bytes::from(vec![0u8; 64 * 1024 + 1]);
    assert!(matches!(
        b.publish("c", big).await,
        Err(BrokerError::TooLarge { size: 65537, .. })
    ));
    assert_eq!(
        b.read("c", 0, None, 1).await.unwrap().last,
        0,
        "nothing stored"
    );
}

pub async fn concurrent_publishes_lose_nothing<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let sent = join_all((0..200).map(|i| {
        let b = b.clone();
        async move {
            b.publish("c", Bytes::from(i.to_string()))
                .await
                .unwrap()
                .offset
        }
    }))
    .await;
    let offsets: BTreeSet<u64> = sent.iter().copied().collect();
    assert_eq!(offsets, (1..=200).collect(), "every offset once");
    let batch = b.read("c", 0, None, 1000).await.unwrap();
    assert_eq!(batch.messages.len(), 200);
    assert!(
        batch
            .messages
            .windows(2)
            .all(|w| w[0].offset + 1 == w[1].offset),
        "in order"
    );
    let payloads: BTreeSet<String> = batch
        .messages
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(payloads.len(), 200);
}

pub async fn wait_wakes_on_publish<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let epoch = publish_n(&*b, "c", 1).await;
    let waiter = {
        let b = b.clone();
        // An hour: only a publish can end this wait.
        tokio::spawn(async move { b.wait("c", 1, Duration::from_secs(3600)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.publish("c", Bytes::from_static(b"wake")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("a publish wakes the waiter")
        .unwrap()
        .unwrap();
    let batch = b.read("c", 1, Some(&epoch), 10).await.unwrap();
    assert_eq!(&batch.messages[0].payload[..], b"wake");
    // Already past: resolves at once.
    tokio::time::timeout(
        Duration::from_secs(10),
        b.wait("c", 0, Duration::from_secs(3600)),
    )
    .await
    .expect("wait returns when messages are already there")
    .unwrap();
}

pub async fn channels_are_separate<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    publish_n(&*b, "a", 2).await;
    publish_n(&*b, "b", 3).await;
    assert_eq!(b.read("a", 0, None, 10).await.unwrap().messages.len(), 2);
    let batch = b.read("b", 0, None, 10).await.unwrap();
    assert_eq!(batch.last, 3);
    assert!(batch.messages.iter().all(|m| m.channel == "b"));
}

pub async fn payloads_round_trip<F, Fut>(open: F)
where
    F: Fn(Retention) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let b = open(wide()).await;
    let payloads = [
        Bytes::new(),
        Bytes::from_static(b"\0\xff\n\r"),
        Bytes::from(vec![7u8; 64 * 1024]),
    ];
    for p in &payloads {
        b.publish("c", p.clone()).await.unwrap();
    }
    let batch = b.read("c", 0, None, 10).await.unwrap();
    let got: Vec<Bytes> = batch.messages.into_iter().map(|m| m.payload).collect();
    assert_eq!(got, payloads);
}
