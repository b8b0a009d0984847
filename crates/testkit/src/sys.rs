//! Small facts about the machine, read from `/proc`, `/etc/passwd` and `PATH` rather than through
//! libc, so that the crate's only unsafe code stays the PDEATHSIG hook.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use tempfile::TempDir;

use crate::error::{Error, Result};

/// Ports the kit never hands out, even if free: the standard ports of the servers it runs (and
/// their cluster-bus / monitoring neighbours). The machine may run system services there, and a
/// test must never talk to those by accident.
const RESERVED_PORTS: &[u16] = &[4222, 5432, 6222, 6379, 6380, 8222, 16379];

/// The effective uid of this process, from `/proc/self/status` (`Uid: real effective saved fs`).
pub(crate) fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(Error::io("reading /proc/self/status for the effective uid"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| Error::Io {
            what: "parsing the Uid line of /proc/self/status".into(),
            source: std::io::Error::other("no effective uid found"),
        })
}

/// The uid and gid of a system user, from `/etc/passwd`.
pub(crate) fn user_ids(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(Error::io(format!(
        "reading /etc/passwd to find user `{name}`"
    )))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| Error::Io {
            what: format!("looking up user `{name}` in /etc/passwd"),
            source: std::io::Error::other(
                "no such user; it comes with the `postgresql` apt package",
            ),
        })
}

/// Whether `pid` is a live process. A zombie counts as dead: it no longer runs or holds ports, and
/// when it is not our child nobody may ever reap it (PID 1 in some containers does not).
pub(crate) fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// Live processes whose parent is `pid`, from `/proc/*/stat`.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // After the parenthesised command name: state, then the parent pid.
            let mut after_name = stat[stat.rfind(')')? + 1..].split_whitespace();
            let parent: u32 = after_name.nth(1)?.parse().ok()?;
            (parent == pid).then_some(child)
        })
        .collect()
}

/// Whether the TCP socket listening on `127.0.0.1:port` belongs to `pid`; `None` when this
/// kernel does not tell (no `/proc/net/tcp`).
///
/// A readiness probe alone cannot tell our server from a stranger that won the race for a port we
/// had just released; the listening socket's inode settles it.
pub(crate) fn listens_on(pid: u32, port: u16) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
    // Addresses are hex `IP:PORT`; state 0A is LISTEN.
    let inodes: HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = cols.get(1)?.split_once(':')?;
            let listening = *cols.get(3)? == "0A";
            let ours = u16::from_str_radix(local_port, 16).ok()? == port;
            (listening && ours).then(|| cols.get(9).map(|s| s.to_string()))?
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Some(false);
    };
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .is_some_and(|inode| inodes.contains(inode))
        })
    }))
}

/// A free loopback port: bind port 0, read what the kernel chose, release it.
///
/// Releasing before the server binds leaves a window for a race; callers retry with a new port
/// when the server reports "address already in use".
pub(crate) fn free_port() -> Result<u16> {
    loop {
        let port = bind_loopback(0)?
            .local_addr()
            .map_err(Error::io("reading the port of a fresh loopback listener"))?
            .port();
        if !RESERVED_PORTS.contains(&port) {
            return Ok(port);
        }
    }
}

/// `count` distinct free ports `p` for Redis Cluster nodes, each with its bus port `p + 10000` free
/// too (and below 65536). All of them are held until the whole set is chosen, so the set has no
/// duplicates and no node's port is another node's bus port.
pub(crate) fn free_cluster_ports(count: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == count {
            return Ok(ports);
        }
        let listener = bind_loopback(0)?;
        let port = listener
            .local_addr()
            .map_err(Error::io("reading the port of a fresh loopback listener"))?
            .port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        if RESERVED_PORTS.contains(&port) || RESERVED_PORTS.contains(&bus) {
            continue;
        }
        let Ok(bus_listener) = bind_loopback(bus) else {
            continue;
        };
        held.push(listener);
        held.push(bus_listener);
        ports.push(port);
    }
    Err(Error::Io {
        what: format!("finding {count} free loopback port pairs (p, p+10000) for a Redis Cluster"),
        source: std::io::Error::other("too many attempts"),
    })
}

fn bind_loopback(port: u16) -> Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(Error::io(format!("binding 127.0.0.1:{port}")))
}

/// A private temp directory for one server, under `$TMPDIR/statehouse-testkit/`.
///
/// Directories are named `{kind}-{pid}-{random}`. Servers held in `static`s are never dropped, so
/// their directories outlive the test process; the first call in each process removes those left
/// by processes that no longer exist.
pub(crate) fn server_dir(kind: &str) -> Result<TempDir> {
    let base = std::env::temp_dir().join("statehouse-testkit");
    std::fs::create_dir_all(&base).map_err(Error::io(format!("creating {}", base.display())))?;
    // Traversable by everyone: Postgres runs as the `postgres` user and must reach its own
    // directory inside. Failing to change it (someone else's dir) only matters in that case.
    let _ = std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755));

    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| sweep_leftovers(&base));

    tempfile::Builder::new()
        .prefix(&format!("{kind}-{}-", std::process::id()))
        .tempdir_in(&base)
        .map_err(Error::io(format!(
            "creating a temp dir for {kind} in {}",
            base.display()
        )))
}

fn sweep_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|name| name.split('-').nth(1))
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && !is_alive(pid)
        {
            // Best effort: a directory we cannot remove is only wasted space.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// An executable called `name` on `PATH` or in one of `extra_dirs`.
pub(crate) fn find_binary(
    name: &str,
    extra_dirs: &[&str],
    apt_package: &'static str,
) -> Result<PathBuf> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let dirs: Vec<PathBuf> = path_dirs
        .into_iter()
        .chain(extra_dirs.iter().map(PathBuf::from))
        .collect();
    dirs.iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| Error::BinaryNotFound {
            binary: name.to_string(),
            looked: format!("PATH and {extra_dirs:?}"),
            apt_package,
        })
}

pub(crate) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
