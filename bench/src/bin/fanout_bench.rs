//! `fanout-bench`: parses the command line and hands over to
//! `statehouse_bench::fanout::run`.
//!
//! ```sh
//! (cd bench/fanout && npm ci)
//! cargo build --release -p statehouse-bench
//! ./target/release/fanout-bench --out bench/results/fanout.md
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use statehouse_bench::cli::{command_line, parse_duration};
use statehouse_bench::fanout::{FanoutBenchConfig, Side, run};

/// statehouse-fanout's WebSocket hub next to Socket.IO with its Redis
/// adapter: three instances each on one private Redis, the same subscribers
/// in one channel, publishers at rising fixed rates, one load client for
/// both; then the memory per idle connection.
#[derive(Debug, Parser)]
#[command(name = "fanout-bench")]
struct Args {
    /// Which sides to run, in order (`floor`: one write per delivery and nothing else, the
    /// least any server could do here).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "statehouse,socket-io,floor"
    )]
    sides: Vec<Side>,
    /// Subscribers in the channel.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages per second into the channel, rising; each rate runs for --step.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,50,75,100,150,200,300,400,600,800,1000,1500,2000,3000"
    )]
    rates: Vec<u64>,
    /// How long each rate is published, in whole seconds (e.g. `5s`).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    step: Duration,
    /// Payload bytes (at least 40).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Idle connections for the memory-per-connection measurement (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// The `bench-hub` binary; by default the one next to this program.
    #[arg(long)]
    hub: Option<PathBuf>,
    /// The directory of the Socket.IO scripts, after `npm ci`.
    #[arg(long, default_value = "bench/fanout")]
    node_dir: PathBuf,
    /// Where to write the Markdown results.
    #[arg(long, default_value = "bench/results/fanout.md")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.size < 40 || args.subscribers == 0 || args.rates.is_empty() || args.step.as_secs() == 0
    {
        eprintln!(
            "fanout-bench: need --size >= 40, --subscribers > 0, some --rates and --step of 1s or more"
        );
        return ExitCode::FAILURE;
    }
    if args.sides.contains(&Side::SocketIo) && !args.node_dir.join("node_modules").is_dir() {
        eprintln!(
            "fanout-bench: run `npm ci` in {} first (Socket.IO and its Redis adapter)",
            args.node_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let hub = args.hub.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("bench-hub")))
            .unwrap_or_else(|| PathBuf::from("target/release/bench-hub"))
    });
    let config = FanoutBenchConfig {
        sides: args.sides,
        subscribers: args.subscribers,
        rates: args.rates,
        step: args.step,
        size: args.size,
        idle: args.idle,
        hub,
        node_dir: args.node_dir,
        out: args.out,
        command: command_line(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
