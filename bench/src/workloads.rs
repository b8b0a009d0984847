//! What the driver repeats: the store's operations, and the raw sqlx point select they are compared
//! with on Postgres.

use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgPool, PgPoolOptions};
use statehouse_store::{Condition, Existence, MapPatch, Store, StoreError};

use crate::BoxError;
use crate::Op;
use crate::driver::{Outcome, Workload};

/// Size of every value and map field, and of redis-benchmark's `-d`.
pub(crate) const VALUE_BYTES: usize = 64;
const MAP_FIELDS: usize = 8;

/// Rows in the raw sqlx table: a few thousand, so the index is more than one page, as a real
/// table's would be.
const RAW_ROWS: usize = 4096;
/// The pool size `PostgresBackend::open` uses, so the raw peer queues for connections exactly as
/// the store does once the concurrency exceeds it.
const STORE_PG_POOL: u32 = 16;

fn value() -> Bytes {
    Bytes::from(vec![b'x'; VALUE_BYTES])
}

// Every task works on keys of its own: reads and writes never wait on another task's row lock or
// version, so what is measured is the store, not contention the benchmark made up.
fn value_key(task: usize) -> String {
    format!("bench:v:{task}")
}

fn map_key(task: usize) -> String {
    format!("bench:m:{task}")
}

fn put_key(task: usize) -> String {
    format!("bench:p:{task}")
}

/// Writes the values and maps that tasks `0..tasks` read and patch.
pub(crate) async fn seed(store: &Store, tasks: usize) -> Result<(), BoxError> {
    let value = value();
    let map = (0..MAP_FIELDS).fold(MapPatch::new(), |patch, field| {
        patch.set(format!("f{field}"), value.clone())
    });
    for task in 0..tasks {
        store
            .put(&value_key(task), value.clone(), None, Condition::Any)
            .await?;
        store
            .put(&put_key(task), value.clone(), None, Condition::Any)
            .await?;
        store.map_patch(&map_key(task), &map).await?;
    }
    Ok(())
}

/// One of the store's operations, on an open store.
#[derive(Debug)]
pub(crate) struct StoreOp {
    pub(crate) store: Store,
    pub(crate) op: Op,
}

#[derive(Debug)]
pub(crate) struct StoreTask {
    key: String,
    /// For `put`: the version this task wrote last.
    version: u64,
    /// For `map_patch`: built once, so the loop times the store and not the building.
    patch: MapPatch,
    value: Bytes,
}

impl Workload for StoreOp {
    type Worker = StoreTask;

    async fn worker(&self, index: usize) -> Result<StoreTask, BoxError> {
        let key = match self.op {
            Op::Get => value_key(index),
            Op::MapRead | Op::MapPatch => map_key(index),
            Op::Put => put_key(index),
        };
        let version = match self.op {
            Op::Put => current_version(&self.store, &key).await?,
            _ => 0,
        };
        Ok(StoreTask {
            key,
            version,
            patch: MapPatch::new()
                .set("f0", value())
                .existence(Existence::MustExist),
            value: value(),
        })
    }

    async fn call(&self, task: &mut StoreTask) -> Outcome {
        let store = &self.store;
        let key = task.key.as_str();
        match self.op {
            Op::Get => match store.get(key).await {
                Ok(read) if read.value.is_some() => Outcome::Done,
                Ok(_) => Outcome::Failed(format!("seeded key {key} is missing")),
                Err(e) => failed(e),
            },
            Op::MapRead => match store.map_read(key).await {
                Ok(read)
                    if read
                        .value
                        .as_ref()
                        .is_some_and(|m| m.fields.len() == MAP_FIELDS) =>
                {
                    Outcome::Done
                }
                Ok(_) => Outcome::Failed(format!("seeded map {key} is missing or incomplete")),
                Err(e) => failed(e),
            },
            Op::MapPatch => match store.map_patch(key, &task.patch).await {
                Ok(_) => Outcome::Done,
                Err(e) => failed(e),
            },
            Op::Put => {
                let condition = Condition::IfVersion(task.version);
                match store.put(key, task.value.clone(), None, condition).await {
                    Ok(version) => {
                        task.version = version;
                        Outcome::Done
                    }
                    Err(StoreError::Conflict(_)) => {
                        // Cannot happen while each task owns its key; if it does, carry on from
                        // the current version rather than conflicting on every later call.
                        match current_version(store, key).await {
                            Ok(version) => {
                                task.version = version;
                                Outcome::Conflict
                            }
                            Err(e) => Outcome::Failed(e.to_string()),
                        }
                    }
                    Err(e) => failed(e),
                }
            }
        }
    }
}

fn failed(e: StoreError) -> Outcome {
    match e {
        StoreError::Conflict(_) => Outcome::Conflict,
        e => Outcome::Failed(e.to_string()),
    }
}

async fn current_version(store: &Store, key: &str) -> Result<u64, BoxError> {
    let read = store.get(key).await?;
    let current = read
        .value
        .as_ref()
        .ok_or_else(|| format!("seeded key {key} is missing"))?;
    Ok(current.version)
}

/// The Postgres peer: `SELECT value FROM bench_kv WHERE key = $1` through a plain sqlx pool, the
/// least any sqlx-based store can do for a `get`.
#[derive(Debug)]
pub(crate) struct RawSelect {
    pool: PgPool,
}

impl RawSelect {
    /// Connects to `url` and fills `bench_kv` with [`RAW_ROWS`] rows of [`VALUE_BYTES`] bytes.
    pub(crate) async fn prepare(url: &str) -> Result<Self, BoxError> {
        // The store's pool settings: no ping before each use (it would double the round trips).
        let pool = PgPoolOptions::new()
            .max_connections(STORE_PG_POOL)
            .acquire_timeout(Duration::from_secs(2))
            .test_before_acquire(false)
            .connect(url)
            .await?;
        sqlx::query("CREATE TABLE bench_kv (key text PRIMARY KEY, value bytea NOT NULL)")
            .execute(&pool)
            .await?;
        sqlx::query(
            "INSERT INTO bench_kv (key, value) \
             SELECT 'k' || i, convert_to(repeat('x', $2), 'UTF8') FROM generate_series(0, $1 - 1) AS i",
        )
        .bind(i32::try_from(RAW_ROWS)?)
        .bind(i32::try_from(VALUE_BYTES)?)
        .execute(&pool)
        .await?;
        sqlx::query("ANALYZE bench_kv").execute(&pool).await?;
        Ok(RawSelect { pool })
    }

    /// The server's version (`SHOW server_version`), for the report's header.
    pub(crate) async fn server_version(&self) -> Result<String, BoxError> {
        Ok(sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await?)
    }
}

impl Workload for RawSelect {
    type Worker = String;

    async fn worker(&self, index: usize) -> Result<String, BoxError> {
        Ok(format!("k{}", index % RAW_ROWS))
    }

    async fn call(&self, key: &mut String) -> Outcome {
        let row: Result<Option<Vec<u8>>, _> =
            sqlx::query_scalar("SELECT value FROM bench_kv WHERE key = $1")
                .bind(key.as_str())
                .fetch_optional(&self.pool)
                .await;
        match row {
            Ok(Some(_)) => Outcome::Done,
            Ok(None) => Outcome::Failed(format!("row {key} is missing")),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}
