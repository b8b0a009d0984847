//! A private six-node Redis Cluster (three masters, one replica each) on free loopback ports.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process;
use crate::redis::{self, PORT_ATTEMPTS, RedisServer};
use crate::resp::{self, Reply};
use crate::sys;

const NODES: usize = 6;
const SLOTS: u32 = 16384;
/// Creating the cluster includes gossip convergence and replica sync.
const FORM_WITHIN: Duration = Duration::from_secs(30);
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);
/// Resharding from a test may move many keys.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// Six `redis-server`s with `cluster-enabled yes`, joined by `redis-cli --cluster create` with one
/// replica per master.
///
/// Nodes use `cluster-node-timeout 2000` so failover tests finish in seconds, and
/// `cluster-replica-validity-factor 0` so a replica always takes over from a killed master no matter
/// how long its link was down. Every node keeps its `nodes.conf` in its own directory, so a restarted
/// node rejoins with its old identity (its data is gone: there is no persistence).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    cli: PathBuf,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster, and waits until it is healthy (see
    /// [`Self::wait_healthy`]).
    pub fn start() -> Result<Self> {
        let binary = redis::redis_server_binary()?;
        let cli = redis::redis_cli_binary()?;
        let mut attempt = 1;
        'attempts: loop {
            let ports = sys::free_cluster_ports(NODES)?;
            let mut nodes = Vec::with_capacity(NODES);
            for port in ports {
                let mut node = RedisServer::stopped(binary.clone(), port, node_args())?;
                match node.spawn() {
                    Ok(()) => nodes.push(node),
                    // A lost port race: drop (and so kill) the nodes started so far, start over.
                    Err(failure) if failure.retryable && attempt < PORT_ATTEMPTS => {
                        tracing::debug!(error = %failure.error, "cluster node lost a port race, choosing new ports");
                        attempt += 1;
                        continue 'attempts;
                    }
                    Err(failure) => return Err(*failure.error),
                }
            }
            let cluster = RedisCluster { nodes, cli };
            cluster.create()?;
            cluster.wait_healthy(FORM_WITHIN)?;
            return Ok(cluster);
        }
    }

    fn create(&self) -> Result<()> {
        let mut command = Command::new(&self.cli);
        command.args(["--cluster", "create"]);
        command.args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        command.args(["--cluster-replicas", "1", "--cluster-yes"]);
        process::run_checked(command, FORM_WITHIN).map(drop)
    }

    /// `redis://127.0.0.1:PORT` of all six nodes, in node-index order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The number of nodes (six).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node with index `i`, e.g. for its address, pid or directory.
    ///
    /// # Panics
    /// If `i >= node_count()`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Indices of the running nodes that currently answer `ROLE` with `master`, asked live.
    ///
    /// Right after a killed master's replica took over, the restarted old master may call itself
    /// master for a moment until gossip demotes it; [`Self::wait_healthy`] does not wait for that.
    pub fn master_indices(&self) -> Vec<usize> {
        self.running()
            .filter(|(_, node)| {
                matches!(
                    resp::command(node.addr(), &["ROLE"], QUERY_TIMEOUT),
                    Ok(Reply::Array(Some(fields)))
                        if fields.first().and_then(Reply::text).as_deref() == Some("master")
                )
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// SIGKILLs node `i` and waits until it has exited.
    ///
    /// # Panics
    /// If `i >= node_count()`.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port with its `nodes.conf`, waiting until it answers PING (not
    /// until it has rejoined: use [`Self::wait_healthy`] for that).
    ///
    /// # Panics
    /// If `i >= node_count()`.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart()
    }

    /// Waits until the cluster is healthy as seen from every running node: `CLUSTER INFO` says
    /// `cluster_state:ok` with all 16384 slots assigned and ok and all six nodes known, and
    /// `CLUSTER NODES` shows every slot-owning master as one of the kit's *running* nodes, not
    /// flagged failed.
    ///
    /// The last condition makes this useful right after [`Self::kill_node`]: for the first
    /// `cluster-node-timeout` the survivors still report `ok`, but the dead master still owns
    /// slots, so this waits until a replica has taken them over.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problem = match self.health_problem() {
                None => return Ok(()),
                Some(problem) => problem,
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for the redis cluster on ports {:?} to become healthy",
                        self.nodes.iter().map(RedisServer::port).collect::<Vec<_>>()
                    ),
                    after: timeout,
                    last: problem,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `None` when healthy, else the first problem found.
    fn health_problem(&self) -> Option<String> {
        let index_by_port: HashMap<u16, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.port(), i))
            .collect();
        let mut any_running = false;
        for (i, node) in self.running() {
            any_running = true;
            let addr = node.addr();
            let info = match resp::text_command(addr, &["CLUSTER", "INFO"], QUERY_TIMEOUT) {
                Ok(info) => info,
                Err(e) => return Some(format!("node {i}: {e}")),
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
                    .unwrap_or("?")
                    .to_string()
            };
            let expected = [
                ("cluster_state", "ok".to_string()),
                ("cluster_slots_assigned", SLOTS.to_string()),
                ("cluster_slots_ok", SLOTS.to_string()),
                ("cluster_known_nodes", self.nodes.len().to_string()),
            ];
            for (name, want) in expected {
                let got = field(name);
                if got != want {
                    return Some(format!("node {i} ({addr}): {name} is {got}, want {want}"));
                }
            }

            let nodes = match resp::text_command(addr, &["CLUSTER", "NODES"], QUERY_TIMEOUT) {
                Ok(nodes) => nodes,
                Err(e) => return Some(format!("node {i}: {e}")),
            };
            // Line: <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
            for line in nodes.lines() {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(endpoint), Some(flags)) = (cols.get(1), cols.get(2)) else {
                    continue;
                };
                let owns_slots = cols.len() > 8;
                if !flags.contains("master") || !owns_slots {
                    continue;
                }
                let port = endpoint
                    .split(['@', ','])
                    .next()
                    .and_then(|hp| hp.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                let owner = port.and_then(|p| index_by_port.get(&p).copied());
                match owner {
                    Some(o) if !self.nodes[o].is_running() => {
                        return Some(format!(
                            "node {i} sees killed node {o} still owning slots (failover pending)"
                        ));
                    }
                    Some(o) if flags.contains("fail") => {
                        return Some(format!("node {i} flags master node {o} as {flags}"));
                    }
                    Some(_) => {}
                    None => return Some(format!("node {i} lists unknown master {endpoint}")),
                }
            }
        }
        (!any_running).then(|| "no node is running".to_string())
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT ARGS...` against node 0 (or, if node 0 is not
    /// running, the first node that is) and returns its stdout. Fails if redis-cli exits non-zero;
    /// note that redis-cli may print a command's error reply and still exit 0.
    pub fn redis_cli(&self, args: &[&str]) -> Result<String> {
        let (_, node) = self.running().next().ok_or_else(|| {
            Error::InvalidArgument("redis_cli: no cluster node is running".into())
        })?;
        let mut command = Command::new(&self.cli);
        command
            .args(["-h", "127.0.0.1", "-p"])
            .arg(node.port().to_string())
            .args(args);
        process::run_checked(command, CLI_TIMEOUT)
    }

    fn running(&self) -> impl Iterator<Item = (usize, &RedisServer)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_running())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Each node kills itself on drop too; stopping all six first just means none of them
        // spends its last moments reacting to the others going away.
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

fn node_args() -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        // Relative to the node's `--dir`, i.e. its own temp directory.
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
        "--cluster-replica-validity-factor",
        "0",
    ]
    .map(String::from)
    .to_vec()
}
