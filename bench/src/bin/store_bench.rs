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

/// `3s`, `500ms`, `2m`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 3s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1_000.0,
        "m" | "min" => number * 60.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s or m"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// The command line as typed, quoted where a shell would need it, for the report's header.
fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            if !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./,=:@+".contains(c))
            {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }
}
