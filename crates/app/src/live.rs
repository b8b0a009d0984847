//! Live order status: the worker publishes every status change of an order
//! to the owner's channel `orders.<user id>`; any instance's WebSocket hub
//! (`/ws`) relays it to the browser, which resumes from its last offset
//! when it reconnects — to whichever instance the balancer picks.
//!
//! The orders table is the outbox: the worker publishes each order whose
//! `status` differs from its `announced` column and then records it, so a
//! worker killed between the two publishes again (at least once; a status
//! message says what the status *is*, so a repeat is harmless) and no
//! change is ever skipped.
//!
//! The browser gets a short-lived *live token* from `GET /api/live` (a JWT
//! for the audience `shop-live`, signed with the shop's token key ring and
//! naming the user) and sends it in its `hello`; the hub admits it to that
//! user's channel only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use statehouse_fanout::Broker;
use statehouse_fanout::hub::{Hub, HubConfig, TokenAuth};
use statehouse_token::{IssuerConfig, KeyRing, TokenIssuer, TokenVerifier, VerifierConfig};

use crate::db::{Db, Order};
use crate::error::AppError;

const ISSUER: &str = "statehouse-shop";
const AUDIENCE: &str = "shop-live";
/// A live token only opens a connection; the hub closes it (4401) at
/// expiry and the page fetches a new one.
const LIVE_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Orders published per round of [`announce`].
const ANNOUNCE_BATCH: i64 = 100;

/// The channel of `user`'s orders.
pub fn channel(user_id: i64) -> String {
    format!("orders.{user_id}")
}

/// What a status message says.
#[derive(Debug, Serialize)]
struct StatusMessage<'a> {
    order: i64,
    status: &'a str,
    total_cents: i64,
    processed_by: &'a str,
}

fn status_message(order: &Order) -> Bytes {
    let message = StatusMessage {
        order: order.id,
        status: &order.status,
        total_cents: order.total_cents,
        processed_by: &order.processed_by,
    };
    Bytes::from(serde_json::to_vec(&message).expect("a status message serializes"))
}

/// Publishes every order status not yet published; returns how many. Stops
/// at the first failed publish (the broker is down): what is left is
/// published by a later round.
pub async fn announce(db: &Db, broker: &dyn Broker) -> Result<usize, AppError> {
    let mut published = 0;
    loop {
        let orders = db.unannounced_orders(ANNOUNCE_BATCH).await?;
        if orders.is_empty() {
            return Ok(published);
        }
        for order in &orders {
            broker
                .publish(&channel(order.user_id), status_message(order))
                .await
                .map_err(|e| AppError::Unavailable(format!("fan-out broker: {e}")))?;
            db.mark_announced(order.id, &order.status).await?;
            published += 1;
        }
    }
}

/// The live-token keys: the shop's token key ring, `STATEHOUSE_TOKEN_KEYS`
/// (`up` sets it for every child, whatever the architecture).
pub fn keys_from_env() -> Result<KeyRing, AppError> {
    let var = crate::identity::TOKEN_KEYS_VAR;
    KeyRing::from_env(var)
        .map_err(|e| AppError::BadRequest(format!("--broker needs {var} to sign live tokens: {e}")))
}

/// Issues live tokens and builds the hub that accepts them.
#[derive(Debug, Clone)]
pub struct Live {
    issuer: Arc<TokenIssuer>,
    hub: Hub,
}

impl Live {
    /// The hub for instance `name` on `broker`, admitting live tokens signed
    /// with `ring` (every instance must share it).
    pub fn new(broker: Arc<dyn Broker>, ring: KeyRing, name: &str) -> Result<Live, AppError> {
        let issuer = TokenIssuer::new(
            ring.clone(),
            IssuerConfig::new(ISSUER, AUDIENCE).access_lifetime(LIVE_TOKEN_LIFETIME),
        )
        .map_err(|e| AppError::BadRequest(format!("live tokens: {e}")))?;
        let verifier = TokenVerifier::new(ring, VerifierConfig::new(ISSUER, AUDIENCE));
        let auth = TokenAuth::new(verifier).channels(|who, ch| {
            who.subject
                .parse::<i64>()
                .is_ok_and(|user| ch == channel(user))
        });
        let hub = Hub::new(broker, Arc::new(auth), HubConfig::new(name), None);
        Ok(Live {
            issuer: Arc::new(issuer),
            hub,
        })
    }

    /// A token for `user_id`'s live channel.
    pub fn token(&self, user_id: i64) -> Result<String, AppError> {
        self.issuer
            .issue_access(&user_id.to_string(), Default::default())
            .map(|(token, _)| token)
            .map_err(|e| AppError::internal("issuing a live token", e))
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}
