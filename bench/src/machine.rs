//! The description of the machine and software a result was measured on, for the report's header:
//! numbers from a benchmark mean little without it.

use tokio::process::Command;

/// `(what, description)` pairs, in display order. Anything that cannot be found reads `unknown`.
pub(crate) async fn describe() -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    vec![
        (
            "date",
            output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).await,
        ),
        ("nproc", output("nproc", &[]).await),
        ("CPU", cpu_model(&cpuinfo)),
        ("memory", mem_total(&meminfo)),
        ("kernel", output("uname", &["-r"]).await),
        ("rustc", env!("STATEHOUSE_BENCH_RUSTC").to_owned()),
        (
            "tokio",
            format!(
                "multi-thread runtime, {} worker threads",
                tokio::runtime::Handle::current().metrics().num_workers()
            ),
        ),
        ("redis-server", output("redis-server", &["--version"]).await),
        (
            "redis-benchmark",
            output("redis-benchmark", &["--version"]).await,
        ),
        ("git", git_revision().await),
    ]
}

/// The 1, 5 and 15 minute load averages, e.g. `0.52 0.31 0.20`. On a machine shared with other
/// work (builds, tests), this is what tells a reader whether the numbers were measured in quiet.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|load| !load.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The first line of a command's standard output, or `unknown`.
/// The fields of `/proc/{pid}/stat` after the command name (which may hold
/// spaces): the state first, the parent pid second, utime and stime 12th
/// and 13th.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.get(text.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User and system CPU time of a process (`"self"` or a pid), in clock
/// ticks (USER_HZ, 100 a second on Linux); zeros when it is gone.
pub(crate) fn cpu_ticks_split(pid: &str) -> (u64, u64) {
    tick_pair(pid, 11)
}

/// User and system CPU time of this process's children that have exited and
/// been waited for (a `Command::output()`'s, say), in clock ticks.
pub(crate) fn reaped_children_cpu_ticks() -> (u64, u64) {
    tick_pair("self", 13)
}

/// Two adjacent tick counts of `/proc/{pid}/stat` (see [`stat_fields`]):
/// utime and stime at 11, the waited-for children's at 13; zeros when the
/// process is gone.
fn tick_pair(pid: &str, at: usize) -> (u64, u64) {
    stat_fields(pid)
        .and_then(|f| Some((f.get(at)?.parse().ok()?, f.get(at + 1)?.parse().ok()?)))
        .unwrap_or((0, 0))
}

/// User and system CPU time of several processes together, in clock ticks.
pub(crate) fn cpu_ticks_of(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .map(|pid| cpu_ticks_split(&pid.to_string()))
        .fold((0, 0), |(u, s), (du, ds)| (u + du, s + ds))
}

/// User + system CPU time of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: &str) -> u64 {
    let (user, system) = cpu_ticks_split(pid);
    user + system
}

/// `pid` and every process under it (nginx's workers are its master's
/// children).
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let name = child.to_string();
            if let Some(parent) = stat_fields(&name).and_then(|f| f.get(1)?.parse().ok()) {
                parents.push((child, parent));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let at = tree[i];
        tree.extend(parents.iter().filter(|(_, p)| *p == at).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Microseconds of CPU per unit of work, from clock ticks.
pub(crate) fn cpu_us_per(ticks: u64, work: u64) -> f64 {
    if work == 0 {
        return 0.0;
    }
    ticks as f64 * 10_000.0 / work as f64
}

async fn output(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output().await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        _ => "unknown".to_owned(),
    }
}

async fn git_revision() -> String {
    let revision = output("git", &["rev-parse", "--short", "HEAD"]).await;
    let dirty = Command::new("git")
        .args(["status", "--porcelain"])
        .output()
        .await
        .is_ok_and(|out| out.status.success() && !out.stdout.is_empty());
    if dirty {
        format!("{revision} (with uncommitted changes)")
    } else {
        revision
    }
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn mem_total(meminfo: &str) -> String {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_cpu_of_reaped_children() {
        let before = reaped_children_cpu_ticks();
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let (user, system) = reaped_children_cpu_ticks();
        assert!(
            user + system > before.0 + before.1,
            "a busy child's CPU time is counted once it is reaped: {before:?} -> {:?}",
            (user, system)
        );
    }

    #[test]
    fn reads_proc_files() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(cpu_model(cpuinfo), "Intel(R) Xeon(R) CPU @ 2.20GHz");
        assert_eq!(cpu_model(""), "unknown");
        assert_eq!(
            mem_total("MemTotal:       24683520 kB\nMemFree: 1 kB\n"),
            "23.5 GiB"
        );
    }
}
