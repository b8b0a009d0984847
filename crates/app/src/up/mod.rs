//! `statehouse up`: the whole tier on one machine.
//!
//! The load balancer runs in this process; N shop instances and the worker
//! run as child processes of the same binary (`statehouse serve`,
//! `statehouse worker`), each logging to `.statehouse/logs/NAME.log`. The
//! dashboard, on its own loopback port, shows each instance and can kill -9,
//! restart, drain and add them.
//!
//! Children are tied to this process (`STATEHOUSE_PARENT_PID`, see
//! [`crate::die_with_parent`]): if `up` itself is killed they get SIGTERM.
//! On Ctrl-C every child is stopped with SIGTERM (SIGKILL after 10 s).

mod dashboard;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::error::AppError;

/// What `up` runs; every field has a default but the stores a shared
/// architecture needs from outside (Redis, Postgres).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    /// Where `up` keeps its files (SQLite databases, objects, logs, the
    /// session key).
    pub dir: PathBuf,
    pub instances: usize,
    #[serde(with = "arch_name")]
    pub arch: Arch,
    /// The shop's (the balancer's) port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// The dashboard's port on 127.0.0.1; 0 picks a free one.
    pub dashboard_port: u16,
    /// Session store URL; by default from `arch` (memory, or an SQLite file
    /// in `dir`). Required for shared-redis, shared-redis-cluster and
    /// shared-postgres.
    pub session_store: Option<String>,
    /// Durable database URL; by default an SQLite file in `dir` (the session
    /// store's URL under shared-postgres).
    pub database: Option<String>,
    /// Object store directory; by default `dir/objects`.
    pub objects: Option<String>,
    /// Fan-out broker for live order status; by default the session
    /// store's Redis under shared-redis and shared-redis-cluster, else an
    /// SQLite file in `dir` (shared by the processes on this host).
    pub broker: Option<String>,
    /// The `statehouse` binary to start children from; by default this one.
    #[serde(skip)]
    pub exe: Option<PathBuf>,
}

mod arch_name {
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<crate::Arch, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            dir: PathBuf::from(".statehouse"),
            instances: 3,
            arch: Arch::SharedSqlite,
            port: 8080,
            dashboard_port: 8081,
            session_store: None,
            database: None,
            objects: None,
            broker: None,
            exe: None,
        }
    }
}

impl UpConfig {
    /// Reads a TOML file of these fields (any may be left out).
    pub fn from_file(path: &Path) -> Result<UpConfig, AppError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AppError::BadRequest(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            AppError::BadRequest(format!("{}: {}", path.display(), e.message().trim()))
        })
    }
}

/// The resolved plan: every URL and path a child needs.
#[derive(Debug, Clone)]
struct Plan {
    exe: PathBuf,
    arch: Arch,
    session_store: String,
    database: String,
    objects: String,
    broker: String,
    logs: PathBuf,
    /// Keys for the children's environment.
    secrets: Vec<(String, String)>,
}

impl Plan {
    fn resolve(config: &UpConfig) -> Result<Plan, AppError> {
        if config.instances == 0 || config.instances > 32 {
            return Err(AppError::BadRequest("--instances: 1 to 32".into()));
        }
        let dir = std::path::absolute(&config.dir)
            .map_err(|e| AppError::internal(&format!("{}", config.dir.display()), e))?;
        std::fs::create_dir_all(dir.join("logs"))
            .map_err(|e| AppError::internal(&format!("creating {}", dir.display()), e))?;
        let sqlite = |file: &str| format!("sqlite://{}", dir.join(file).display());
        let session_store = match (&config.session_store, config.arch) {
            (Some(url), _) => url.clone(),
            (None, Arch::StickyMemory) => "memory://".to_owned(),
            (None, Arch::SharedSqlite | Arch::Token) => sqlite("sessions.db"),
            (None, arch) => {
                return Err(AppError::BadRequest(format!(
                    "--arch {arch} needs --session-store URL (a {} server)",
                    arch.session_schemes().first().copied().unwrap_or("store")
                )));
            }
        };
        let database = match (&config.database, config.arch) {
            (Some(url), _) => url.clone(),
            (None, Arch::SharedPostgres) => session_store.clone(),
            (None, _) => sqlite("shop.db"),
        };
        let broker = match (&config.broker, config.arch) {
            (Some(url), _) => url.clone(),
            (None, Arch::SharedRedis | Arch::SharedRedisCluster) => session_store.clone(),
            (None, _) => sqlite("fanout.db"),
        };
        let objects = config
            .objects
            .clone()
            .unwrap_or_else(|| dir.join("objects").display().to_string());
        let exe = match &config.exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe()
                .map_err(|e| AppError::internal("finding the statehouse binary", e))?,
        };
        Ok(Plan {
            exe,
            arch: config.arch,
            session_store,
            database,
            objects,
            broker,
            logs: dir.join("logs"),
            secrets: secrets_env(&dir)?,
        })
    }
}

