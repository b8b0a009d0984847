//! `store-bench`: parses the command line and hands over to `statehouse_bench::run`.
//!
//! ```sh
//! cargo run --release -p statehouse-bench --bin store-bench -- \
//!     --duration 3s --concurrency 1,16,64 --out bench/results/store.md
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use statehouse_bench::cli::{command_line, parse_duration};
use statehouse_bench::{Backend, Config, Op};

/// Measures the store's operations on every backend, next to redis-benchmark and raw sqlx, in one
/// run, against private servers it starts itself.
#[derive(Debug, Parser)]
#[command(name = "store-bench")]
struct Args {
    /// Backends to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "memory,sqlite,redis,redis-cluster,postgres"
    )]
    backends: Vec<Backend>,

    /// Store operations to measure on each backend.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "get,map-read,map-patch,put"
    )]
    ops: Vec<Op>,

    /// Numbers of concurrent tasks (and of redis-benchmark clients).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,

    /// Measured time per backend × operation × concurrency, e.g. `3s`, `500ms`.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    duration: Duration,

    /// Unrecorded calls before each measurement.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,

    /// Where to write the Markdown results.
    #[arg(long, default_value = "bench/results/store.md")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.concurrency.contains(&0) {
        eprintln!("store-bench: --concurrency values must be at least 1");
        return ExitCode::FAILURE;
    }
    let config = Config {
        backends: args.backends,
        ops: args.ops,
        concurrency: args.concurrency,
        warmup: args.warmup,
        duration: args.duration,
        out: args.out,
        command: command_line(),
    };
    // The default multi-thread runtime: one worker thread per core, as a service would run.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("store-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(statehouse_bench::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
