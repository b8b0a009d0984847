//! `statehouse worker`: processes placed orders from the queue the orders
//! table is, in its own process, never inside a web instance.
//!
//! At-least-once: an order is leased, handled, then marked fulfilled only if
//! this worker still holds it. A worker killed mid-order leaves a lease that
//! expires, and the order is taken again; handling is idempotent (the
//! transition to `fulfilled` is conditional), so twice is harmless.

use std::future::Future;
use std::time::Duration;

use crate::db::Db;
use crate::error::AppError;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub name: String,
    pub database: String,
    /// How long a claimed order stays this worker's.
    pub lease: Duration,
    /// How long to wait when the queue is empty.
    pub poll: Duration,
    /// Simulated work per order (packing, payment capture...).
    pub work: Duration,
    /// The fan-out broker order status is published to (see
    /// [`crate::live`]); `None`: not published.
    pub broker: Option<String>,
}

impl WorkerConfig {
    pub fn new(name: impl Into<String>, database: impl Into<String>) -> Self {
        WorkerConfig {
            name: name.into(),
            database: database.into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_millis(200),
            work: Duration::from_millis(300),
            broker: None,
        }
    }
}

/// Processes orders until `shutdown` resolves; the order in hand is
/// finished first.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let db = Db::open(&config.database).await?;
    let mut live = Announcer::new(config.broker.clone());
    tracing::info!(worker = config.name, "worker processing orders");
    tokio::pin!(shutdown);
    loop {
        live.announce(&db).await;
        let claimed = tokio::select! {
            () = &mut shutdown => break,
            claimed = db.claim_order(&config.name, config.lease) => claimed,
        };
        match claimed {
            Ok(Some(order)) => {
                tracing::info!(
                    order = order.id,
                    attempt = order.attempts,
                    "processing order"
                );
                live.announce(&db).await;
                tokio::time::sleep(config.work).await;
                match db.fulfil_order(order.id, &config.name).await {
                    Ok(true) => tracing::info!(order = order.id, "order fulfilled"),
                    Ok(false) => {
                        tracing::warn!(order = order.id, "lease lost; another worker has the order")
                    }
                    Err(e) => tracing::warn!(order = order.id, "cannot mark fulfilled: {e}"),
                }
            }
            Ok(None) => {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(config.poll) => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot claim an order: {e}; retrying");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(config.poll * 5) => {}
                }
            }
        }
    }
    tracing::info!(worker = config.name, "worker stopped");
    Ok(())
}

/// Publishes order status changes, opening the broker when it can (a
/// broker that is down at start, or later, only delays the messages: the
/// orders table remembers what is still to publish).
struct Announcer {
    url: Option<String>,
    broker: Option<std::sync::Arc<dyn statehouse_fanout::Broker>>,
}

impl Announcer {
    fn new(url: Option<String>) -> Self {
        Announcer { url, broker: None }
    }

    async fn announce(&mut self, db: &Db) {
        let Some(url) = &self.url else { return };
        if self.broker.is_none() {
            match statehouse_fanout::open(statehouse_fanout::BrokerConfig::new(url)).await {
                Ok(broker) => self.broker = Some(broker),
                Err(e) => {
                    tracing::warn!("fan-out broker unavailable: {e}; order status will follow");
                    return;
                }
            }
        }
        if let Some(broker) = &self.broker
            && let Err(e) = crate::live::announce(db, broker.as_ref()).await
        {
            tracing::warn!("cannot publish order status yet: {e}");
        }
    }
}
