//! SQLite (sqlx): the embedded default, shared by processes on one host.
//!
//! The file is opened in WAL mode with a busy timeout, and every write runs
//! in a `BEGIN IMMEDIATE` transaction: it takes the database's write lock at
//! the start, so two processes never both read a row and then race to write
//! it (a deferred transaction would upgrade its lock late and fail with
//! SQLITE_BUSY instead of waiting). Reads see one WAL snapshot.
//!
//! Expiry times are Unix milliseconds from the host's clock, which every
//! process on the host shares. Expired rows are ignored by every query and
//! purged in small batches every few hundred writes.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::backend::{
    Backend, check_condition, next_version, plan_increments, ttl_millis, unix_micros,
};
use crate::error::{Conflict, Result, StoreError, UnavailableKind, redact_url};
use crate::types::{
    Condition, Existence, FieldCondition, FieldMap, FieldOp, MapPatch, PatchOutcome, Versioned,
    map_too_large,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Writes between two purges of expired rows.
const PURGE_EVERY: u32 = 512;
const PURGE_BATCH: i64 = 500;

/// The SQLite backend.
#[derive(Debug)]
pub struct SqliteBackend {
    /// Readers: WAL lets them run beside the writer.
    pool: SqlitePool,
    /// One connection for every write of this process, so this process's
    /// writers queue in order on the pool instead of spinning in SQLite's
    /// busy handler (whose backoff sleeps gave writes 100+ ms tails).
    /// Other processes on the host still wait through `busy_timeout`.
    writer: SqlitePool,
    name: String,
    writes: AtomicU32,
}

fn now_millis() -> i64 {
    (unix_micros() / 1000) as i64
}

fn live(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_none_or(|at| at > now)
}

fn expiry(now: i64, ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| now.saturating_add(ttl_millis(t)))
}

impl SqliteBackend {
    /// Opens (creating if needed) `sqlite://PATH` and applies the embedded
    /// migrations.
    /// Waiting for a pooled connection counts against `timeout`, the
    /// policy's per-call deadline.
    pub async fn open(url: &str, timeout: Duration) -> Result<Self> {
        let name = redact_url(url);
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("store URL {name:?} is not valid: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across application crashes in WAL mode; only
            // a power loss can drop the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let writer = connect(&name, 1, timeout, &options).await?;
        let pool = connect(&name, 8, timeout, &options).await?;
        // Two processes opening a new file at once may race to migrate; the
        // migrations are idempotent, so the loser just runs them again.
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(&writer).await {
                Ok(()) => break,
                Err(e) if attempt < 3 => {
                    tracing::debug!(store = %name, error = %e, "migration raced, retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(StoreError::Config(format!(
                        "store {name}: migrations failed ({e})"
                    )));
                }
            }
        }
        Ok(SqliteBackend {
            pool,
            writer,
            name,
            writes: AtomicU32::new(0),
        })
    }

    fn error(&self, e: sqlx::Error) -> StoreError {
        sql_error(&self.name, e)
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.error(e))
    }

    async fn commit(&self, tx: Transaction<'static, Sqlite>) -> Result<()> {
        tx.commit().await.map_err(|e| self.error(e))?;
        if self.writes.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1
            && let Err(e) = self.purge_expired().await
        {
            tracing::warn!(store = %self.name, error = %e, "purging expired rows failed");
        }
        Ok(())
    }

    /// `(version, expires_at)` of a value row, expired or not, inside a
    /// write transaction.
    async fn kv_head(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        key: &str,
    ) -> Result<Option<(i64, Option<i64>)>> {
        sqlx::query_as("SELECT version, expires_at FROM sh_kv WHERE key = ?1")
            .bind(key)
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs `UPDATE ... SET expires_at = ?1 WHERE key = ?2 AND live(?3)`.
    async fn touch_row(&self, sql: &'static str, key: &str, ttl: Duration) -> Result<bool> {
        let now = now_millis();
        let done = sqlx::query(sql)
            .bind(expiry(now, Some(ttl)))
            .bind(key)
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a batch of expired rows. Correctness never depends on it:
    /// every query already ignores expired rows.
    async fn purge_expired(&self) -> Result<()> {
        let now = now_millis();
        let mut tx = self.write_tx().await?;
        for sql in [
            "DELETE FROM sh_kv WHERE key IN \
             (SELECT key FROM sh_kv WHERE expires_at <= ?1 LIMIT ?2)",
            "DELETE FROM sh_counter WHERE key IN \
             (SELECT key FROM sh_counter WHERE expires_at <= ?1 LIMIT ?2)",
            "DELETE FROM sh_map_field WHERE key IN \
             (SELECT key FROM sh_map WHERE expires_at <= ?1 LIMIT ?2)",
            "DELETE FROM sh_map WHERE key IN \
             (SELECT key FROM sh_map WHERE expires_at <= ?1 LIMIT ?2)",
        ] {
            sqlx::query(sql)
                .bind(now)
                .bind(PURGE_BATCH)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))
    }
}