/// The keys every instance shares, as environment variables for the
/// children: the session signing key, and token mode's access-token and
/// cart-cookie keys. Each secret comes from the environment if set, else
/// from a file in `dir`, made (mode 0600) on first start so sessions and
/// tokens outlive a restart of `up`.
fn secrets_env(dir: &Path) -> Result<Vec<(String, String)>, AppError> {
    let session = match std::env::var("STATEHOUSE_SESSION_KEYS") {
        Ok(keys) => keys,
        Err(_) => format!("k1:{}", secret_file(&dir.join("session-key"))?),
    };
    let token = match std::env::var("STATEHOUSE_TOKEN_SECRET") {
        Ok(secret) => secret,
        Err(_) => secret_file(&dir.join("token-key"))?,
    };
    let cookie = match std::env::var("STATEHOUSE_COOKIE_SECRET") {
        Ok(secret) => secret,
        Err(_) => secret_file(&dir.join("cookie-key"))?,
    };
    let mut admin = [0u8; 24];
    getrandom::fill(&mut admin).map_err(|e| AppError::internal("random token", e))?;
    Ok(vec![
        // For the dashboard's calls to the instances' /internal/stats; new
        // on every start of `up`.
        (
            "STATEHOUSE_ADMIN_TOKEN".into(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(admin),
        ),
        ("STATEHOUSE_SESSION_KEYS".into(), session),
        (
            "STATEHOUSE_TOKEN_KEYS".into(),
            "t1:HS256:env:STATEHOUSE_TOKEN_SECRET".into(),
        ),
        ("STATEHOUSE_TOKEN_SECRET".into(), token),
        (
            "STATEHOUSE_COOKIE_KEYS".into(),
            "1:env:STATEHOUSE_COOKIE_SECRET".into(),
        ),
        ("STATEHOUSE_COOKIE_SECRET".into(), cookie),
    ])
}

/// 32 random bytes in base64, kept in `path` (created with mode 0600).
fn secret_file(path: &Path) -> Result<String, AppError> {
    if let Ok(keys) = std::fs::read_to_string(path) {
        return Ok(keys.trim().to_owned());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| AppError::internal("random key", e))?;
    let keys = base64::engine::general_purpose::STANDARD.encode(secret);
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(keys.as_bytes()))
        .map_err(|e| AppError::internal(&format!("writing {}", path.display()), e))?;
    Ok(keys)
}

/// What a child is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Instance,
    Worker,
}

/// One child process as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
struct ChildState {
    name: String,
    role: Role,
    port: u16,
    pid: Option<u32>,
    /// starting | running | stopping | exited: ...
    status: String,
    /// Bumped on each start, so a stale exit report is ignored.
    #[serde(skip)]
    generation: u64,
}

/// The running tier: children, the balancer's admin address.
#[derive(Debug)]
pub(crate) struct Tier {
    plan: Plan,
    children: Mutex<BTreeMap<String, ChildState>>,
    lb_admin: SocketAddr,
    shop_url: String,
    http: reqwest::Client,
    started: Instant,
}

fn free_port() -> Result<u16, AppError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| AppError::internal("finding a free port", e))
}

impl Tier {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ChildState>> {
        // A panic elsewhere while holding the map leaves valid data.
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.plan.logs.join(format!("{name}.log"))
    }

