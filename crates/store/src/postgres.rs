//! Postgres (sqlx).
//!
//! Every operation is one statement, so one round trip: plain upserts with
//! a `WHERE` for conditional writes, and two PL/pgSQL functions (migrations
//! in `migrations/postgres`) for the map patch and the map delete, which
//! need several statements under one row lock. Expiry uses the server's
//! clock, so instances with skewed clocks still agree.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::backend::{Backend, ttl_millis};
use crate::error::{Conflict, Result, StoreError, UnavailableKind, redact_url};
use crate::types::{
    Condition, Existence, FieldCondition, FieldMap, FieldOp, MapPatch, PatchOutcome, Versioned,
    map_too_large,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const PURGE_EVERY: u32 = 512;

/// SQL condition: the row has not expired. A macro so queries stay `&'static
/// str` literals (sqlx refuses dynamic SQL strings).
macro_rules! live {
    () => {
        "(expires_at IS NULL OR expires_at > clock_timestamp())"
    };
}

/// SQL expression: the expiry for a TTL in milliseconds bound as `$3`.
macro_rules! expires_from_ttl_3 {
    () => {
        "CASE WHEN $3::bigint IS NULL THEN NULL \
         ELSE clock_timestamp() + $3::bigint * interval '1 millisecond' END"
    };
}

/// The upsert of a versioned value; `$guard` limits when an existing row is
/// overwritten.
macro_rules! kv_upsert {
    ($guard:literal) => {
        concat!(
            "INSERT INTO sh_kv AS t (key, value, version, expires_at) \
             VALUES ($1, $2, sh_now_us(), ",
            expires_from_ttl_3!(),
            ") ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
             version = GREATEST(t.version + 1, EXCLUDED.version), \
             expires_at = EXCLUDED.expires_at ",
            $guard,
            " RETURNING version"
        )
    };
}

/// The Postgres backend.
#[derive(Debug)]
pub struct PostgresBackend {
    pool: PgPool,
    name: String,
    writes: AtomicU32,
}

impl PostgresBackend {
    /// Connects to `postgres://...` and applies the embedded migrations
    /// (serialized across instances by sqlx's advisory lock).
    /// Waiting for a pooled connection counts against `timeout`, the
    /// policy's per-call deadline.
    pub async fn open(url: &str, timeout: Duration) -> Result<Self> {
        let name = redact_url(url);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(timeout)
            // A ping before every use would double the round trips; a broken
            // connection fails one call (reported Unavailable) and is dropped.
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(|e| StoreError::Config(format!("store {name}: cannot connect ({e})")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Config(format!("store {name}: migrations failed ({e})")))?;
        Ok(PostgresBackend {
            pool,
            name,
            writes: AtomicU32::new(0),
        })
    }

    fn error(&self, e: sqlx::Error) -> StoreError {
        pg_error(&self.name, e)
    }

    /// Called after every successful write; every few hundred writes it
    /// deletes a batch of expired rows. Correctness never depends on it.
    async fn after_write(&self) {
        if self.writes.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY != PURGE_EVERY - 1 {
            return;
        }
        // The outer `expires_at <=` conditions are re-checked by Postgres on
        // the latest row version if a concurrent write changed it after the
        // subquery chose it: a key written again meanwhile is not deleted.
        let sql = "WITH k AS (DELETE FROM sh_kv WHERE key IN \
                       (SELECT key FROM sh_kv WHERE expires_at <= clock_timestamp() LIMIT 500) \
                       AND expires_at <= clock_timestamp()), \
                   c AS (DELETE FROM sh_counter WHERE key IN \
                       (SELECT key FROM sh_counter WHERE expires_at <= clock_timestamp() LIMIT 500) \
                       AND expires_at <= clock_timestamp()), \
                   m AS (SELECT key FROM sh_map WHERE expires_at <= clock_timestamp() LIMIT 500) \
                   SELECT sh_map_delete(key, true) FROM m";
        if let Err(e) = sqlx::query(sql).execute(&self.pool).await {
            tracing::warn!(store = %self.name, error = %e, "purging expired rows failed");
        }
    }

    /// Runs `UPDATE ... SET expires_at = now + $2 ms WHERE key = $1 AND live`.
    async fn touch_row(&self, sql: &'static str, key: &str, ttl: Duration) -> Result<bool> {
        let done = sqlx::query(sql)
            .bind(key)
            .bind(ttl_millis(ttl))
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Classifies a failed conditional write on a versioned value.
    async fn kv_conflict(&self, key: &str) -> Result<StoreError> {
        let live: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT version FROM sh_kv WHERE key = $1 AND ",
            live!()
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(StoreError::Conflict(match live {
            Some(_) => Conflict::VersionMismatch { field: None },
            None => Conflict::NotFound,
        }))
    }
}

pub(crate) fn pg_error(name: &str, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut => StoreError::unavailable(name, UnavailableKind::Timeout, e),
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::unavailable(name, UnavailableKind::Connection, e)
        }
        sqlx::Error::Protocol(_) => StoreError::unavailable(name, UnavailableKind::Connection, e),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                "SH001" | "22003" => StoreError::Invalid(db.message().to_owned()),
                // admin shutdown, crash shutdown, cannot connect now, too many
                // connections, serialization failure under failover
                "57P01" | "57P02" | "57P03" | "53300" | "08006" | "08003" | "08001" => {
                    StoreError::unavailable(name, UnavailableKind::Connection, e)
                }
                _ => StoreError::backend(name, e),
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

fn ttl_arg(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(ttl_millis)
}

fn version_of(name: &str, key: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::corrupt(name, key, format!("negative version {v}")))
}

#[async_trait]
impl Backend for PostgresBackend {
    fn describe(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let row: Option<(Vec<u8>, i64)> = sqlx::query_as(concat!(
            "SELECT value, version FROM sh_kv WHERE key = $1 AND ",
            live!()
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.map(|(value, version)| {
            Ok(Versioned {
                value: Bytes::from(value),
                version: version_of(&self.name, key, version)?,
            })
        })
        .transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        condition: Condition,
    ) -> Result<u64> {
        let version: Option<i64> =
            match condition {
                Condition::Any | Condition::IfAbsent => {
                    let sql = if condition == Condition::IfAbsent {
                        kv_upsert!(
                            "WHERE t.expires_at IS NOT NULL AND t.expires_at <= clock_timestamp()"
                        )
                    } else {
                        kv_upsert!("")
                    };
                    sqlx::query_scalar(sql)
                        .bind(key)
                        .bind(value.as_ref())
                        .bind(ttl_arg(ttl))
                        .fetch_optional(&self.pool)
                        .await
                }
                Condition::IfVersion(expected) => sqlx::query_scalar(concat!(
                    "UPDATE sh_kv SET value = $2, version = GREATEST(version + 1, sh_now_us()), \
                     expires_at = ",
                    expires_from_ttl_3!(),
                    " WHERE key = $1 AND version = $4 AND ",
                    live!(),
                    " RETURNING version"
                ))
                .bind(key)
                .bind(value.as_ref())
                .bind(ttl_arg(ttl))
                .bind(expected as i64)
                .fetch_optional(&self.pool)
                .await,
            }
            .map_err(|e| self.error(e))?;
        match version {
            Some(v) => {
                self.after_write().await;
                version_of(&self.name, key, v)
            }
            None if condition == Condition::IfAbsent => {
                Err(StoreError::Conflict(Conflict::AlreadyExists))
            }
            None => Err(self.kv_conflict(key).await?),
        }
    }

    async fn delete(&self, key: &str, condition: Condition) -> Result<bool> {
        match condition {
            Condition::IfVersion(expected) => {
                let deleted: Option<i32> = sqlx::query_scalar(concat!(
                    "DELETE FROM sh_kv WHERE key = $1 AND version = $2 AND ",
                    live!(),
                    " RETURNING 1"
                ))
                .bind(key)
                .bind(expected as i64)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
                match deleted {
                    Some(_) => Ok(true),
                    None => Err(self.kv_conflict(key).await?),
                }
            }
            _ => {
                let live: Option<bool> = sqlx::query_scalar(concat!(
                    "DELETE FROM sh_kv WHERE key = $1 RETURNING ",
                    live!()
                ))
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
                Ok(live.unwrap_or(false))
            }
        }
    }

    async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.touch_row(
            concat!(
                "UPDATE sh_kv SET expires_at = clock_timestamp() + $2 * interval '1 millisecond' \
                 WHERE key = $1 AND ",
                live!()
            ),
            key,
            ttl,
        )
        .await
    }

    async fn map_read(&self, key: &str) -> Result<Option<FieldMap>> {
        // One statement: the map row and its fields from one snapshot.
        let rows = sqlx::query(
            "SELECT m.version AS map_version, \
                    (extract(epoch FROM (m.expires_at - clock_timestamp())) * 1000)::bigint AS ttl_ms, \
                    f.field, f.value, f.version \
             FROM sh_map m LEFT JOIN sh_map_field f ON f.key = m.key \
             WHERE m.key = $1 AND (m.expires_at IS NULL OR m.expires_at > clock_timestamp())",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let corrupt = |e: sqlx::Error| StoreError::corrupt(&self.name, key, e.to_string());
        let map_version: i64 = first.try_get("map_version").map_err(corrupt)?;
        let ttl_ms: Option<i64> = first.try_get("ttl_ms").map_err(corrupt)?;
        let mut map = FieldMap {
            version: version_of(&self.name, key, map_version)?,
            expires_in: ttl_ms.map(|ms| Duration::from_millis(ms.max(0) as u64)),
            ..FieldMap::default()
        };
        for row in &rows {
            let field: Option<String> = row.try_get("field").map_err(corrupt)?;
            let Some(field) = field else { continue };
            let value: Vec<u8> = row.try_get("value").map_err(corrupt)?;
            let version: i64 = row.try_get("version").map_err(corrupt)?;
            map.fields.insert(
                field,
                Versioned {
                    value: Bytes::from(value),
                    version: version_of(&self.name, key, version)?,
                },
            );
        }
        Ok(Some(map))
    }

    async fn map_patch(&self, key: &str, patch: &MapPatch) -> Result<PatchOutcome> {
        let (cond_fields, cond_versions): (Vec<&str>, Vec<i64>) = patch
            .conditions
            .iter()
            .map(|(f, c)| {
                let v = match c {
                    FieldCondition::Absent => -1,
                    FieldCondition::Version(v) => *v as i64,
                };
                (f.as_str(), v)
            })
            .unzip();
        let mut kinds = Vec::with_capacity(patch.ops.len());
        let mut fields = Vec::with_capacity(patch.ops.len());
        let mut values: Vec<&[u8]> = Vec::with_capacity(patch.ops.len());
        let mut deltas = Vec::with_capacity(patch.ops.len());
        for op in &patch.ops {
            let (kind, value, delta): (&str, &[u8], i64) = match op {
                FieldOp::Set(_, v) => ("s", v.as_ref(), 0),
                FieldOp::Remove(_) => ("d", b"", 0),
                FieldOp::Incr(_, d) => ("i", b"", *d),
            };
            kinds.push(kind);
            fields.push(op.field());
            values.push(value);
            deltas.push(delta);
        }
        let existence = match patch.existence {
            Existence::Any => 0,
            Existence::MustExist => 1,
            Existence::MustNotExist => 2,
        };
        let reply: Vec<i64> =
            sqlx::query_scalar("SELECT sh_map_patch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                .bind(key)
                .bind(patch.ttl.map_or(0, ttl_millis))
                .bind(existence)
                .bind(&cond_fields)
                .bind(&cond_versions)
                .bind(&kinds)
                .bind(&fields)
                .bind(&values)
                .bind(&deltas)
                .bind(
                    patch
                        .max_bytes
                        .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)),
                )
                .fetch_one(&self.pool)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(db) if db.code().as_deref() == Some("SH002") => {
                        let size = db.message().parse().unwrap_or(usize::MAX);
                        map_too_large(size, patch.max_bytes.unwrap_or_default())
                    }
                    _ => self.error(e),
                })?;
        match reply.as_slice() {
            [0, version, counters @ ..] => {
                self.after_write().await;
                Ok(PatchOutcome {
                    version: version_of(&self.name, key, *version)?,
                    counters: counters.to_vec(),
                })
            }
            [-1, ..] => Err(StoreError::Conflict(Conflict::AlreadyExists)),
            [-2, ..] => Err(StoreError::Conflict(Conflict::NotFound)),
            [-3, index, ..] => Err(StoreError::Conflict(Conflict::VersionMismatch {
                field: usize::try_from(*index - 1)
                    .ok()
                    .and_then(|i| patch.conditions.get(i))
                    .map(|(f, _)| f.clone()),
            })),
            other => Err(StoreError::backend(
                &self.name,
                format!("unexpected patch reply {other:?}"),
            )),
        }
    }

    async fn map_delete(&self, key: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT sh_map_delete($1)")
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn map_touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.touch_row(
            concat!(
                "UPDATE sh_map SET expires_at = clock_timestamp() + $2 * interval '1 millisecond' \
                 WHERE key = $1 AND ",
                live!()
            ),
            key,
            ttl,
        )
        .await
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64> {
        let value = sqlx::query_scalar(
            "INSERT INTO sh_counter AS t (key, value, expires_at) VALUES ($1, $2, \
                CASE WHEN $3::bigint IS NULL THEN NULL \
                ELSE clock_timestamp() + $3::bigint * interval '1 millisecond' END) \
             ON CONFLICT (key) DO UPDATE SET \
                value = CASE WHEN t.expires_at IS NULL OR t.expires_at > clock_timestamp() \
                        THEN t.value + EXCLUDED.value ELSE EXCLUDED.value END, \
                expires_at = CASE WHEN t.expires_at IS NULL OR t.expires_at > clock_timestamp() \
                        THEN t.expires_at ELSE EXCLUDED.expires_at END \
             RETURNING value",
        )
        .bind(key)
        .bind(delta)
        .bind(ttl_arg(ttl))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        self.after_write().await;
        Ok(value)
    }

    async fn counter(&self, key: &str) -> Result<Option<i64>> {
        sqlx::query_scalar(concat!(
            "SELECT value FROM sh_counter WHERE key = $1 AND ",
            live!()
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }
}
