//! The results: a text line per row on stdout as each finishes, and the same as Markdown in the
//! result file, grouped by operation so each peer sits next to what it is compared with.

use std::fmt::Write as _;
use std::path::Path;

use crate::driver::Sample;
use crate::redis_benchmark::PeerResult;
use crate::{BoxError, Config, Op};

pub(crate) const REDIS_BENCHMARK_GET: &str = "redis-benchmark GET";
pub(crate) const REDIS_BENCHMARK_SET: &str = "redis-benchmark SET";
pub(crate) const RAW_SQLX: &str = "raw sqlx SELECT (postgres)";

/// The goal from the product brief: a Redis-backed read adds at most 10% over one GET round trip
/// of redis-benchmark.
const REDIS_GET_GOAL: f64 = 1.10;

/// One measured cell.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// The table the row belongs in.
    op: Op,
    /// A backend label or a peer label.
    subject: &'static str,
    concurrency: usize,
    ops_per_sec: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    notes: String,
}

impl Row {
    pub(crate) fn from_sample(
        op: Op,
        subject: &'static str,
        concurrency: usize,
        sample: &Sample,
    ) -> Self {
        let mut notes = Vec::new();
        if sample.conflicts > 0 {
            notes.push(format!("{} conflicts", sample.conflicts));
        }
        if sample.errors > 0 {
            notes.push(format!(
                "{} errors, first: {}",
                sample.errors,
                sample.first_error.as_deref().unwrap_or("?")
            ));
        }
        Row {
            op,
            subject,
            concurrency,
            ops_per_sec: sample.ops_per_sec(),
            p50_us: sample.micros_at(0.50),
            p99_us: sample.micros_at(0.99),
            p999_us: sample.micros_at(0.999),
            notes: notes.join("; "),
        }
    }

    pub(crate) fn from_redis_benchmark(
        op: Op,
        subject: &'static str,
        concurrency: usize,
        result: &PeerResult,
    ) -> Self {
        Row {
            op,
            subject,
            concurrency,
            ops_per_sec: result.rps,
            p50_us: result.p50_us,
            p99_us: result.p99_us,
            // redis-benchmark reports no p99.9.
            p999_us: None,
            notes: format!("-n {}", result.requests),
        }
    }

    pub(crate) fn text_header() -> String {
        format!(
            "{:<10} {:<28} {:>5} {:>11} {:>9} {:>9} {:>9}  notes",
            "op", "backend / peer", "tasks", "ops/s", "p50 µs", "p99 µs", "p99.9 µs"
        )
    }

    /// The columns known before measuring.
    pub(crate) fn text_start(op: Op, subject: &str, concurrency: usize) -> String {
        format!("{:<10} {:<28} {:>5} ", op.label(), subject, concurrency)
    }

    /// The measured columns.
    pub(crate) fn text_end(&self) -> String {
        format!(
            "{:>11} {:>9} {:>9} {:>9}  {}",
            format_rate(self.ops_per_sec),
            format_micros(self.p50_us),
            format_micros(self.p99_us),
            format_micros(self.p999_us),
            self.notes
        )
    }

    fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.subject,
            self.concurrency,
            format_rate(self.ops_per_sec),
            format_micros(self.p50_us),
            format_micros(self.p99_us),
            format_micros(self.p999_us),
            self.notes.replace('|', "\\|")
        )
    }
}

