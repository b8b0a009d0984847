//! `lb-bench`: statehouse-lb next to nginx and HAProxy, same backends, same
//! load, same run.
//!
//! Three `bench-backend` processes answer `200 ok`. In front of them, one at a
//! time: nothing (wrk straight at one backend, the ceiling), `statehouse lb`,
//! nginx and HAProxy — each configured equivalently: round robin, upstream
//! keep-alive, two workers/threads (the machine's cores), and the same
//! headers added (`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id` on
//! the request, the id on the response, as statehouse lb does by default),
//! so that every proxy does the same work. `wrk` (the
//! distribution's) drives each with the same threads, connections and
//! duration; a Lua `done` hook prints requests, errors and the p50/p99/p99.9
//! latency. Every process listens on 127.0.0.1 only.
//!
//! A run is several rounds; each measures every subject once, the order
//! rotated by one place per round, so that each subject takes each place and
//! a drift of the machine's speed falls on all of them. A subject's rounds
//! are pooled: req/s over all its requests and time, CPU per request over
//! all its requests, latency percentiles the median of its rounds' (wrk
//! reports percentiles, not histograms).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BoxError;

/// What one run measures.
#[derive(Debug, Clone)]
pub struct LbBenchConfig {
    pub duration: Duration,
    pub warmup: Duration,
    /// Rounds; each measures every subject once (see [`run`]).
    pub rounds: usize,
    pub connections: usize,
    pub wrk_threads: usize,
    /// The `statehouse` binary (built with `--release`).
    pub statehouse: PathBuf,
    /// The `bench-backend` binary.
    pub backend: PathBuf,
    pub out: PathBuf,
    pub command: String,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: nginx's and HAProxy's masters then stop their
        // workers, which a SIGKILL of the master would leave running (and
        // holding our stdout). Already gone is fine.
        let _ = Command::new("kill")
            .arg(self.0.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(port: u16, what: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} is not listening on {addr} after 10 s").into())
}

fn start_backend(binary: &Path) -> Result<(Proc, u16), BoxError> {
    let port = free_port()?;
    let child = Command::new(binary)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let proc = Proc(child);
    wait_listening(port, "bench-backend")?;
    Ok((proc, port))
}

/// One proxy under test: how to start it and the config it ran with.
struct Subject {
    name: &'static str,
    config: String,
    proc: Option<Proc>,
    port: u16,
}

fn statehouse(bin: &Path, dir: &Path, backends: &[u16]) -> Result<Subject, BoxError> {
    let port = free_port()?;
    let admin = free_port()?;
    let mut config = format!(
        "listen = \"127.0.0.1:{port}\"\npolicy = \"round_robin\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
    );
    for (i, p) in backends.iter().enumerate() {
        let _ = write!(
            config,
            "\n[[instances]]\nname = \"b{i}\"\naddr = \"127.0.0.1:{p}\"\n"
        );
    }
    let path = dir.join("statehouse-lb.toml");
    std::fs::write(&path, &config)?;
    let child = Command::new(bin)
        .args(["lb", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let proc = Proc(child);
    wait_listening(port, "statehouse lb")?;
    Ok(Subject {
        name: "statehouse lb",
        config,
        proc: Some(proc),
        port,
    })
}

fn nginx(dir: &Path, backends: &[u16]) -> Result<Subject, BoxError> {
    let port = free_port()?;
    let servers: String = backends
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    let d = dir.display();
    let config = format!(
        "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d};\n  \
         map $http_x_request_id $rid {{ default $http_x_request_id; \"\" $request_id; }}\n  \
         fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n  \
         upstream app {{\n{servers}    keepalive 64;\n  }}\n  \
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://app;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
         proxy_set_header X-Forwarded-Proto $scheme;\n      \
         proxy_set_header X-Request-Id $rid;\n      add_header X-Request-Id $rid;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, &config)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nginx (apt package nginx-light): {e}"))?;
    let proc = Proc(child);
    wait_listening(port, "nginx")?;
    Ok(Subject {
        name: "nginx",
        config,
        proc: Some(proc),
        port,
    })
}

fn haproxy(dir: &Path, backends: &[u16]) -> Result<Subject, BoxError> {
    let port = free_port()?;
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server s{i} 127.0.0.1:{p}\n"))
        .collect();
    let config = format!(
        "global\n  nbthread 2\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 2s\n  \
         timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  option forwardfor\n  \
         http-request set-header X-Forwarded-Proto http\n  \
         unique-id-format %[uuid()]\n  unique-id-header X-Request-Id\n  \
         http-response set-header X-Request-Id %[unique-id]\n  default_backend app\n\n\
         backend app\n  balance roundrobin\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &config)?;
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start haproxy (apt package haproxy): {e}"))?;
    let proc = Proc(child);
    wait_listening(port, "haproxy")?;
    Ok(Subject {
        name: "HAProxy",
        config,
        proc: Some(proc),
        port,
    })
}

/// User and system CPU time per request, µs.
type UserSystem = (f64, f64);

/// Where a run's CPU went, per request: client, proxy and backends share
/// the machine's cores, so a proxy that costs its neighbours more shows here
/// even when its own column does not.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerRequest {
    /// The proxy, summed over its processes; `None` when wrk went straight
    /// to a backend.
    proxy: Option<UserSystem>,
    /// The three backends together.
    backends: UserSystem,
    /// wrk.
    client: UserSystem,
}

impl CpuPerRequest {
    /// Every party's user + system time.
    fn total(&self) -> f64 {
        let (pu, ps) = self.proxy.unwrap_or_default();
        pu + ps + self.backends.0 + self.backends.1 + self.client.0 + self.client.1
    }

    /// Rounds' CPU weighted by their requests; the proxy's only when every
    /// round has it.
    fn pool(rounds: &[WrkResult]) -> CpuPerRequest {
        let per = rounds.iter().map(|r| r.requests).sum::<u64>().max(1) as f64;
        let weighted = |f: &dyn Fn(&CpuPerRequest) -> Option<UserSystem>| {
            rounds.iter().try_fold((0.0, 0.0), |(u, s), r| {
                let (ru, rs) = f(&r.cpu)?;
                let n = r.requests as f64;
                Some((u + ru * n / per, s + rs * n / per))
            })
        };
        CpuPerRequest {
            proxy: weighted(&|c| c.proxy),
            backends: weighted(&|c| Some(c.backends)).unwrap_or_default(),
            client: weighted(&|c| Some(c.client)).unwrap_or_default(),
        }
    }
}

/// "12.2 (3.1 + 9.1)": the total, then user + system, µs.
fn cpu_cell((user, system): UserSystem) -> String {
    format!("{:.1} ({user:.1} + {system:.1})", user + system)
}

/// What wrk reported for one subject.
#[derive(Debug, Clone)]
struct WrkResult {
    rps: f64,
    requests: u64,
    /// The measured time, µs.
    duration_us: u64,
    /// CPU per request of each party over the measured run.
    cpu: CpuPerRequest,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    errors: u64,
}

const WRK_DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("SH_RESULT %d %d %d %d %d %d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

fn wrk(
    script: &Path,
    port: u16,
    threads: usize,
    connections: usize,
    duration: Duration,
) -> Result<WrkResult, BoxError> {
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .arg("-s")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .map_err(|e| format!("cannot run wrk (apt package wrk): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SH_RESULT "))
        .ok_or_else(|| format!("wrk printed no result:\n{stdout}"))?;
    let n: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let [requests, duration_us, errors, p50, p99, p999] = n[..] else {
        return Err(format!("unexpected wrk result line {line:?}").into());
    };
    Ok(WrkResult {
        rps: requests as f64 / (duration_us.max(1) as f64 / 1e6),
        requests,
        duration_us,
        cpu: CpuPerRequest::default(),
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        errors,
    })
}

impl WrkResult {
    /// One subject's rounds as one result: req/s over all requests and
    /// time, CPU per request over all requests, each percentile the median
    /// of the rounds' (the upper one of an even count).
    fn pool(rounds: &[WrkResult]) -> Option<WrkResult> {
        let requests: u64 = rounds.iter().map(|r| r.requests).sum();
        let duration_us: u64 = rounds.iter().map(|r| r.duration_us).sum();
        let median = |f: fn(&WrkResult) -> u64| {
            let mut v: Vec<u64> = rounds.iter().map(f).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied()
        };
        Some(WrkResult {
            rps: requests as f64 / (duration_us.max(1) as f64 / 1e6),
            requests,
            duration_us,
            cpu: CpuPerRequest::pool(rounds),
            p50_us: median(|r| r.p50_us)?,
            p99_us: median(|r| r.p99_us)?,
            p999_us: median(|r| r.p999_us)?,
            errors: rounds.iter().map(|r| r.errors).sum(),
        })
    }

    /// The row's cells, shared by the terminal and the Markdown tables:
    /// req/s, p50, p99, p99.9, errors, then CPU per request (µs, as "total
    /// (user + system)") of the proxy (a dash without one), the backends and
    /// wrk, and the total of all of them.
    fn cells(&self) -> [String; 9] {
        [
            format!("{:.0}", self.rps),
            self.p50_us.to_string(),
            self.p99_us.to_string(),
            self.p999_us.to_string(),
            self.errors.to_string(),
            self.cpu.proxy.map_or_else(|| "—".to_owned(), cpu_cell),
            cpu_cell(self.cpu.backends),
            cpu_cell(self.cpu.client),
            format!("{:.1}", self.cpu.total()),
        ]
    }
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("unknown")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "not found".to_owned())
}

/// Starts one subject (or points at the backend directly).
type Starter<'a> = Box<dyn Fn() -> Result<Subject, BoxError> + 'a>;

/// Runs every subject and writes the report.
pub async fn run(config: LbBenchConfig) -> Result<(), BoxError> {
    let machine = crate::machine::describe().await;
    let load_before = crate::machine::load_average();
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("done.lua");
    std::fs::write(&script, WRK_DONE)?;

    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(start_backend(&config.backend)?);
    }
    let ports: Vec<u16> = backends.iter().map(|(_, p)| *p).collect();
    let backend_pids: Vec<u32> = backends.iter().map(|(p, _)| p.0.id()).collect();

    println!(
        "wrk -t{} -c{} -d{}s, after a {}s warm-up, against each of:",
        config.wrk_threads,
        config.connections,
        config.duration.as_secs(),
        config.warmup.as_secs()
    );
    let starts: [Starter<'_>; 4] = [
        Box::new(|| {
            Ok(Subject {
                name: "direct to one backend",
                config: String::new(),
                proc: None,
                port: ports[0],
            })
        }),
        Box::new(|| statehouse(&config.statehouse, dir.path(), &ports)),
        Box::new(|| nginx(dir.path(), &ports)),
        Box::new(|| haproxy(dir.path(), &ports)),
    ];
    // Per subject, in `starts`' order: its name, configuration and rounds.
    let mut measured: Vec<(&'static str, String, Vec<WrkResult>)> =
        vec![("", String::new(), Vec::new()); starts.len()];
    for round in 0..config.rounds {
        println!("round {} of {}", round + 1, config.rounds);
        for offset in 0..starts.len() {
            let index = (round + offset) % starts.len();
            let (name, cfg, r) = measure(&starts[index], &config, &script, &backend_pids)?;
            let entry = &mut measured[index];
            (entry.0, entry.1) = (name, cfg);
            entry.2.push(r);
        }
    }
    drop(backends);

    let mut results = Vec::new();
    println!("\npooled over {} rounds:", config.rounds);
    for (name, cfg, rounds) in &measured {
        let pooled = WrkResult::pool(rounds).ok_or("a subject with no round")?;
        print_row(name, &pooled);
        results.push((*name, cfg.clone(), pooled));
    }
    let report = render(&config, &machine, &load_before, &results, &measured);
    std::fs::write(&config.out, report)?;
    println!("\nwrote {}", config.out.display());
    Ok(())
}

fn print_row(name: &str, r: &WrkResult) {
    let [rps, p50, p99, p999, errors, proxy, backends, client, total] = r.cells();
    println!(
        "  {name:<24} {rps:>9} req/s  p50 {p50:>6} µs  p99 {p99:>6} µs  p99.9 {p999:>6} µs  errors {errors}\n  \
         {:<24} CPU µs/request: proxy {proxy}, backends {backends}, wrk {client}, all {total}",
        ""
    );
}

/// Starts one subject, warms it up, measures it and stops it.
fn measure(
    start: &Starter<'_>,
    config: &LbBenchConfig,
    script: &Path,
    backend_pids: &[u32],
) -> Result<(&'static str, String, WrkResult), BoxError> {
    let subject = start()?;
    // Warm-up: connections, pools and caches, not recorded.
    wrk(
        script,
        subject.port,
        config.wrk_threads,
        config.connections,
        config.warmup,
    )?;
    let tree = subject
        .proc
        .as_ref()
        .map(|p| crate::machine::process_tree(p.0.id()));
    let before = tree.as_deref().map(crate::machine::cpu_ticks_of);
    let backends_before = crate::machine::cpu_ticks_of(backend_pids);
    let client_before = crate::machine::reaped_children_cpu_ticks();
    let mut r = wrk(
        script,
        subject.port,
        config.wrk_threads,
        config.connections,
        config.duration,
    )?;
    let per_request = |(user, system): (u64, u64), (u, s): (u64, u64)| {
        (
            crate::machine::cpu_us_per(u.saturating_sub(user), r.requests),
            crate::machine::cpu_us_per(s.saturating_sub(system), r.requests),
        )
    };
    r.cpu = CpuPerRequest {
        proxy: tree
            .as_deref()
            .zip(before)
            .map(|(tree, before)| per_request(before, crate::machine::cpu_ticks_of(tree))),
        backends: per_request(backends_before, crate::machine::cpu_ticks_of(backend_pids)),
        client: per_request(client_before, crate::machine::reaped_children_cpu_ticks()),
    };
    print_row(subject.name, &r);
    Ok((subject.name, subject.config.clone(), r))
}

fn render(
    config: &LbBenchConfig,
    machine: &[(&'static str, String)],
    load_before: &str,
    results: &[(&'static str, String, WrkResult)],
    rounds: &[(&'static str, String, Vec<WrkResult>)],
) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(md, "# statehouse lb vs nginx vs HAProxy\n");
    let _ = writeln!(
        md,
        "Produced by `bench/src/bin/lb_bench.rs`, run as:\n\n```sh\n{}\n```\n",
        config.command
    );
    let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
    // The tokio row describes a benchmark's own client; here wrk is the client.
    for (what, value) in machine.iter().filter(|(what, _)| *what != "tokio") {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    let _ = writeln!(md, "| nginx | {} |", version("nginx", &["-v"]));
    let _ = writeln!(md, "| HAProxy | {} |", version("haproxy", &["-v"]));
    let _ = writeln!(md, "| wrk | {} |", version("wrk", &["-v"]));
    let _ = writeln!(
        md,
        "| load average at start / end | {load_before} / {} |\n",
        crate::machine::load_average()
    );
    let _ = writeln!(
        md,
        "## Method\n\nThree `bench-backend` processes (axum, one thread each) answer `200 ok`. In front of them, one at a time: nothing (wrk straight at one backend: the ceiling), `statehouse lb`, nginx, HAProxy, each with round robin, upstream keep-alive and two workers/threads (the machine has two cores; statehouse runs tokio's default one worker per core), and each doing to the traffic what statehouse lb does by default: `X-Forwarded-For`, `X-Forwarded-Proto` and an `X-Request-Id` (32 hex digits; HAProxy's a 36-character UUID) added to the request, and the id returned on the response. `wrk -t{} -c{} -d{}s` after a {}s warm-up, from the same machine; latencies from wrk's HDR histogram (µs); CPU time per request over the measured run (user + system, from /proc) of the proxy (summed over its processes), the three backends and wrk, and of all of them: they share the cores, so what a proxy costs its neighbours shows too. Client, proxy and backends share the two cores. {} rounds, each measuring every subject once on freshly started processes, the order rotated by one place per round; a subject's rounds are pooled: req/s over all its requests and time, CPU per request over all its requests, each latency percentile the median of its rounds'.\n",
        config.wrk_threads,
        config.connections,
        config.duration.as_secs(),
        config.warmup.as_secs(),
        config.rounds
    );
    let _ = writeln!(
        md,
        "## Results\n\nLatencies in µs; CPU time in µs per request, as \"total (user + system)\".\n\n| subject | req/s | p50 | p99 | p99.9 | errors | CPU: proxy | backends | wrk | all |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for (name, _, r) in results {
        let [rps, p50, p99, p999, errors, proxy, backends, client, total] = r.cells();
        let _ = writeln!(
            md,
            "| {name} | {rps} | {p50} | {p99} | {p999} | {errors} | {proxy} | {backends} | {client} | {total} |"
        );
    }
    let find = |n: &str| results.iter().find(|(name, _, _)| *name == n).map(|r| &r.2);
    if let Some(ours) = find("statehouse lb") {
        let _ = writeln!(md);
        for peer in ["nginx", "HAProxy"] {
            if let Some(theirs) = find(peer) {
                let _ = writeln!(
                    md,
                    "- statehouse lb vs {peer}: {:.2}× the req/s; p99 {} µs vs {} µs ({:.2}×)",
                    ours.rps / theirs.rps.max(1.0),
                    ours.p99_us,
                    theirs.p99_us,
                    ours.p99_us as f64 / theirs.p99_us.max(1) as f64
                );
            }
        }
    }
    let round_rps = |name: &str| {
        rounds
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, r)| r.iter().map(|r| r.rps).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let (ours, nginx, haproxy) = (
        round_rps("statehouse lb"),
        round_rps("nginx"),
        round_rps("HAProxy"),
    );
    let _ = writeln!(
        md,
        "\n### Round by round\n\nThe order of the subjects rotates by one place per round.\n\n| round | statehouse lb req/s | nginx req/s | HAProxy req/s | lb / nginx | lb / HAProxy |\n|---|---|---|---|---|---|"
    );
    for (i, ((o, n), h)) in ours.iter().zip(&nginx).zip(&haproxy).enumerate() {
        let _ = writeln!(
            md,
            "| {} | {o:.0} | {n:.0} | {h:.0} | {:.2}× | {:.2}× |",
            i + 1,
            o / n.max(1.0),
            o / h.max(1.0)
        );
    }
    let _ = writeln!(md, "\n## Configurations (as run; ports vary per run)\n");
    for (name, cfg, _) in results {
        if !cfg.is_empty() {
            let _ = writeln!(md, "### {name}\n\n```\n{cfg}```\n");
        }
    }
    md
}