    /// Starts (or restarts) the child `name` and waits until it is ready.
    async fn start(self: &Arc<Self>, name: &str, role: Role, port: u16) -> Result<(), AppError> {
        let plan = &self.plan;
        let mut cmd = tokio::process::Command::new(&plan.exe);
        match role {
            Role::Instance => {
                cmd.arg("serve")
                    .args(["--name", name, "--listen", &format!("127.0.0.1:{port}")])
                    .args(["--arch", plan.arch.as_str()])
                    .args(["--session-store", &plan.session_store])
                    .args(["--objects", &plan.objects])
                    .args(["--drain-delay", "0s", "--insecure-cookies"]);
            }
            Role::Worker => {
                cmd.arg("worker").args(["--name", name]);
            }
        }
        cmd.args(["--database", &plan.database])
            .args(["--broker", &plan.broker])
            .envs(plan.secrets.iter().map(|(k, v)| (k, v)))
            .env("STATEHOUSE_PARENT_PID", std::process::id().to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .map_err(|e| AppError::internal("opening the log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| AppError::internal("opening the log", e))?;
        cmd.stdout(log).stderr(log2);
        let mut child = cmd
            .spawn()
            .map_err(|e| AppError::internal(&format!("starting {}", plan.exe.display()), e))?;
        let pid = child.id();
        let generation = {
            let mut children = self.lock();
            let generation = children.get(name).map_or(0, |c| c.generation) + 1;
            children.insert(
                name.to_owned(),
                ChildState {
                    name: name.to_owned(),
                    role,
                    port,
                    pid,
                    status: "starting".into(),
                    generation,
                },
            );
            generation
        };
        let tier = self.clone();
        let owned = name.to_owned();
        tokio::spawn(async move {
            let status = child.wait().await;
            let text = match status {
                Ok(s) => format!("exited: {s}"),
                Err(e) => format!("exited: {e}"),
            };
            let mut children = tier.lock();
            if let Some(c) = children
                .get_mut(&owned)
                .filter(|c| c.generation == generation)
            {
                tracing::info!(child = owned, "{text}");
                c.status = text;
                c.pid = None;
            }
        });
        match role {
            Role::Instance => self.wait_ready(name, port, generation).await?,
            Role::Worker => {}
        }
        if let Some(c) = self
            .lock()
            .get_mut(name)
            .filter(|c| c.generation == generation && c.status == "starting")
        {
            c.status = "running".into();
        }
        Ok(())
    }

    async fn wait_ready(&self, name: &str, port: u16, generation: u64) -> Result<(), AppError> {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            let exited = self
                .lock()
                .get(name)
                .filter(|c| c.generation == generation)
                .is_some_and(|c| c.status.starts_with("exited"));
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(AppError::Unavailable(format!(
                    "{name} did not become ready ({}); the end of {}:\n{}",
                    if exited { "it exited" } else { "60 s" },
                    self.log_path(name).display(),
                    tail.join("\n")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, name: &str, signal: Signal) -> Result<u32, AppError> {
        let pid = self
            .lock()
            .get(name)
            .ok_or_else(|| AppError::NotFound(format!("no instance {name:?}")))?
            .pid
            .ok_or_else(|| AppError::Conflict(format!("{name} is not running")))?;
        kill(Pid::from_raw(pid as i32), signal)
            .map_err(|e| AppError::internal(&format!("signalling {name}"), e))?;
        Ok(pid)
    }

    /// kill -9: the instance dies with whatever it had in flight.
    pub(crate) fn kill(&self, name: &str) -> Result<u32, AppError> {
        let pid = self.signal(name, Signal::SIGKILL)?;
        tracing::info!(child = name, pid, "killed with SIGKILL");
        Ok(pid)
    }

    /// Waits until `name` has exited, up to `wait`; true if it did.
    async fn wait_exit(&self, name: &str, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.lock().get(name).is_none_or(|c| c.pid.is_none()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Drains at the balancer, stops gracefully, starts again on the same
    /// port, and puts it back in rotation: nobody sees an error.
    pub(crate) async fn restart(self: &Arc<Self>, name: &str) -> Result<(), AppError> {
        let (role, port, running) = {
            let children = self.lock();
            let c = children
                .get(name)
                .ok_or_else(|| AppError::NotFound(format!("no instance {name:?}")))?;
            (c.role, c.port, c.pid.is_some())
        };
        if running {
            if role == Role::Instance {
                self.admin("POST", &format!("/instances/{name}/drain?wait=30s"), None)
                    .await?;
            }
            self.set_status(name, "stopping");
            self.signal(name, Signal::SIGTERM)?;
            if !self.wait_exit(name, Duration::from_secs(10)).await {
                self.kill(name)?;
                self.wait_exit(name, Duration::from_secs(5)).await;
            }
        }
        self.start(name, role, port).await?;
        if role == Role::Instance {
            self.admin("POST", &format!("/instances/{name}/undrain"), None)
                .await?;
        }
        Ok(())
    }

    fn set_status(&self, name: &str, status: &str) {
        if let Some(c) = self.lock().get_mut(name) {
            c.status = status.to_owned();
        }
    }

    /// Starts one more instance and adds it to the balancer.
    pub(crate) async fn add_instance(self: &Arc<Self>) -> Result<String, AppError> {
        let name = {
            let children = self.lock();
            (1..)
                .map(|i| format!("app-{i}"))
                .find(|n| !children.contains_key(n))
                .unwrap_or_default()
        };
        let port = free_port()?;
        self.start(&name, Role::Instance, port).await?;
        let body = serde_json::json!({ "name": name, "addr": format!("127.0.0.1:{port}") });
        self.admin("POST", "/instances", Some(body)).await?;
        Ok(name)
    }

    /// Calls the balancer's admin API.
    pub(crate) async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, AppError> {
        let url = format!("http://{}{path}", self.lb_admin);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| AppError::internal("method", e))?;
        let mut req = self.http.request(method, &url);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = req
            .send()
            .await
            .map_err(|e| AppError::Unavailable(format!("the balancer's admin API: {e}")))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| AppError::Unavailable(format!("the balancer's admin API: {e}")))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status.is_success() {
            Ok(value)
        } else {
            Err(AppError::Conflict(format!("balancer: {status} {value}")))
        }
    }

    /// Stops every child: SIGTERM, then SIGKILL after 10 s.
    async fn stop_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for name in &names {
            let _ = self.signal(name, Signal::SIGTERM);
        }
        for name in &names {
            if !self.wait_exit(name, Duration::from_secs(10)).await {
                let _ = self.kill(name);
                self.wait_exit(name, Duration::from_secs(2)).await;
            }
        }
    }

    fn children(&self) -> Vec<ChildState> {
        self.lock().values().cloned().collect()
    }

    /// An instance's `/internal/stats`, if it answers.
    async fn instance_stats(&self, port: u16) -> Option<serde_json::Value> {
        let token = self
            .plan
            .secrets
            .iter()
            .find(|(k, _)| k == "STATEHOUSE_ADMIN_TOKEN")
            .map(|(_, v)| v.as_str())?;
        let r = self
            .http
            .get(format!("http://127.0.0.1:{port}/internal/stats"))
            .bearer_auth(token)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        serde_json::from_slice(&r.bytes().await.ok()?).ok()
    }
}

/// The addresses a running tier listens on.
#[derive(Debug, Clone)]
pub struct UpAddrs {
    pub shop: SocketAddr,
    pub dashboard: SocketAddr,
    pub lb_admin: SocketAddr,
}

async fn bind(port: u16, what: &str) -> Result<tokio::net::TcpListener, AppError> {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            AppError::Unavailable(format!(
                "cannot listen on 127.0.0.1:{port} for the {what}: {e} (choose another with --port/--dashboard-port, or 0 for any)"
            ))
        })
}

/// Runs the tier until `shutdown`; `ready` gets the addresses once every
/// child is up. Progress goes to stdout.
pub async fn run(
    config: UpConfig,
    ready: Option<tokio::sync::oneshot::Sender<UpAddrs>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let plan = Plan::resolve(&config)?;
    let say = |msg: &str| println!("statehouse up: {msg}");
    say(&format!(
        "architecture {}; {} in {}; orders in {}; files in {}; live order status via {}",
        plan.arch,
        match plan.arch {
            Arch::Token => "refresh tokens",
            _ => "sessions",
        },
        crate::db::redact(&plan.session_store),
        crate::db::redact(&plan.database),
        // The query may carry S3 credentials.
        plan.objects.split('?').next().unwrap_or_default(),
        crate::db::redact(&plan.broker)
    ));
    // The schema once, before the instances race for it.
    crate::db::Db::open(&plan.database).await?;
    let shop_listener = bind(config.port, "shop").await?;
    let dashboard_listener = bind(config.dashboard_port, "dashboard").await?;
    let admin_listener = bind(0, "balancer admin API").await?;
    let addrs = UpAddrs {
        shop: shop_listener
            .local_addr()
            .map_err(|e| AppError::internal("addr", e))?,
        dashboard: dashboard_listener
            .local_addr()
            .map_err(|e| AppError::internal("addr", e))?,
        lb_admin: admin_listener
            .local_addr()
            .map_err(|e| AppError::internal("addr", e))?,
    };
    let tier = Arc::new(Tier {
        plan,
        children: Mutex::new(BTreeMap::new()),
        lb_admin: addrs.lb_admin,
        shop_url: format!("http://{}", addrs.shop),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .build()
            .map_err(|e| AppError::internal("http client", e))?,
        started: Instant::now(),
    });

    let result = start_and_wait(
        &tier,
        &config,
        shop_listener,
        admin_listener,
        dashboard_listener,
        &addrs,
        ready,
        shutdown,
    )
    .await;
    say("stopping every instance and the worker");
    tier.stop_all().await;
    say("stopped");
    result
}

#[allow(clippy::too_many_arguments)]
async fn start_and_wait(
    tier: &Arc<Tier>,
    config: &UpConfig,
    shop_listener: tokio::net::TcpListener,
    admin_listener: tokio::net::TcpListener,
    dashboard_listener: tokio::net::TcpListener,
    addrs: &UpAddrs,
    ready: Option<tokio::sync::oneshot::Sender<UpAddrs>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let say = |msg: &str| println!("statehouse up: {msg}");
    // Health: a dead instance refuses connections, which the balancer
    // retries elsewhere and ejects on its own; the active check (1.5 s to
    // mark down) is for hung ones, and three misses keep a slow machine
    // from marking a live instance down.
    let mut lb_toml = format!(
        "listen = \"{}\"\npolicy = \"{}\"\n[admin]\nlisten = \"{}\"\n\
         [health]\npath = \"/readyz\"\ninterval = \"500ms\"\ntimeout = \"450ms\"\nrise = 1\nfall = 3\n\
         [retry]\nidempotent = true\n[shutdown]\ndrain_deadline = \"10s\"\n",
        addrs.shop,
        tier.plan.arch.lb_policy(),
        addrs.lb_admin
    );
    for i in 1..=config.instances {
        let name = format!("app-{i}");
        let port = free_port()?;
        let started = Instant::now();
        say(&format!("starting {name} on 127.0.0.1:{port} ..."));
        tier.start(&name, Role::Instance, port).await?;
        say(&format!(
            "{name} ready in {} ms",
            started.elapsed().as_millis()
        ));
        lb_toml.push_str(&format!(
            "[[instances]]\nname = \"{name}\"\naddr = \"127.0.0.1:{port}\"\n"
        ));
    }
    say("starting the worker ...");
    tier.start("worker", Role::Worker, 0).await?;

    let lb_config = statehouse_lb::LbConfig::from_toml_str(&lb_toml)
        .map_err(|e| AppError::internal("balancer configuration", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lb_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let lb = tokio::spawn(statehouse_lb::run(
        shop_listener,
        admin_listener,
        lb_config,
        lb_stop,
    ));
    let dashboard = {
        let mut rx = stop_rx.clone();
        let app = dashboard::router(tier.clone());
        tokio::spawn(async move {
            axum::serve(dashboard_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    say(&format!(
        "ready in {:.1} s\n\n    shop:      http://{}/\n    dashboard: http://{}/\n\nCtrl-C stops everything.",
        tier.started.elapsed().as_secs_f64(),
        addrs.shop,
        addrs.dashboard
    ));
    if let Some(ready) = ready {
        let _ = ready.send(addrs.clone());
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    match lb.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("balancer: {e}"),
        Err(e) => tracing::warn!("balancer task: {e}"),
    }
    let _ = dashboard.await;
    Ok(())
}
