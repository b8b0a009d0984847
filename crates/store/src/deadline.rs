//! Call deadlines without a tokio timer per call.
//!
//! Every store call is bounded by the policy's timeout. `tokio::time::timeout`
//! registers a timer per call in the runtime's timer wheel, behind one lock
//! that every worker thread also takes each time it parks. At tens of
//! thousands of calls a second on two cores that lock is a cost of its own:
//! in session-bench at 16 clients, reads with a tokio timer per call won 10
//! and 10 of 24 quarter-second slices against tower-sessions (which sets no
//! timeout), and 22 and 19 of 24 with no timeout at all (a throwaway build).
//! With this table: 14 and 15 of 24, against 3 and 8 for the tokio timer in
//! alternating runs.
//!
//! A [`Deadlines`] table instead has a fixed number of slots. A call whose
//! first poll did not finish takes a free slot (atomic operations only),
//! writes its deadline there and leaves its waker. One thread for the whole
//! process wakes every [`TICK`], marks each taken slot whose deadline has
//! passed and wakes its call, which then ends as timed out. So a call times
//! out between `timeout` and `timeout + TICK` after it started. A call that
//! finds every slot taken, or runs where the thread could not be started,
//! falls back to `tokio::time::timeout`.
//!
//! Invariants:
//! - a slot's state is 0 (free), a deadline (ms after the table's epoch,
//!   plus one), or [`EXPIRED`]; only its taker writes a deadline or 0, only
//!   the ticker writes `EXPIRED`, by compare-and-swap from the deadline it
//!   read, so it never marks a call that took the slot after that read
//!   unless that call's deadline, to the millisecond, has passed too;
//! - a call registers its waker before it checks for `EXPIRED`, so a mark
//!   made after the check still wakes it;
//! - the slot is given back when the call's future is dropped, finished or
//!   not.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often the deadline thread looks at the tables.
pub(crate) const TICK: Duration = Duration::from_millis(20);

/// Slots per table: calls in flight beyond this many use tokio's timer.
const WORDS: usize = 4;
const SLOTS: usize = WORDS * 64;

/// A slot's state once its deadline has passed.
const EXPIRED: u64 = u64::MAX;

/// The call ran past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

struct Slot {
    state: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

/// One word of the taken-bitmap, alone on its cache line: two threads
/// taking slots in different words do not contend.
#[repr(align(64))]
#[derive(Default)]
struct Word(AtomicU64);

struct Table {
    epoch: Instant,
    /// Bit `i` of word `i / 64`: slot `i` is taken.
    taken: [Word; WORDS],
    slots: Box<[Slot]>,
}

/// The deadline table of one store; see the module docs.
pub(crate) struct Deadlines {
    table: Arc<Table>,
    /// False when the deadline thread could not be started.
    ticking: bool,
}

impl std::fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlines")
            .field("ticking", &self.ticking)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Held for a store or a take of one value: never left half-done.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The tables of the live stores, which the deadline thread looks at.
type Tables = Mutex<Vec<Weak<Table>>>;

/// The tables the deadline thread looks at; the thread is started with the
/// first. `None` when it could not be started.
fn registry() -> Option<&'static Tables> {
    static REGISTRY: OnceLock<Option<Arc<Tables>>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let tables: Arc<Tables> = Arc::default();
            let shared = Arc::clone(&tables);
            std::thread::Builder::new()
                .name("statehouse-deadlines".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(TICK);
                        let live: Vec<Arc<Table>> = {
                            let mut tables = lock(&shared);
                            tables.retain(|t| t.strong_count() > 0);
                            tables.iter().filter_map(Weak::upgrade).collect()
                        };
                        for table in live {
                            table.expire_due();
                        }
                    }
                })
                .ok()
                .map(|_| tables)
        })
        .as_deref()
}

impl Deadlines {
    pub(crate) fn new() -> Self {
        let table = Arc::new(Table {
            epoch: Instant::now(),
            taken: Default::default(),
            slots: (0..SLOTS)
                .map(|_| Slot {
                    state: AtomicU64::new(0),
                    waker: Mutex::new(None),
                })
                .collect(),
        });
        let ticking = match registry() {
            Some(tables) => {
                lock(tables).push(Arc::downgrade(&table));
                true
            }
            None => false,
        };
        Deadlines { table, ticking }
    }

    /// Runs `fut` to completion or until `timeout` has passed (give or take
    /// one [`TICK`]), whichever comes first.
    pub(crate) async fn bound<F: Future>(
        &self,
        timeout: Duration,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        let started = Instant::now();
        let mut fut = pin!(fut);
        // Most calls of a fast backend never need the table.
        let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        if let Poll::Ready(output) = first {
            return Ok(output);
        }
        let taken = if self.ticking {
            self.table.take(started + timeout)
        } else {
            None
        };
        let Some(taken) = taken else {
            let left = timeout.saturating_sub(started.elapsed());
            return tokio::time::timeout(left, fut).await.map_err(|_| Elapsed);
        };
        let slot = &self.table.slots[taken.index];
        // `fut` was polled just now and has this task's waker: it need not
        // be polled again until woken.
        let mut polled = true;
        std::future::poll_fn(|cx| {
            if !std::mem::take(&mut polled)
                && let Poll::Ready(output) = fut.as_mut().poll(cx)
            {
                return Poll::Ready(Ok(output));
            }
            {
                let mut waker = lock(&slot.waker);
                match &*waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
            }
            if slot.state.load(Ordering::Acquire) == EXPIRED {
                return Poll::Ready(Err(Elapsed));
            }
            Poll::Pending
        })
        .await
    }
}

