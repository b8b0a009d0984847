//! `session-bench`: parses the command line and hands over to
//! `statehouse_bench::session::run`.
//!
//! ```sh
//! cargo run --release -p statehouse-bench --bin session-bench -- \
//!     --duration 3s --concurrency 1,16,64 --out bench/results/session.md
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use statehouse_bench::cli::{command_line, parse_duration};
use statehouse_bench::session::{SessionBenchConfig, run};

/// statehouse-session next to tower-sessions with its Redis store, on one
/// private redis-server, in one run: lost updates between two instances,
/// throughput and latency of a session-reading and a session-writing
/// handler, and what a session read adds next to one Redis GET.
#[derive(Debug, Parser)]
#[command(name = "session-bench")]
struct Args {
    /// Numbers of concurrent HTTP clients.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,

    /// Measured time per cell, e.g. `3s`, `500ms`.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    duration: Duration,

    /// Unrecorded requests before each measurement.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,

    /// Rounds per throughput cell: each round measures both sides, the one
    /// that goes first alternating; a side's rounds are pooled.
    #[arg(long, default_value_t = 3)]
    rounds: usize,

    /// Requests of the lost-update test.
    #[arg(long, default_value_t = 1000)]
    updates: usize,

    /// Profiling aid: run only the throughput cells of this side
    /// (`statehouse` or `tower-sessions`) and handler (`read` or `write`),
    /// e.g. `--only statehouse:read`; writes no report.
    #[arg(long)]
    only: Option<String>,

    /// Where to write the Markdown results.
    #[arg(long, default_value = "bench/results/session.md")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.concurrency.contains(&0) || args.updates == 0 || args.rounds == 0 {
        eprintln!("session-bench: --concurrency values, --rounds and --updates must be at least 1");
        return ExitCode::FAILURE;
    }
    let config = SessionBenchConfig {
        concurrency: args.concurrency,
        warmup: args.warmup,
        duration: args.duration,
        updates: args.updates,
        rounds: args.rounds,
        out: args.out,
        command: command_line(),
        throughput_only: args.only.map(|only| {
            let (side, handler) = only.split_once(':').unwrap_or((only.as_str(), "read"));
            statehouse_bench::session::ThroughputOnly {
                statehouse: side != "tower-sessions",
                tower_sessions: side != "statehouse",
                handler: handler.to_owned(),
            }
        }),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("session-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
