//! `statehouse-bench`: benchmark programs. They print a table and write a result file; nothing here
//! asserts on timings.
//!
//! `store-bench` measures the store's operations on every backend, each against private servers
//! started by `statehouse-testkit`, and in the same run the peers they are judged against:
//! `redis-benchmark` on the same Redis server and a raw sqlx point select on the same Postgres.
//! See `bench/README.md`.

mod backends;
pub mod cli;
mod driver;
pub mod fanout;
pub mod fanout_floor;
pub mod lb;
mod machine;
mod redis_benchmark;
mod report;
pub mod session;
mod workloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use statehouse_store::StoreConfig;

use crate::backends::Server;
use crate::driver::{Window, Workload, closed_loop};
use crate::report::{Report, Row};
use crate::workloads::{RawSelect, StoreOp};

/// Errors end the run; this is the program's outer edge.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The backends a run can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Memory,
    /// A file in a temporary directory.
    Sqlite,
    /// A standalone `redis-server`.
    Redis,
    /// Six `redis-server`s: three masters, one replica each.
    RedisCluster,
    Postgres,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Sqlite => "sqlite",
            Backend::Redis => "redis",
            Backend::RedisCluster => "redis-cluster",
            Backend::Postgres => "postgres",
        }
    }
}

/// The store operations a run can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// `get` of an existing 64-byte value.
    Get,
    /// `map_read` of a map of 8 fields of 64 bytes.
    MapRead,
    /// `map_patch` setting one 64-byte field, with `Existence::MustExist`.
    MapPatch,
    /// `put` of 64 bytes with `Condition::IfVersion` of the task's own last write.
    Put,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::MapRead => "map_read",
            Op::MapPatch => "map_patch",
            Op::Put => "put",
        }
    }
}

/// What one run of `store-bench` measures and where it writes.
#[derive(Debug, Clone)]
pub struct Config {
    pub backends: Vec<Backend>,
    pub ops: Vec<Op>,
    /// Numbers of concurrent tasks (and of redis-benchmark clients).
    pub concurrency: Vec<usize>,
    /// Untimed calls before each measurement.
    pub warmup: Duration,
    /// Measured time per backend × operation × concurrency.
    pub duration: Duration,
    /// The Markdown result file.
    pub out: PathBuf,
    /// The command line, quoted, for the report's header.
    pub command: String,
}

/// Runs every configured measurement, printing rows as they finish and rewriting `config.out`
/// after each backend, so an interrupted run still leaves what it measured.
pub async fn run(config: Config) -> Result<(), BoxError> {
    let window = Window {
        warmup: config.warmup,
        measure: config.duration,
    };
    let mut report = Report::new(&config, machine::describe().await);
    println!("{}", report.machine_summary());
    println!("{}", Row::text_header());

    for &backend in &config.backends {
        println!("-- {}: starting", backend.label());
        let load_before = machine::load_average();
        let server = Server::start(backend).await?;
        let store = statehouse_store::open(StoreConfig::new(server.url())).await?;
        let tasks = config.concurrency.iter().copied().max().unwrap_or(1);
        workloads::seed(&store, tasks).await?;
        let peer = Peer::prepare(&server, &mut report).await?;

        for &op in &config.ops {
            let workload = Arc::new(StoreOp {
                store: store.clone(),
                op,
            });
            for &concurrency in &config.concurrency {
                let cell = Cell::new(op, backend.label(), concurrency);
                report.push(cell.measure(&workload, window).await?);
                // The peer runs right after the cell it is compared with, so that both see the
                // same machine: other load on it comes and goes within a run.
                if let Some(row) = peer.measure(op, concurrency, window).await? {
                    report.push(row);
                }
            }
        }

        // Stop this backend's servers before the next backend starts, so it has the machine to
        // itself.
        drop(peer);
        drop(store);
        drop(server);
        report.push_load(backend.label(), load_before, machine::load_average());
        report.write(&config.out)?;
    }

    println!();
    for line in report.comparisons() {
        println!("{line}");
    }
    report.write(&config.out)?;
    println!("\nwrote {}", config.out.display());
    Ok(())
}

/// What a backend's operations are compared with, on the same server.
#[derive(Debug)]
enum Peer {
    None,
    /// `redis-benchmark` GET next to `get`, SET next to `put`.
    RedisBenchmark(SocketAddr),
    /// A raw sqlx point select next to `get`.
    RawSelect(Arc<RawSelect>),
}

impl Peer {
    async fn prepare(server: &Server, report: &mut Report) -> Result<Peer, BoxError> {
        Ok(match server {
            Server::Redis(redis) => {
                redis_benchmark::prime(redis.addr()).await?;
                Peer::RedisBenchmark(redis.addr())
            }
            Server::Postgres { url, .. } => {
                let raw = RawSelect::prepare(url).await?;
                report.set_postgres_version(raw.server_version().await?);
                Peer::RawSelect(Arc::new(raw))
            }
            _ => Peer::None,
        })
    }

    /// Measures the peer of `op`, if it has one.
    async fn measure(
        &self,
        op: Op,
        concurrency: usize,
        window: Window,
    ) -> Result<Option<Row>, BoxError> {
        match (self, op) {
            (Peer::RedisBenchmark(addr), Op::Get | Op::Put) => {
                let (test, label) = match op {
                    Op::Get => ("GET", report::REDIS_BENCHMARK_GET),
                    _ => ("SET", report::REDIS_BENCHMARK_SET),
                };
                let cell = Cell::new(op, label, concurrency);
                cell.announce();
                let result = redis_benchmark::run(*addr, test, concurrency, window.measure).await?;
                Ok(Some(cell.finish_peer(&result)))
            }
            (Peer::RawSelect(raw), Op::Get) => {
                let cell = Cell::new(op, report::RAW_SQLX, concurrency);
                Ok(Some(cell.measure(raw, window).await?))
            }
            _ => Ok(None),
        }
    }
}

/// One row of the results while it is being measured.
#[derive(Debug)]
struct Cell {
    op: Op,
    subject: &'static str,
    concurrency: usize,
}

impl Cell {
    fn new(op: Op, subject: &'static str, concurrency: usize) -> Self {
        Cell {
            op,
            subject,
            concurrency,
        }
    }

    /// Prints the row's first columns before measuring: that is the progress display.
    fn announce(&self) {
        use std::io::Write as _;
        print!(
            "{}",
            Row::text_start(self.op, self.subject, self.concurrency)
        );
        // A failed flush only delays the progress display.
        let _ = std::io::stdout().flush();
    }

    async fn measure<W: Workload>(
        self,
        workload: &Arc<W>,
        window: Window,
    ) -> Result<Row, BoxError> {
        self.announce();
        let sample = closed_loop(Arc::clone(workload), self.concurrency, window).await?;
        let row = Row::from_sample(self.op, self.subject, self.concurrency, &sample);
        println!("{}", row.text_end());
        Ok(row)
    }

    fn finish_peer(self, result: &redis_benchmark::PeerResult) -> Row {
        let row = Row::from_redis_benchmark(self.op, self.subject, self.concurrency, result);
        println!("{}", row.text_end());
        row
    }
}