/// Everything a run measured, with what it was measured on.
#[derive(Debug)]
pub(crate) struct Report {
    machine: Vec<(&'static str, String)>,
    config: Config,
    rows: Vec<Row>,
    /// Per backend: the load average when it started and when it was done.
    loads: Vec<(&'static str, String, String)>,
}

impl Report {
    pub(crate) fn new(config: &Config, machine: Vec<(&'static str, String)>) -> Self {
        Report {
            machine,
            config: config.clone(),
            rows: Vec::new(),
            loads: Vec::new(),
        }
    }

    /// Recorded once Postgres runs: the version of the server actually measured.
    pub(crate) fn set_postgres_version(&mut self, version: String) {
        self.machine.push(("postgres", version));
    }

    pub(crate) fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub(crate) fn push_load(&mut self, backend: &'static str, before: String, after: String) {
        self.loads.push((backend, before, after));
    }

    pub(crate) fn machine_summary(&self) -> String {
        let mut out = format!("$ {}\n", self.config.command);
        for (what, value) in &self.machine {
            let _ = writeln!(out, "{what:>15}: {value}");
        }
        out
    }

    /// One line per concurrency for each store/peer pair that was measured.
    pub(crate) fn comparisons(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for &concurrency in &self.config.concurrency {
            let redis = self.find(Op::Get, "redis", concurrency);
            let peer = self.find(Op::Get, REDIS_BENCHMARK_GET, concurrency);
            if let (Some(store), Some(peer)) = (redis, peer) {
                let verdict = match ratio(store.p50_us, peer.p50_us) {
                    Some(r) if r <= REDIS_GET_GOAL => " (within the 10% goal)",
                    Some(_) => " (misses the 10% goal)",
                    None => "",
                };
                lines.push(format!(
                    "{}: Redis `get` {}{verdict}",
                    tasks(concurrency),
                    compare(store, peer, "redis-benchmark GET")
                ));
            }
        }
        for &concurrency in &self.config.concurrency {
            let postgres = self.find(Op::Get, "postgres", concurrency);
            let peer = self.find(Op::Get, RAW_SQLX, concurrency);
            if let (Some(store), Some(peer)) = (postgres, peer) {
                lines.push(format!(
                    "{}: Postgres `get` {}",
                    tasks(concurrency),
                    compare(store, peer, "a raw sqlx SELECT")
                ));
            }
        }
        lines
    }

    fn find(&self, op: Op, subject: &str, concurrency: usize) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.op == op && r.subject == subject && r.concurrency == concurrency)
    }

    pub(crate) fn write(&self, path: &Path) -> Result<(), BoxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.markdown())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(())
    }

    fn markdown(&self) -> String {
        let config = &self.config;
        let mut md = String::new();
        // `writeln!` into a String cannot fail.
        let _ = writeln!(md, "# statehouse-store benchmark\n");
        let _ = writeln!(md, "Produced by `bench/src/bin/store_bench.rs`, run as:\n");
        let _ = writeln!(md, "```sh\n{}\n```\n", config.command);

        let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
        for (what, value) in &self.machine {
            let _ = writeln!(md, "| {what} | {value} |");
        }

        if !self.loads.is_empty() {
            let _ = writeln!(
                md,
                "\nLoad average (1/5/15 min) when each backend started → when it was done. The \
                 benchmark alone keeps about as many threads runnable as there are cores; a \
                 clearly higher figure means other work on the machine competed for them:\n"
            );
            for (backend, before, after) in &self.loads {
                let _ = writeln!(md, "- {backend}: {before} → {after}");
            }
        }

        let _ = writeln!(md, "\n## Method\n");
        let _ = writeln!(
            md,
            "- **Closed loop**: for each backend × operation × concurrency, that many tokio tasks \
             each send their next call as soon as the previous one answered, for {} of warm-up \
             (not recorded) and then {} measured. Every successful call's latency goes into an HDR \
             histogram (nanoseconds, 3 significant digits); the tasks' histograms are merged. \
             ops/s = successful calls in the measured window / its length.",
            humanize(config.warmup),
            humanize(config.duration),
        );
        let _ = writeln!(
            md,
            "- **Operations**: `get` of an existing 64-byte value; `map_read` of a map of 8 fields \
             of 64 bytes; `map_patch` setting one 64-byte field with `Existence::MustExist`; `put` \
             of 64 bytes with `Condition::IfVersion` of the version the task wrote last. Each task \
             has keys of its own, so no call waits on another task's row lock or version and \
             conflicts stay at 0 (a conflict would be counted under notes, not timed)."
        );
        let _ = writeln!(
            md,
            "- **The store as an application uses it**: `StoreConfig::new(url)` defaults, so \
             every call goes through key prefixing, size checks, the 1 s per-call timeout and the \
             circuit breaker. The Redis backend shares one multiplexed connection \
             (redis-rs `ConnectionManager`) between all tasks; the Postgres backend has a pool of \
             16 connections, SQLite a pool of 8."
        );
        let _ = writeln!(
            md,
            "- **Peers, in the same run, on the same servers**: `redis-benchmark -t SET|GET -d 64 \
             -c <tasks> -P 1 --csv` on the standalone Redis (SET first, so GET reads an existing \
             64-byte value; `-n` sized from a short probe run to last about {}); and `SELECT value \
             FROM bench_kv WHERE key = $1` through a sqlx `PgPool` with the store's pool settings \
             (16 connections, no ping before use) on a 4096-row table, driven by the same \
             closed loop as the store. Each peer runs right after the store's cell it is compared \
             with, so both see the same machine.",
            humanize(config.duration)
        );
        let _ = writeln!(
            md,
            "- **Caveats**: client and servers share this machine's cores. The store's client is \
             a tokio multi-thread runtime (see the worker threads above) competing for them with \
             the server; redis-benchmark is a single-threaded C client with its own event loop \
             and one connection per client, and reports no p99.9. Above one task the two Redis \
             clients do not do the same thing: redis-benchmark's clients each wait for their own \
             reply (`-P 1`), while the store's tasks share one connection, so their requests \
             travel and are answered in batches (implicit pipelining) — compare p50 latencies at \
             1 task for the cost of one round trip, and read the throughput ratio above 1 task \
             with that in mind. Latencies include time a ready task waits for a runtime thread, \
             as an application's would. Absolute numbers are for this machine only."
        );

        let _ = writeln!(md, "\n## Results\n");
        for op in [Op::Get, Op::MapRead, Op::MapPatch, Op::Put] {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.op == op).collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(md, "### {}\n", op.label());
            let _ = writeln!(
                md,
                "| backend / peer | tasks | ops/s | p50 µs | p99 µs | p99.9 µs | notes |\n\
                 |---|--:|--:|--:|--:|--:|---|"
            );
            for row in rows {
                let _ = writeln!(md, "{}", row.markdown());
            }
            let _ = writeln!(md);
        }

        let comparisons = self.comparisons();
        if !comparisons.is_empty() {
            let _ = writeln!(md, "## Comparisons\n");
            let _ = writeln!(
                md,
                "Goal (product brief): the Redis backend's `get` adds at most 10% over \
                 redis-benchmark's GET latency at equal concurrency.\n"
            );
            for line in comparisons {
                let _ = writeln!(md, "- {line}");
            }
        }
        md
    }
}