/// Opens a pool. Switching a new file to WAL needs a moment of exclusive
/// access, so a process opening the file while another one migrates it can
/// see SQLITE_BUSY before any busy timeout applies: that is retried for a few
/// seconds, anything else is reported at once.
async fn connect(
    name: &str,
    connections: u32,
    timeout: Duration,
    options: &SqliteConnectOptions,
) -> Result<SqlitePool> {
    let mut attempt = 0;
    loop {
        let result = SqlitePoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(timeout)
            .connect_with(options.clone())
            .await;
        match result {
            Ok(pool) => return Ok(pool),
            Err(sqlx::Error::Database(db))
                if attempt < 50 && matches!(db.code().as_deref(), Some("5" | "6")) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(StoreError::Config(format!(
                    "store {name}: cannot open ({e})"
                )));
            }
        }
    }
}

pub(crate) fn sql_error(name: &str, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut => StoreError::unavailable(name, UnavailableKind::Timeout, e),
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::unavailable(name, UnavailableKind::Connection, e)
        }
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY / SQLITE_LOCKED after the busy timeout: another
            // process holds the write lock for too long.
            let code = db.code().unwrap_or_default();
            if matches!(code.as_ref(), "5" | "6" | "517" | "261") {
                StoreError::unavailable(name, UnavailableKind::Timeout, e)
            } else {
                StoreError::backend(name, e)
            }
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt {
            store: name.to_owned(),
            key: String::new(),
            reason: e.to_string(),
        },
        _ => StoreError::backend(name, e),
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let row = sqlx::query(
            "SELECT value, version FROM sh_kv \
             WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        )
        .bind(key)
        .bind(now_millis())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.map(|r| versioned(&self.name, key, &r)).transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<u64> {
        let now = now_millis();
        let mut tx = self.write_tx().await?;
        let current = self.kv_head(&mut tx, key).await?;
        let live_version = current
            .filter(|(_, exp)| live(*exp, now))
            .map(|(v, _)| v as u64);
        check_condition(live_version, condition)?;
        let version = next_version(current.map_or(0, |(v, _)| v as u64), unix_micros());
        sqlx::query(
            "INSERT INTO sh_kv (key, value, version, expires_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             version = excluded.version, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(value.as_ref())
        .bind(version as i64)
        .bind(expiry(now, ttl))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        self.commit(tx).await?;
        Ok(version)
    }

    async fn delete(&self, key: &str, condition: Condition) -> Result<bool> {
        let now = now_millis();
        let mut tx = self.write_tx().await?;
        let current = self.kv_head(&mut tx, key).await?;
        let live_version = current
            .filter(|(_, exp)| live(*exp, now))
            .map(|(v, _)| v as u64);
        check_condition(live_version, condition)?;
        sqlx::query("DELETE FROM sh_kv WHERE key = ?1")
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        self.commit(tx).await?;
        Ok(live_version.is_some())
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.touch_row(
            "UPDATE sh_kv SET expires_at = ?1 \
             WHERE key = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
            key,
            ttl,
        )
        .await
    }

    async fn map_read(&self, key: &str) -> Result<Option<FieldMap>> {
        let now = now_millis();
        // One statement: the map row and its fields from one snapshot, in
        // one round trip to SQLite's worker thread.
        let rows = sqlx::query(
            "SELECT m.version AS map_version, m.expires_at, f.field, f.value, f.version \
             FROM sh_map m LEFT JOIN sh_map_field f ON f.key = m.key \
             WHERE m.key = ?1 AND (m.expires_at IS NULL OR m.expires_at > ?2)",
        )
        .bind(key)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let corrupt = |e: sqlx::Error| StoreError::corrupt(&self.name, key, e.to_string());
        let version: i64 = first.try_get("map_version").map_err(corrupt)?;
        let expires_at: Option<i64> = first.try_get("expires_at").map_err(corrupt)?;
        let mut map = FieldMap {
            version: u64::try_from(version).map_err(|_| {
                StoreError::corrupt(&self.name, key, format!("negative version {version}"))
            })?,
            expires_in: expires_at
                .map(|at| Duration::from_millis(at.saturating_sub(now).max(0) as u64)),
            ..FieldMap::default()
        };
        for row in &rows {
            let field: Option<String> = row.try_get("field").map_err(corrupt)?;
            if let Some(field) = field {
                map.fields.insert(field, versioned(&self.name, key, row)?);
            }
        }
        Ok(Some(map))
    }

    async fn map_patch(&self, key: &str, patch: &MapPatch) -> Result<PatchOutcome> {
        let now = now_millis();
        let mut tx = self.write_tx().await?;
        let head: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT version, expires_at FROM sh_map WHERE key = ?1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        let previous = head.map_or(0, |(v, _)| v as u64);
        let is_live = head.is_some_and(|(_, exp)| live(exp, now));
        match (patch.existence, is_live) {
            (Existence::MustExist, false) => return Err(StoreError::Conflict(Conflict::NotFound)),
            (Existence::MustNotExist, true) => {
                return Err(StoreError::Conflict(Conflict::AlreadyExists));
            }
            _ => {}
        }
        if head.is_some() && !is_live {
            // The map expired but was not purged yet: its fields must not
            // leak into the new map.
            sqlx::query("DELETE FROM sh_map_field WHERE key = ?1")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }

        for (field, condition) in &patch.conditions {
            let current: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM sh_map_field WHERE key = ?1 AND field = ?2",
            )
            .bind(key)
            .bind(field)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
            let holds = match condition {
                FieldCondition::Absent => current.is_none(),
                FieldCondition::Version(v) => current == Some(*v as i64),
            };
            if !holds {
                return Err(StoreError::Conflict(Conflict::VersionMismatch {
                    field: Some(field.clone()),
                }));
            }
        }

        let mut stored = std::collections::HashMap::new();
        for op in &patch.ops {
            if let FieldOp::Incr(field, _) = op {
                let value: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT value FROM sh_map_field WHERE key = ?1 AND field = ?2",
                )
                .bind(key)
                .bind(field)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
                if let Some(value) = value {
                    stored.insert(field.as_str(), value);
                }
            }
        }
        let counters = plan_increments(&patch.ops, |f| stored.get(f).map(Vec::as_slice))?;

        let version = next_version(previous, unix_micros());
        let expires_at = match (patch.ttl, head) {
            (Some(ttl), _) => expiry(now, Some(ttl)),
            (None, Some((_, exp))) if is_live => exp,
            (None, _) => None,
        };
        sqlx::query(
            "INSERT INTO sh_map (key, version, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET version = excluded.version, \
             expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(version as i64)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let mut planned = counters.iter();
        for op in &patch.ops {
            let (field, value) = match op {
                FieldOp::Remove(field) => {
                    sqlx::query("DELETE FROM sh_map_field WHERE key = ?1 AND field = ?2")
                        .bind(key)
                        .bind(field)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.error(e))?;
                    continue;
                }
                FieldOp::Set(field, value) => (field, value.to_vec()),
                FieldOp::Incr(field, _) => {
                    let n = planned.next().expect("one planned value per Incr op");
                    (field, n.to_string().into_bytes())
                }
            };
            sqlx::query(
                "INSERT INTO sh_map_field (key, field, value, version) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (key, field) DO UPDATE SET value = excluded.value, \
                 version = excluded.version",
            )
            .bind(key)
            .bind(field)
            .bind(value)
            .bind(version as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        }
        if let Some(limit) = patch.max_bytes {
            // Counted inside the write transaction, after the changes: over
            // the limit, dropping `tx` rolls everything back.
            let size: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(length(CAST(field AS BLOB)) + length(value)), 0) \
                 FROM sh_map_field WHERE key = ?1",
            )
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > limit {
                return Err(map_too_large(size, limit));
            }
        }
        self.commit(tx).await?;
        Ok(PatchOutcome { version, counters })
    }

    async fn map_delete(&self, key: &str) -> Result<bool> {
        let now = now_millis();
        let mut tx = self.write_tx().await?;
        let head: Option<Option<i64>> =
            sqlx::query_scalar("SELECT expires_at FROM sh_map WHERE key = ?1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        for sql in [
            "DELETE FROM sh_map_field WHERE key = ?1",
            "DELETE FROM sh_map WHERE key = ?1",
        ] {
            sqlx::query(sql)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        self.commit(tx).await?;
        Ok(head.is_some_and(|exp| live(exp, now)))
    }

    async fn map_touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.touch_row(
            "UPDATE sh_map SET expires_at = ?1 \
             WHERE key = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
            key,
            ttl,
        )
        .await
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64> {
        let now = now_millis();
        let mut tx = self.write_tx().await?;
        let current: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT value, expires_at FROM sh_counter WHERE key = ?1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        let (base, expires_at) = match current {
            Some((value, exp)) if live(exp, now) => (value, exp),
            _ => (0, expiry(now, ttl)),
        };
        let value = base
            .checked_add(delta)
            .ok_or_else(|| StoreError::Invalid(format!("counter {key:?} would overflow")))?;
        sqlx::query(
            "INSERT INTO sh_counter (key, value, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(value)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        self.commit(tx).await?;
        Ok(value)
    }

    async fn counter(&self, key: &str) -> Result<Option<i64>> {
        sqlx::query_scalar(
            "SELECT value FROM sh_counter \
             WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        )
        .bind(key)
        .bind(now_millis())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }
}

fn versioned(name: &str, key: &str, row: &sqlx::sqlite::SqliteRow) -> Result<Versioned> {
    let corrupt = |e: sqlx::Error| StoreError::corrupt(name, key, e.to_string());
    let value: Vec<u8> = row.try_get("value").map_err(corrupt)?;
    let version: i64 = row.try_get("version").map_err(corrupt)?;
    let version = u64::try_from(version)
        .map_err(|_| StoreError::corrupt(name, key, format!("negative version {version}")))?;
    Ok(Versioned {
        value: Bytes::from(value),
        version,
    })
}
