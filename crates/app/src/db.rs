//! The durable database: users and orders, on SQLite or Postgres through
//! sqlx's `Any` driver, with the schema migrations embedded.
//!
//! The orders table is also the worker's queue. An order is `placed` by a
//! checkout, leased by a worker (`processing` until `lease_until`), and
//! `fulfilled`. A worker that dies mid-order loses its lease and another
//! worker takes the order again: at-least-once, with every transition
//! conditional on the state it leaves, so handling twice changes nothing.
//!
//! Every write is one statement, so SQLite's one-writer lock is held for a
//! single statement and several processes share the file safely (WAL, busy
//! timeout).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::AppError;

/// Which engine is behind the pool: the two differ in the queue's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// A user as the shop shows it (never the password hash).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub email: String,
}

/// One order: what was bought, its state, and who handled it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub idempotency_key: String,
    pub items: BTreeMap<String, u32>,
    pub total_cents: i64,
    pub status: String,
    pub attempts: i64,
    pub served_by: String,
    pub processed_by: String,
    pub created_at: i64,
}

/// The columns of an [`Order`], as a literal so every query stays a static
/// string.
macro_rules! order_columns {
    () => {
        "id, user_id, idempotency_key, items, total_cents, status, attempts, served_by, processed_by, created_at"
    };
}

/// The queue's claim, with the engine's row lock (`$lock`) in the subquery.
/// The outer condition repeats the inner one: under Postgres' read committed
/// the row is re-checked after its lock, so two workers can never both move
/// the same order to processing.
macro_rules! claim_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE orders SET status = 'processing', lease_until = $1, attempts = attempts + 1, processed_by = $2 ",
            "WHERE id = (SELECT id FROM orders WHERE status = 'placed' OR (status = 'processing' AND lease_until < $3) ",
            "ORDER BY id LIMIT 1",
            $lock,
            ") AND (status = 'placed' OR (status = 'processing' AND lease_until < $3)) RETURNING ",
            order_columns!()
        )
    };
}

/// A pool on the durable database.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
}

/// The outcome of a checkout.
#[derive(Debug)]
pub enum Placed {
    /// A new order.
    Created(Order),
    /// This idempotency key already made this order: the same answer again.
    Replayed(Order),
}

