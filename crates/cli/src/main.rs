//! The `statehouse` binary. It only parses the command line and delegates to
//! the crates (`statehouse lb` → `statehouse_lb::run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// statehouse: service tiers where any instance can serve any request.
#[derive(Debug, Parser)]
#[command(name = "statehouse", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP load balancer in front of N instances.
    ///
    /// The configuration comes from a TOML file (see crates/lb/lb.example.toml)
    /// and `--set key=value` overrides with dotted keys, e.g.
    /// `--set policy=round-robin --set health.interval=1s`. An invalid
    /// configuration is refused with the key and the reason. SIGTERM or
    /// Ctrl-C drains in-flight requests up to `shutdown.drain_deadline`.
    Lb {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `dotted.key=value` overrides applied on top of the file.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("statehouse: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Lb { config, overrides } => runtime.block_on(lb(config, overrides)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("statehouse: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn lb(
    config: Option<PathBuf>,
    overrides: Vec<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = statehouse_lb::LbConfig::load(config.as_deref(), &overrides)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (listen): {e}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (admin.listen): {e}",
                config.admin.listen
            )
        })?;
    println!(
        "statehouse lb: proxying on http://{}, admin on http://{}",
        listener.local_addr()?,
        admin.local_addr()?
    );
    statehouse_lb::run(listener, admin, config, statehouse_lb::shutdown_signal()).await?;
    Ok(())
}
