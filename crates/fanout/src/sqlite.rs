//! SQLite: the embedded default, one log file shared by the processes of
//! one host.
//!
//! A publish is one `BEGIN IMMEDIATE` transaction (the write lock from the
//! start, so processes queue instead of failing): bump the channel's last
//! offset, insert the message, trim what retention drops. A read is one
//! snapshot. `wait` wakes at once for publishes from this process and polls
//! every 10 ms for other processes' (SQLite has no cross-process
//! notification).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::Notify;

use crate::broker::{
    Batch, Broker, BrokerConfig, BrokerError, Message, Offset, Published, Result, check_channel,
    check_resume, new_epoch, no_log,
};

const POLL: Duration = Duration::from_millis(10);

/// The SQLite broker.
#[derive(Debug)]
pub(crate) struct SqliteBroker {
    config: BrokerConfig,
    name: String,
    /// Readers (WAL lets them run beside the writer).
    pool: SqlitePool,
    /// One connection for this process's publishes, so they queue in order.
    writer: SqlitePool,
    local: Mutex<HashMap<String, Arc<Notify>>>,
}

fn now_ms() -> i64 {
    crate::broker::unix_millis() as i64
}

impl SqliteBroker {
    pub(crate) async fn open(config: BrokerConfig) -> Result<Self> {
        let name = config.url.clone();
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(|e| BrokerError::Config(format!("broker URL {name:?} is not valid: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let connect = |n: u32| {
            SqlitePoolOptions::new()
                .max_connections(n)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
        };
        let open_err =
            |e: sqlx::Error| BrokerError::Config(format!("broker {name}: cannot open ({e})"));
        let writer = connect(1).await.map_err(open_err)?;
        let pool = connect(8).await.map_err(open_err)?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        // Its own history table: the file may also hold a statehouse store.
        migrator.dangerous_set_table_name("_statehouse_fanout_migrations");
        let mut attempt = 0;
        loop {
            match migrator.run(&writer).await {
                Ok(()) => break,
                // Two processes opening a new file at once race to migrate.
                Err(e) if attempt < 5 => {
                    tracing::debug!(broker = %name, error = %e, "migration raced, retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(BrokerError::Config(format!(
                        "broker {name}: migrations failed ({e})"
                    )));
                }
            }
        }
        Ok(SqliteBroker {
            config,
            name,
            pool,
            writer,
            local: Mutex::default(),
        })
    }

    fn error(&self, e: sqlx::Error) -> BrokerError {
        BrokerError::Unavailable {
            broker: self.name.clone(),
            detail: e.to_string(),
        }
    }

    fn notify(&self, channel: &str) -> Arc<Notify> {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(channel.to_owned())
            .or_default()
            .clone()
    }

    async fn last(&self, channel: &str) -> Result<Offset> {
        let row = sqlx::query("SELECT last_offset FROM fanout_channels WHERE channel = ?")
            .bind(channel)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.map_or(0, |r| r.get::<i64, _>(0) as Offset))
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.config.check_publish(channel, &payload)?;
        let now = now_ms();
        let mut conn = self.writer.acquire().await.map_err(|e| self.error(e))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.error(e))?;
        let row = sqlx::query(
            "INSERT INTO fanout_channels (channel, epoch, last_offset) VALUES (?, ?, 1) \
             ON CONFLICT (channel) DO UPDATE SET last_offset = last_offset + 1 \
             RETURNING last_offset, epoch",
        )
        .bind(channel)
        .bind(new_epoch())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let offset: i64 = row.get(0);
        let epoch: String = row.get(1);
        sqlx::query(
            "INSERT INTO fanout_messages (channel, offset, at_ms, payload) VALUES (?, ?, ?, ?)",
        )
        .bind(channel)
        .bind(offset)
        .bind(now)
        .bind(payload.as_ref())
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let retention = &self.config.retention;
        sqlx::query("DELETE FROM fanout_messages WHERE channel = ? AND (offset <= ? OR at_ms < ?)")
            .bind(channel)
            .bind(offset - retention.max_messages as i64)
            .bind(now - retention.max_age.as_millis() as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        self.notify(channel).notify_waiters();
        Ok(Published {
            offset: offset as Offset,
            epoch,
        })
    }

    async fn read(
        &self,
        channel: &str,
        after: Offset,
        epoch: Option<&str>,
        limit: usize,
    ) -> Result<Batch> {
        check_channel(channel)?;
        let min_at = now_ms() - self.config.retention.max_age.as_millis() as i64;
        let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        // One snapshot for the channel row and its messages.
        let mut tx = conn.begin().await.map_err(|e| self.error(e))?;
        let row = sqlx::query("SELECT epoch, last_offset FROM fanout_channels WHERE channel = ?")
            .bind(channel)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        let Some(row) = row else {
            return no_log(channel, after, epoch);
        };
        let log_epoch: String = row.get(0);
        let last = row.get::<i64, _>(1) as Offset;
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(offset) FROM fanout_messages WHERE channel = ? AND at_ms >= ?",
        )
        .bind(channel)
        .bind(min_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let oldest = oldest.map_or(last + 1, |o| o as Offset);
        check_resume(channel, after, epoch, &log_epoch, oldest, last)?;
        let rows = sqlx::query(
            "SELECT offset, payload FROM fanout_messages \
             WHERE channel = ? AND offset > ? AND at_ms >= ? ORDER BY offset LIMIT ?",
        )
        .bind(channel)
        .bind(after as i64)
        .bind(min_at)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let messages = rows
            .into_iter()
            .map(|r| Message {
                channel: channel.to_owned(),
                offset: r.get::<i64, _>(0) as Offset,
                epoch: log_epoch.clone(),
                payload: Bytes::from(r.get::<Vec<u8>, _>(1)),
            })
            .collect();
        Ok(Batch {
            epoch: log_epoch,
            messages,
            last,
        })
    }

    async fn wait(&self, channel: &str, after: Offset, timeout: Duration) -> Result<()> {
        check_channel(channel)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let notify = self.notify(channel);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.last(channel).await? > after {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let nap = POLL.min(deadline - now);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }
}