/// "adds 23% over redis-benchmark GET at p50 (123 vs 100 µs), 0.75× its ops/s (45000 vs 60000)".
fn compare(store: &Row, peer: &Row, peer_name: &str) -> String {
    let latency = match ratio(store.p50_us, peer.p50_us) {
        Some(r) if r >= 1.0 => format!("adds {:.0}% over {peer_name} at p50", (r - 1.0) * 100.0),
        Some(r) => format!("is {:.0}% below {peer_name} at p50", (1.0 - r) * 100.0),
        None => format!("has no p50 to compare with {peer_name}"),
    };
    format!(
        "{latency} ({} vs {} µs); p99 {} vs {} µs; {:.2}× its ops/s ({} vs {})",
        format_micros(store.p50_us),
        format_micros(peer.p50_us),
        format_micros(store.p99_us),
        format_micros(peer.p99_us),
        store.ops_per_sec / peer.ops_per_sec,
        format_rate(store.ops_per_sec),
        format_rate(peer.ops_per_sec),
    )
}

fn tasks(n: usize) -> String {
    if n == 1 {
        "1 task".to_owned()
    } else {
        format!("{n} tasks")
    }
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> Option<f64> {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn format_rate(ops_per_sec: f64) -> String {
    format!("{ops_per_sec:.0}")
}

/// Enough digits to tell sub-microsecond memory calls apart, no false precision above.
fn format_micros(micros: Option<f64>) -> String {
    match micros {
        None => "–".to_owned(),
        // Thresholds just below 10 and 100, so that 99.96 prints as "100", not "100.0".
        Some(us) if us < 9.995 => format!("{us:.2}"),
        Some(us) if us < 99.95 => format!("{us:.1}"),
        Some(us) => format!("{us:.0}"),
    }
}

fn humanize(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
