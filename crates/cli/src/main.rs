//! The `statehouse` binary. It only parses the command line and delegates to
//! the crates: `up` → `statehouse_app::up::run`, `serve` →
//! `statehouse_app::serve`, `worker` → `statehouse_app::worker::run`, `lb` →
//! `statehouse_lb::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use statehouse_app::Arch;

/// statehouse: service tiers where any instance can serve any request.
#[derive(Debug, Parser)]
#[command(name = "statehouse", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole tier on this machine: the load balancer, N shop
    /// instances and the order worker, plus a dashboard.
    ///
    /// By default everything is embedded: sessions and orders in SQLite
    /// files and avatars in a directory, all under ./.statehouse/. Prints the
    /// shop's and the dashboard's URLs; Ctrl-C stops every child.
    Up {
        /// A TOML file with any of: instances, arch, port, dashboard_port,
        /// dir, session_store, database, objects, broker. Flags override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How many shop instances.
        #[arg(long)]
        instances: Option<usize>,
        /// sticky-memory | shared-sqlite | shared-redis | shared-redis-cluster
        /// | shared-postgres | token (default shared-sqlite).
        #[arg(long)]
        arch: Option<Arch>,
        /// The shop's port on 127.0.0.1 (default 8080; 0 = any free port).
        #[arg(long)]
        port: Option<u16>,
        /// The dashboard's port on 127.0.0.1 (default 8081; 0 = any).
        #[arg(long)]
        dashboard_port: Option<u16>,
        /// Where up keeps databases, objects, logs and the session key
        /// (default ./.statehouse).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Session store URL (redis://, redis+cluster://, postgres://, sqlite://).
        #[arg(long)]
        session_store: Option<String>,
        /// Durable database URL (sqlite:// or postgres://).
        #[arg(long)]
        database: Option<String>,
        /// Object store: a directory, or s3://BUCKET[/PREFIX][?aws_endpoint=...]
        /// (credentials from the AWS_* environment variables).
        #[arg(long)]
        objects: Option<String>,
        /// Fan-out broker for live order status (redis://, redis+cluster://,
        /// nats://, sqlite://); by default the session store's Redis under
        /// shared-redis*, else an SQLite file in --dir.
        #[arg(long)]
        broker: Option<String>,
    },
    /// Run one shop instance (what `up` starts N of).
    ///
    /// Session keys come from STATEHOUSE_SESSION_KEYS (`kid:base64secret`,
    /// newest first) or --session-keys-file; every instance must share them.
    /// With --arch token, the access-token keys come from
    /// STATEHOUSE_TOKEN_KEYS (`KID:ALG:env:VAR` or `KID:ALG:file:PATH`) and
    /// the cart-cookie keys from STATEHOUSE_COOKIE_KEYS (`ID:env:VAR`).
    /// STATEHOUSE_ADMIN_TOKEN, if set, opens GET /internal/stats to that
    /// bearer token.
    Serve {
        /// The name in X-Served-By.
        #[arg(long, default_value = "app-1")]
        name: String,
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
        #[arg(long, default_value = "shared-sqlite")]
        arch: Arch,
        /// Session store URL; must suit --arch.
        #[arg(long, default_value = "sqlite://.statehouse/sessions.db")]
        session_store: String,
        /// Durable database URL.
        #[arg(long, default_value = "sqlite://.statehouse/shop.db")]
        database: String,
        /// Object store: a directory, or s3://BUCKET[/PREFIX][?aws_endpoint=...]
        /// (credentials from the AWS_* environment variables).
        #[arg(long, default_value = ".statehouse/objects")]
        objects: String,
        /// A file holding the session keys, instead of the environment.
        #[arg(long)]
        session_keys_file: Option<PathBuf>,
        /// Session cookies without `Secure`: only for plain HTTP on a
        /// developer's machine.
        #[arg(long)]
        insecure_cookies: bool,
        /// After SIGTERM, how long /readyz answers 503 before the listener
        /// closes (requests in flight always finish).
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        drain_delay: Duration,
        /// Fan-out broker for live order status over the WebSocket hub at
        /// /ws (sqlite://PATH, redis://..., redis+cluster://..., nats://...).
        /// Live tokens are signed with STATEHOUSE_TOKEN_KEYS. Without it the
        /// page polls.
        #[arg(long, env = "STATEHOUSE_BROKER")]
        broker: Option<String>,
    },
    /// Run the order worker: takes placed orders from the database's queue.
    Worker {
        #[arg(long, default_value = "worker")]
        name: String,
        /// Durable database URL.
        #[arg(long, default_value = "sqlite://.statehouse/shop.db")]
        database: String,
        /// How long a claimed order stays this worker's; after that, if it
        /// died, another worker takes the order again.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        lease: Duration,
        /// Simulated work per order.
        #[arg(long, value_parser = parse_duration, default_value = "300ms")]
        work: Duration,
        /// Fan-out broker every order status change is published to (the
        /// instances' --broker).
        #[arg(long, env = "STATEHOUSE_BROKER")]
        broker: Option<String>,
    },
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match &cli.command {
        // The load balancer serves connections on worker threads of its own (`workers`, one
        // per core by default); this runtime only accepts, and runs the admin API and the
        // health checks.
        Command::Lb { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("statehouse: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime from here on: `shutdown_signal()` installs its
    // handlers when called, before a command says it is up.
    let _runtime_context = runtime.enter();
    let result = match cli.command {
        Command::Lb { config, overrides } => runtime.block_on(lb(config, overrides)),
        Command::Up {
            config,
            instances,
            arch,
            port,
            dashboard_port,
            dir,
            session_store,
            database,
            objects,
            broker,
        } => {
            let mut up = match config {
                Some(path) => match statehouse_app::up::UpConfig::from_file(&path) {
                    Ok(up) => up,
                    Err(e) => {
                        eprintln!("statehouse up: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                None => statehouse_app::up::UpConfig::default(),
            };
            up.instances = instances.unwrap_or(up.instances);
            up.arch = arch.unwrap_or(up.arch);
            up.port = port.unwrap_or(up.port);
            up.dashboard_port = dashboard_port.unwrap_or(up.dashboard_port);
            up.dir = dir.unwrap_or(up.dir);
            up.session_store = session_store.or(up.session_store);
            up.database = database.or(up.database);
            up.objects = objects.or(up.objects);
            up.broker = broker.or(up.broker);
            runtime
                .block_on(statehouse_app::up::run(
                    up,
                    None,
                    statehouse_lb::shutdown_signal(),
                ))
                .map_err(Into::into)
        }
        Command::Serve {
            name,
            listen,
            arch,
            session_store,
            database,
            objects,
            session_keys_file,
            insecure_cookies,
            drain_delay,
            broker,
        } => runtime.block_on(serve(
            statehouse_app::ServeConfig {
                name,
                arch,
                session_store,
                database,
                objects,
                session_keys: match session_keys(session_keys_file) {
                    Ok(keys) => keys,
                    Err(e) => {
                        eprintln!("statehouse serve: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                token_keys: match arch {
                    Arch::Token => match statehouse_app::TokenKeys::from_env() {
                        Ok(keys) => Some(keys),
                        Err(e) => {
                            eprintln!("statehouse serve: {e}");
                            return ExitCode::FAILURE;
                        }
                    },
                    _ => None,
                },
                admin_token: std::env::var("STATEHOUSE_ADMIN_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                insecure_cookies,
                drain_delay,
                live_keys: match &broker {
                    None => None,
                    Some(_) => match statehouse_app::live::keys_from_env() {
                        Ok(ring) => Some(ring),
                        Err(e) => {
                            eprintln!("statehouse serve: {e}");
                            return ExitCode::FAILURE;
                        }
                    },
                },
                broker,
            },
            listen,
        )),
        Command::Worker {
            name,
            database,
            lease,
            work,
            broker,
        } => {
            statehouse_app::die_with_parent();
            let mut config = statehouse_app::worker::WorkerConfig::new(name, database);
            config.lease = lease;
            config.work = work;
            config.broker = broker;
            runtime
                .block_on(statehouse_app::worker::run(
                    config,
                    statehouse_lb::shutdown_signal(),
                ))
                .map_err(Into::into)
        }
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
    // Handlers first: a SIGTERM right after the line below drains, not kills.
    let shutdown = statehouse_lb::shutdown_signal();
    println!(
        "statehouse lb: proxying on http://{}, admin on http://{}",
        listener.local_addr()?,
        admin.local_addr()?
    );
    statehouse_lb::run(listener, admin, config, shutdown).await?;
    Ok(())
}

fn session_keys(
    file: Option<PathBuf>,
) -> Result<statehouse_session::SessionKeys, statehouse_session::KeyError> {
    match file {
        Some(path) => statehouse_session::SessionKeys::from_file(&path),
        None => statehouse_session::SessionKeys::from_env("STATEHOUSE_SESSION_KEYS"),
    }
}

async fn serve(
    config: statehouse_app::ServeConfig,
    listen: SocketAddr,
) -> Result<(), Box<dyn std::error::Error>> {
    statehouse_app::die_with_parent();
    let shutdown = statehouse_lb::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} (--listen): {e}"))?;
    statehouse_app::serve(listener, config, shutdown).await?;
    Ok(())
}

/// `250ms`, `2s`, `1m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, e.g. 250ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: the unit is ms, s or m")),
    }
}
