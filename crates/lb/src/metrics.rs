//! Metrics: a small registry of atomics per balancer, rendered in the Prometheus text format on
//! the admin listener's `/metrics`.
//!
//! Not the `metrics` facade: its recorder is process-global, and a test process (or the lab)
//! runs several balancers side by side whose numbers must not mix. Per-instance series live in
//! the [`Backend`](crate::Backend) and disappear with it when it is removed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::discovery::Backend;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one instance.
#[derive(Debug, Default)]
pub(crate) struct BackendMetrics {
    /// Attempts sent to the instance (retries included).
    pub(crate) requests: AtomicU64,
    /// Attempts that failed: no connection, reset, timeout, a 5xx answer, or a response body
    /// that broke off.
    pub(crate) errors: AtomicU64,
    /// Retries of requests that failed on this instance.
    pub(crate) retries: AtomicU64,
    /// Times passive ejection took it out.
    pub(crate) ejections: AtomicU64,
    /// Sticky pins to this instance that had to be broken.
    pub(crate) broken_pins: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl BackendMetrics {
    pub(crate) fn observe_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub(crate) fn inc(c: &AtomicU64) {
    // Relaxed: counters are read only for reporting; nothing is ordered by them.
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counters of the balancer as a whole.
#[derive(Debug, Default)]
pub(crate) struct LbMetrics {
    /// Requests answered 503 because no instance could take them.
    pub(crate) no_instance: AtomicU64,
    /// Requests sent to an unhealthy instance because none was healthy (fail open).
    pub(crate) fail_open: AtomicU64,
    /// Retries refused because the budget was spent.
    pub(crate) budget_exhausted: AtomicU64,
    /// Sticky pins broken, whichever instance they named (also counted per instance while it
    /// is still in the set).
    pub(crate) broken_pins: AtomicU64,
    /// Requests refused before forwarding: 400 (malformed or smuggling) and 431 (too large).
    pub(crate) rejected_400: AtomicU64,
    pub(crate) rejected_431: AtomicU64,
    /// Client connections cut because a response on them stopped moving.
    pub(crate) response_stalls: AtomicU64,
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{labels} {value}");
    }
}

/// Renders every series in the Prometheus text exposition format (version 0.0.4).
pub(crate) fn render(lb: &LbMetrics, backends: &[std::sync::Arc<Backend>]) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    type Pick = fn(&Backend) -> u64;
    let per_instance: [(&str, &str, &str, Pick); 7] = [
        (
            "statehouse_lb_requests_total",
            "counter",
            "Requests sent to an instance, retries included.",
            |b| get(&b.metrics.requests),
        ),
        (
            "statehouse_lb_errors_total",
            "counter",
            "Attempts that failed: no connection, reset, timeout, a 5xx answer, or a response body that broke off.",
            |b| get(&b.metrics.errors),
        ),
        (
            "statehouse_lb_in_flight",
            "gauge",
            "Requests and WebSocket tunnels in flight.",
            |b| b.in_flight(),
        ),
        (
            "statehouse_lb_ejections_total",
            "counter",
            "Passive ejections after consecutive failures.",
            |b| get(&b.metrics.ejections),
        ),
        (
            "statehouse_lb_retries_total",
            "counter",
            "Retries of requests that failed on this instance.",
            |b| get(&b.metrics.retries),
        ),
        (
            "statehouse_lb_broken_pins_total",
            "counter",
            "Sticky pins to this instance broken because it was down, draining or gone.",
            |b| get(&b.metrics.broken_pins),
        ),
        (
            "statehouse_lb_instance_up",
            "gauge",
            "1 if the instance takes new requests (healthy, not ejected, not draining).",
            |b| u64::from(b.is_usable()),
        ),
    ];
    for (name, kind, help, pick) in per_instance {
        f.head(name, kind, help);
        for b in backends {
            f.line(name, &format!("{{instance=\"{}\"}}", b.name()), pick(b));
        }
    }
    let name = "statehouse_lb_request_duration_seconds";
    f.head(
        name,
        "histogram",
        "Time from sending a request to an instance to its response head.",
    );
    for b in backends {
        let m = &b.metrics;
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += get(&m.latency_buckets[i]);
            f.line(
                &format!("{name}_bucket"),
                &format!("{{instance=\"{}\",le=\"{le}\"}}", b.name()),
                cumulative,
            );
        }
        let count = get(&m.latency_count);
        f.line(
            &format!("{name}_bucket"),
            &format!("{{instance=\"{}\",le=\"+Inf\"}}", b.name()),
            count,
        );
        f.line(
            &format!("{name}_sum"),
            &format!("{{instance=\"{}\"}}", b.name()),
            get(&m.latency_sum_micros) as f64 / 1e6,
        );
        f.line(
            &format!("{name}_count"),
            &format!("{{instance=\"{}\"}}", b.name()),
            count,
        );
    }
    for (name, help, v) in [
        (
            "statehouse_lb_no_instance_total",
            "Requests answered 503 because no instance could take them.",
            get(&lb.no_instance),
        ),
        (
            "statehouse_lb_fail_open_total",
            "Requests sent to an unhealthy instance because none was healthy.",
            get(&lb.fail_open),
        ),
        (
            "statehouse_lb_retry_budget_exhausted_total",
            "Retries refused because the retry budget was spent.",
            get(&lb.budget_exhausted),
        ),
        (
            "statehouse_lb_broken_pins_all_total",
            "Sticky pins broken, whichever instance they named.",
            get(&lb.broken_pins),
        ),
        (
            "statehouse_lb_response_stalls_total",
            "Client connections cut because a response on them stopped moving \
             (timeouts.response_stall).",
            get(&lb.response_stalls),
        ),
    ] {
        f.head(name, "counter", help);
        f.line(name, "", v);
    }
    let name = "statehouse_lb_rejected_requests_total";
    f.head(
        name,
        "counter",
        "Requests refused before forwarding (malformed, smuggling, oversized head).",
    );
    f.line(name, "{status=\"400\"}", get(&lb.rejected_400));
    f.line(name, "{status=\"431\"}", get(&lb.rejected_431));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::test_support::backends;

    #[test]
    fn renders_per_instance_series_and_a_cumulative_histogram() {
        let b = backends(2);
        inc(&b[0].metrics.requests);
        b[0].metrics.observe_latency(Duration::from_millis(3));
        b[0].metrics.observe_latency(Duration::from_secs(60));
        let text = render(&LbMetrics::default(), &b);
        assert!(
            text.contains("statehouse_lb_requests_total{instance=\"i0\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("statehouse_lb_requests_total{instance=\"i1\"} 0\n"));
        assert!(text.contains(
            "statehouse_lb_request_duration_seconds_bucket{instance=\"i0\",le=\"0.0025\"} 0\n"
        ));
        assert!(text.contains(
            "statehouse_lb_request_duration_seconds_bucket{instance=\"i0\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "statehouse_lb_request_duration_seconds_bucket{instance=\"i0\",le=\"10\"} 1\n"
        ));
        assert!(text.contains(
            "statehouse_lb_request_duration_seconds_bucket{instance=\"i0\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("statehouse_lb_request_duration_seconds_count{instance=\"i0\"} 2\n"));
    }
}
