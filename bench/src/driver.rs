//! The one closed-loop driver every measured operation goes through: the store's operations on
//! every backend and the raw sqlx peer alike, so they are timed the same way.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::BoxError;

/// One operation the driver repeats.
pub(crate) trait Workload: Send + Sync + 'static {
    /// What one task keeps between calls: its key, its last version, a patch built once.
    type Worker: Send + 'static;

    /// Prepares task `index` (reads its key's version, ...). Not timed.
    fn worker(&self, index: usize) -> impl Future<Output = Result<Self::Worker, BoxError>> + Send;

    /// One timed call.
    fn call(&self, worker: &mut Self::Worker) -> impl Future<Output = Outcome> + Send;
}

/// How one call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done,
    /// A conditional write lost; counted apart from errors and kept out of the histogram.
    Conflict,
    Failed(String),
}

/// How long to run: `warmup` untimed, then `measure` timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
}

/// What one cell (workload × concurrency) measured.
#[derive(Debug)]
pub(crate) struct Sample {
    /// Latencies of the successful calls, in nanoseconds.
    pub(crate) latency_ns: Histogram<u64>,
    pub(crate) measured_for: Duration,
    pub(crate) conflicts: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl Sample {
    fn empty(measured_for: Duration) -> Self {
        Sample {
            latency_ns: new_histogram(),
            measured_for,
            conflicts: 0,
            errors: 0,
            first_error: None,
        }
    }

    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.latency_ns.len() as f64 / self.measured_for.as_secs_f64()
    }

    /// Adds what `other` recorded in the same window (another task's share).
    fn absorb(&mut self, other: Sample) {
        self.latency_ns
            .add(&other.latency_ns)
            .expect("every histogram has the same bounds, so adding cannot go out of range");
        self.conflicts += other.conflicts;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Adds what `other` recorded in a window of its own (another round):
    /// rates are then over both windows.
    pub(crate) fn pool(&mut self, other: Sample) {
        self.measured_for += other.measured_for;
        self.absorb(other);
    }

    /// Latency at `quantile`, in microseconds; `None` when nothing succeeded.
    pub(crate) fn micros_at(&self, quantile: f64) -> Option<f64> {
        micros_at(&self.latency_ns, quantile)
    }
}

/// A nanosecond histogram's value at `quantile`, in microseconds; `None` when it is empty.
pub(crate) fn micros_at(histogram: &Histogram<u64>, quantile: f64) -> Option<f64> {
    (!histogram.is_empty()).then(|| histogram.value_at_quantile(quantile) as f64 / 1_000.0)
}

/// Nanoseconds rather than the microseconds a report shows: the memory backend answers in well
/// under a microsecond, and a microsecond histogram would flatten it to 0 or 1.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 ns to 60 s at 3 significant digits (0.1% resolution): wider than any call can take under
    // the store's 1 s timeout.
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .expect("constant bounds: low >= 1, high >= 2 * low, 3 significant figures")
}

/// Runs `concurrency` tasks, each calling `workload` back to back (a closed loop: a task sends its
/// next call only when the previous one answered) for `window.warmup + window.measure`, and
/// merges what they recorded during `window.measure`.
///
/// A call counts when it both started and finished inside the measured part; a call straddling
/// either edge is dropped, which loses at most one call per task and edge.
pub(crate) async fn closed_loop<W: Workload>(
    workload: Arc<W>,
    concurrency: usize,
    window: Window,
) -> Result<Sample, BoxError> {
    let workers = workers(&*workload, concurrency).await?;
    Ok(closed_loop_with(workload, workers, window).await?.0)
}

/// Prepares `concurrency` tasks' workers, so that every task is ready (keys read, versions known)
/// before the clock starts.
pub(crate) async fn workers<W: Workload>(
    workload: &W,
    concurrency: usize,
) -> Result<Vec<W::Worker>, BoxError> {
    let mut workers = Vec::with_capacity(concurrency);
    for index in 0..concurrency {
        workers.push(workload.worker(index).await?);
    }
    Ok(workers)
}

/// [`closed_loop`] on workers prepared beforehand, one task each; gives them back with the
/// sample, so that a caller alternating between workloads keeps their sessions and connections.
pub(crate) async fn closed_loop_with<W: Workload>(
    workload: Arc<W>,
    workers: Vec<W::Worker>,
    window: Window,
) -> Result<(Sample, Vec<W::Worker>), BoxError> {
    let measure_from = Instant::now() + window.warmup;
    let until = measure_from + window.measure;
    let mut tasks = JoinSet::new();
    for mut worker in workers {
        let workload = Arc::clone(&workload);
        tasks.spawn(async move {
            let mut sample = Sample::empty(window.measure);
            loop {
                let began = Instant::now();
                if began >= until {
                    break;
                }
                let outcome = workload.call(&mut worker).await;
                let ended = Instant::now();
                // A backend that answers without ever awaiting (the memory store) would otherwise
                // keep its worker thread until the end and starve the other tasks: the requested
                // concurrency would silently become the number of threads. This yields only once
                // the task's budget (128 units) is spent, so network calls, which yield anyway,
                // are not slowed down.
                tokio::task::coop::consume_budget().await;
                if began < measure_from || ended > until {
                    continue;
                }
                match outcome {
                    Outcome::Done => sample.latency_ns.saturating_record(
                        u64::try_from((ended - began).as_nanos()).unwrap_or(u64::MAX),
                    ),
                    Outcome::Conflict => sample.conflicts += 1,
                    Outcome::Failed(e) => {
                        sample.errors += 1;
                        sample.first_error.get_or_insert(e);
                    }
                }
            }
            (sample, worker)
        });
    }

    let mut merged = Sample::empty(window.measure);
    let mut workers = Vec::with_capacity(tasks.len());
    while let Some(task) = tasks.join_next().await {
        let (sample, worker) = task?;
        merged.absorb(sample);
        workers.push(worker);
    }
    Ok((merged, workers))
}
