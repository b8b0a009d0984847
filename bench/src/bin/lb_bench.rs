//! `lb-bench`: parses the command line and hands over to
//! `statehouse_bench::lb::run`.
//!
//! ```sh
//! apt-get install -y nginx-light haproxy wrk
//! cargo build --release -p statehouse -p statehouse-bench
//! ./target/release/lb-bench --duration 10s --connections 64 --out bench/results/lb.md
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use statehouse_bench::cli::{command_line, parse_duration};
use statehouse_bench::lb::{LbBenchConfig, run};

/// statehouse lb next to nginx and HAProxy (round robin, upstream keep-alive,
/// two workers each) in front of the same three trivial backends, driven by
/// wrk with the same load, in one run.
#[derive(Debug, Parser)]
#[command(name = "lb-bench")]
struct Args {
    /// Measured time per subject, e.g. `10s`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unrecorded load before each measurement.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Rounds: each measures every subject once, in an order rotated by one
    /// place per round; a subject's rounds are pooled.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// wrk connections (`-c`).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk threads (`-t`).
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// The `statehouse` binary, built with --release.
    #[arg(long, default_value = "target/release/statehouse")]
    statehouse: PathBuf,
    /// The `bench-backend` binary; by default the one next to this program.
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Where to write the Markdown results.
    #[arg(long, default_value = "bench/results/lb.md")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let backend = args.backend.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("bench-backend")))
            .unwrap_or_else(|| PathBuf::from("target/release/bench-backend"))
    });
    if args.connections == 0 || args.wrk_threads == 0 || args.wrk_threads > args.connections {
        eprintln!("lb-bench: need 1 <= --wrk-threads <= --connections");
        return ExitCode::FAILURE;
    }
    if args.rounds == 0 {
        eprintln!("lb-bench: --rounds must be at least 1");
        return ExitCode::FAILURE;
    }
    let config = LbBenchConfig {
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        connections: args.connections,
        wrk_threads: args.wrk_threads,
        statehouse: args.statehouse,
        backend,
        out: args.out,
        command: command_line(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lb-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