impl Db {
    /// Connects to `url` (`sqlite://PATH` — created if missing — or
    /// `postgres://...`) and applies the embedded migrations.
    pub async fn open(url: &str) -> Result<Db, AppError> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            DbKind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            DbKind::Postgres
        } else {
            return Err(AppError::BadRequest(format!(
                "database URL {url:?}: expected sqlite://PATH or postgres://..."
            )));
        };
        let url = match kind {
            DbKind::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if kind == DbKind::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
            .map_err(|e| {
                AppError::Unavailable(format!("cannot open the database {}: {e}", redact(&url)))
            })?;
        let db = Db { pool, kind };
        db.migrate().await?;
        Ok(db)
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    async fn migrate(&self) -> Result<(), AppError> {
        let mut migrator = match self.kind {
            DbKind::Sqlite => sqlx::migrate!("migrations/sqlite"),
            DbKind::Postgres => sqlx::migrate!("migrations/postgres"),
        };
        // Its own history table: the session store may live in the same
        // database with migrations of its own (shared-postgres). Set from the
        // first release, so no history is ever re-read under another name.
        migrator.dangerous_set_table_name("_statehouse_shop_migrations");
        // Several processes starting at once on a fresh SQLite file can race
        // on the first migration (Postgres takes an advisory lock); the loser
        // finds it applied on the next try.
        let mut tries = 0;
        loop {
            match migrator.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::debug!("migration attempt {tries} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => return Err(AppError::internal("applying the migrations", e)),
            }
        }
    }

    /// Creates a user; `Conflict` when the email is taken.
    pub async fn create_user(&self, email: &str, password_hash: &str) -> Result<User, AppError> {
        let row = sqlx::query(
            "INSERT INTO users (email, password_hash, created_at) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(email)
        .bind(password_hash)
        .bind(crate::now_secs())
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(row) => Ok(User {
                id: row.try_get("id")?,
                email: email.to_owned(),
            }),
            Err(e)
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                Err(AppError::Conflict(format!("{email} is already signed up")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The user with this email and their password hash.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<(User, String)>, AppError> {
        let row = sqlx::query("SELECT id, password_hash FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok((
                User {
                    id: row.try_get("id")?,
                    email: email.to_owned(),
                },
                row.try_get("password_hash")?,
            ))
        })
        .transpose()
    }

    /// The user with this id.
    pub async fn user_by_id(&self, id: i64) -> Result<Option<User>, AppError> {
        let row = sqlx::query("SELECT email FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(User {
                id,
                email: row.try_get("email")?,
            })
        })
        .transpose()
    }

    /// Places an order once per (user, idempotency key): a retried checkout
    /// gets the order the first attempt made. The same key with a different
    /// cart is refused.
    pub async fn place_order(
        &self,
        user_id: i64,
        key: &str,
        items: &BTreeMap<String, u32>,
        total_cents: i64,
        served_by: &str,
    ) -> Result<Placed, AppError> {
        let items_json =
            serde_json::to_string(items).map_err(|e| AppError::internal("items", e))?;
        let inserted = sqlx::query(
            "INSERT INTO orders (user_id, idempotency_key, items, total_cents, status, served_by, created_at) \
             VALUES ($1, $2, $3, $4, 'placed', $5, $6) \
             ON CONFLICT (user_id, idempotency_key) DO NOTHING",
        )
        .bind(user_id)
        .bind(key)
        .bind(&items_json)
        .bind(total_cents)
        .bind(served_by)
        .bind(crate::now_secs())
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let order = self
            .order_by_key(user_id, key)
            .await?
            .ok_or_else(|| AppError::internal("checkout", "the order just placed is not there"))?;
        if inserted {
            Ok(Placed::Created(order))
        } else if order.items == *items {
            Ok(Placed::Replayed(order))
        } else {
            Err(AppError::Unprocessable(format!(
                "idempotency key {key:?} already placed order {} with a different cart",
                order.id
            )))
        }
    }

    /// The order a (user, idempotency key) placed, if any.
    pub async fn order_by_key(&self, user_id: i64, key: &str) -> Result<Option<Order>, AppError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE user_id = $1 AND idempotency_key = $2"
        ))
        .bind(user_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(order_from_row).transpose()
    }

    /// A user's orders, oldest first.
    pub async fn orders(&self, user_id: i64) -> Result<Vec<Order>, AppError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE user_id = $1 ORDER BY id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(order_from_row).collect()
    }

    /// Leases the oldest order waiting for a worker (placed, or processing
    /// with an expired lease) to `worker` until `lease` from now.
    pub async fn claim_order(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<Order>, AppError> {
        let now = crate::now_secs();
        let sql = match self.kind {
            DbKind::Postgres => claim_sql!(" FOR UPDATE SKIP LOCKED"),
            DbKind::Sqlite => claim_sql!(""),
        };
        let row = sqlx::query(sql)
            .bind(now + lease.as_secs().max(1) as i64)
            .bind(worker)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(order_from_row).transpose()
    }

    /// Orders whose current status has not been published yet, oldest
    /// first (the outbox of live order status).
    pub async fn unannounced_orders(&self, limit: i64) -> Result<Vec<Order>, AppError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE status <> announced ORDER BY id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(order_from_row).collect()
    }

    /// Records that `status` of order `id` was published (a no-op if the
    /// status moved on meanwhile: that one is still to publish).
    pub async fn mark_announced(&self, id: i64, status: &str) -> Result<(), AppError> {
        sqlx::query("UPDATE orders SET announced = $2 WHERE id = $1 AND status = $2")
            .bind(id)
            .bind(status)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks a leased order fulfilled; false if it was not `processing` by
    /// this worker any more (its lease expired and someone else has it).
    pub async fn fulfil_order(&self, id: i64, worker: &str) -> Result<bool, AppError> {
        let done = sqlx::query(
            "UPDATE orders SET status = 'fulfilled' WHERE id = $1 AND status = 'processing' AND processed_by = $2",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }
}

fn order_from_row(row: &AnyRow) -> Result<Order, AppError> {
    let items: String = row.try_get("items")?;
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        items: serde_json::from_str(&items)
            .map_err(|e| AppError::internal("stored order items are corrupt", e))?,
        total_cents: row.try_get("total_cents")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        served_by: row.try_get("served_by")?,
        processed_by: row.try_get("processed_by")?,
        created_at: row.try_get("created_at")?,
    })
}

/// The URL without its password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite://./a.db"), "sqlite://./a.db");
    }
}