/// The word of the taken-bitmap where this thread's searches start: threads
/// are dealt words in turn as they first take a slot.
fn thread_word() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static WORD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % WORDS;
    }
    WORD.with(|w| *w)
}

/// A slot taken by one call; given back when dropped.
struct Taken<'a> {
    table: &'a Table,
    index: usize,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let slot = &self.table.slots[self.index];
        slot.state.store(0, Ordering::Release);
        lock(&slot.waker).take();
        self.table.taken[self.index / 64]
            .0
            .fetch_and(!(1 << (self.index % 64)), Ordering::AcqRel);
    }
}

impl Table {
    /// Whole milliseconds from the epoch to `at`, rounded `up` or down.
    fn millis(&self, at: Instant, up: bool) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        let millis = if up {
            nanos.div_ceil(1_000_000)
        } else {
            nanos / 1_000_000
        };
        u64::try_from(millis).unwrap_or(u64::MAX)
    }

    /// A free slot holding `deadline`, or `None` when all are taken.
    fn take(&self, deadline: Instant) -> Option<Taken<'_>> {
        // Each thread starts at a word of its own, so that the runtime's
        // worker threads mostly take and give back slots in different words.
        let start = thread_word();
        for step in 0..WORDS {
            let word = (start + step) % WORDS;
            let mut bits = self.taken[word].0.load(Ordering::Acquire);
            while bits != u64::MAX {
                let bit = bits.trailing_ones() as usize;
                let before = self.taken[word].0.fetch_or(1 << bit, Ordering::AcqRel);
                if before & (1 << bit) == 0 {
                    let index = word * 64 + bit;
                    // Plus one: 0 means free. Below EXPIRED by construction.
                    let state = self
                        .millis(deadline, true)
                        .saturating_add(1)
                        .min(EXPIRED - 1);
                    self.slots[index].state.store(state, Ordering::Release);
                    return Some(Taken { table: self, index });
                }
                bits = before | (1 << bit);
            }
        }
        None
    }

    /// Marks every taken slot whose deadline has passed and wakes its call.
    fn expire_due(&self) {
        let now = self.millis(Instant::now(), false);
        for (word, taken) in self.taken.iter().enumerate() {
            let mut bits = taken.0.load(Ordering::Acquire);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let slot = &self.slots[word * 64 + bit];
                let state = slot.state.load(Ordering::Acquire);
                if state == 0 || state == EXPIRED || state - 1 > now {
                    continue;
                }
                if slot
                    .state
                    .compare_exchange(state, EXPIRED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                    && let Some(waker) = lock(&slot.waker).as_ref()
                {
                    waker.wake_by_ref();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Table {
        fn all_free(&self) -> bool {
            self.taken.iter().all(|w| w.0.load(Ordering::Acquire) == 0)
        }
    }

    #[tokio::test]
    async fn a_call_that_finishes_in_time_gives_its_output_and_its_slot_back() {
        let deadlines = Deadlines::new();
        let out = deadlines
            .bound(Duration::from_secs(1), async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                7
            })
            .await;
        assert_eq!(out, Ok(7));
        assert!(deadlines.table.all_free());
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_ends_within_a_tick() {
        let deadlines = Deadlines::new();
        let started = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            deadlines.bound(Duration::from_millis(100), std::future::pending::<()>()),
        )
        .await
        .expect("woken by the deadline thread");
        let took = started.elapsed();
        assert_eq!(out, Err(Elapsed));
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_millis(100) + TICK * 5, "{took:?}");
        assert!(deadlines.table.all_free());
    }

    #[tokio::test]
    async fn calls_beyond_the_slots_fall_back_to_tokios_timer() {
        let deadlines = Arc::new(Deadlines::new());
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..SLOTS + 10 {
            let d = Arc::clone(&deadlines);
            calls.spawn(async move {
                d.bound(Duration::from_millis(150), std::future::pending::<()>())
                    .await
            });
        }
        let started = Instant::now();
        let mut timed_out = 0;
        let all = async {
            while let Some(result) = calls.join_next().await {
                assert_eq!(result.unwrap(), Err(Elapsed));
                timed_out += 1;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .expect("every call woken by the deadline thread or its tokio timer");
        assert_eq!(timed_out, SLOTS + 10);
        assert!(started.elapsed() < Duration::from_millis(150) + TICK * 10);
        assert!(deadlines.table.all_free());
    }

    #[tokio::test]
    async fn a_call_dropped_midway_gives_its_slot_back() {
        let deadlines = Deadlines::new();
        let cut = tokio::time::timeout(
            Duration::from_millis(10),
            deadlines.bound(Duration::from_secs(5), std::future::pending::<()>()),
        )
        .await;
        assert!(cut.is_err());
        assert!(deadlines.table.all_free());
    }
}
