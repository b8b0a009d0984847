//! The Redis peer: the distribution's `redis-benchmark` against the same private server, with the
//! same value size and client count as the store's run, and no pipelining.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::process::Command;

use crate::BoxError;

/// One line of `redis-benchmark --csv`. Latencies are in microseconds; Redis before 7 reports only
/// the rate, so they may be absent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PeerResult {
    pub(crate) test: String,
    pub(crate) rps: f64,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    /// How many requests the run made (`-n`).
    pub(crate) requests: u64,
}

/// Writes the one key redis-benchmark's GET reads (`key:__rand_int__`, as there is no `-r`) with a
/// value of the same size as the store's, so that GET never measures a miss even when it runs
/// before any SET.
pub(crate) async fn prime(addr: SocketAddr) -> Result<(), BoxError> {
    run_once(addr, "SET", 1, 1).await.map(drop)
}

/// `redis-benchmark -t TEST` with `clients` connections, sized to run for about `duration`.
///
/// redis-benchmark takes a request count, not a duration, so a short run first measures the rate
/// (and warms the server and the connections up), and the real run asks for `rate × duration`.
pub(crate) async fn run(
    addr: SocketAddr,
    test: &str,
    clients: usize,
    duration: Duration,
) -> Result<PeerResult, BoxError> {
    let probe_requests = (100 * clients as u64).max(5_000);
    let probe = run_once(addr, test, clients, probe_requests).await?;
    let requests = ((probe.rps * duration.as_secs_f64()) as u64).max(probe_requests);
    run_once(addr, test, clients, requests).await
}

async fn run_once(
    addr: SocketAddr,
    test: &str,
    clients: usize,
    requests: u64,
) -> Result<PeerResult, BoxError> {
    let mut command = Command::new("redis-benchmark");
    command
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .args(["-d", &crate::workloads::VALUE_BYTES.to_string()])
        .args(["-P", "1", "-t", test, "--csv"])
        // Three decimals of a millisecond: microsecond resolution, like our own table.
        .args(["--precision", "3"])
        .kill_on_drop(true);
    let output = command
        .output()
        .await
        .map_err(|e| format!("cannot run redis-benchmark (apt package redis-tools): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "redis-benchmark -t {test} -c {clients} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut results = parse_csv(&stdout)?;
    let result = results
        .iter()
        .position(|r| r.test.eq_ignore_ascii_case(test))
        .map(|i| results.swap_remove(i))
        .ok_or_else(|| format!("redis-benchmark printed no {test} line:\n{stdout}"))?;
    Ok(PeerResult { requests, ..result })
}

/// Parses `redis-benchmark --csv`, finding columns by their header so that a version with more or
/// fewer columns still parses. Redis 7 prints
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`.
fn parse_csv(csv: &str) -> Result<Vec<PeerResult>, BoxError> {
    let mut lines = csv.lines().map(str::trim).filter(|l| !l.is_empty());
    let header: HashMap<String, usize> = lines
        .next()
        .ok_or("redis-benchmark printed nothing")?
        .split(',')
        .enumerate()
        .map(|(i, name)| (unquote(name).to_owned(), i))
        .collect();
    let column = |name: &str| header.get(name).copied();
    let (test, rps) = column("test")
        .zip(column("rps"))
        .ok_or_else(|| format!("unexpected redis-benchmark CSV header in:\n{csv}"))?;
    let (p50, p99) = (column("p50_latency_ms"), column("p99_latency_ms"));

    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(unquote).collect();
            let number = |i: usize| -> Result<f64, BoxError> {
                let field = fields
                    .get(i)
                    .ok_or_else(|| format!("short CSV line {line:?}"))?;
                Ok(field
                    .parse::<f64>()
                    .map_err(|e| format!("{field:?} in {line:?}: {e}"))?)
            };
            let millis_to_micros =
                |i: Option<usize>| i.map(number).transpose().map(|v| v.map(|ms| ms * 1_000.0));
            Ok(PeerResult {
                test: fields
                    .get(test)
                    .ok_or_else(|| format!("short CSV line {line:?}"))?
                    .to_string(),
                rps: number(rps)?,
                p50_us: millis_to_micros(p50)?,
                p99_us: millis_to_micros(p99)?,
                requests: 0,
            })
        })
        .collect()
}

fn unquote(field: &str) -> &str {
    field.trim().trim_matches('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_7_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"SET\",\"54525.63\",\"0.174\",\"0.048\",\"0.159\",\"0.311\",\"0.455\",\"2.943\"\n\
                   \"GET\",\"60386.47\",\"0.156\",\"0.040\",\"0.151\",\"0.255\",\"0.407\",\"2.495\"\n";
        let results = parse_csv(csv).unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[1].test, "GET");
        assert_eq!(results[1].rps, 60386.47);
        assert!((results[1].p50_us.unwrap() - 151.0).abs() < 1e-9);
        assert!((results[1].p99_us.unwrap() - 407.0).abs() < 1e-9);
    }

    #[test]
    fn parses_rate_only_csv_of_older_versions() {
        let results = parse_csv("\"test\",\"rps\"\n\"GET\",\"1000.00\"\n").unwrap();
        assert_eq!(results[0].rps, 1000.0);
        assert_eq!(results[0].p50_us, None);
    }
}
