//! [`WorkerGauge`] and [`WorkerCounter`]: a gauge and a counter that requests and
//! connections move on every worker thread. Each worker counts in a slot of its own, on a
//! cache line no other thread writes, so counting never waits for a line another core holds,
//! and, with one writer, adds without a locked instruction (a locked add costs tens of
//! cycles even when no other core wants the line). Threads that are no worker share a last
//! slot and add to it atomically. A read sums the slots. The duration histograms keep their
//! rows in the same slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// The calling thread's slot of `slots`: `true` with a worker's own slot, which only that
/// worker's thread writes; `false` with the last slot, which the threads that are no worker
/// share.
pub(super) fn mine<T>(slots: &[T]) -> (&T, bool) {
    match crate::workers::worker() {
        Some(i) if i + 1 < slots.len() => (&slots[i], true),
        _ => (&slots[slots.len() - 1], false),
    }
}

/// Adds `n` (wrapping) to a counter of a slot [`mine`] gave: `own` when the calling thread
/// is its one writer, so a plain load and store do (no other thread's add can be lost
/// between them, and readers see the old or the new value); else atomically.
pub(super) fn add(counter: &AtomicU64, n: u64, own: bool) {
    if own {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    } else {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A slot per worker, each on a cache line of its own, and the last one for every other
/// thread.
pub(super) fn slots<T: Default>() -> Arc<[Padded<T>]> {
    (0..crate::workers::count().max(1) + 1)
        .map(|_| Padded::default())
        .collect()
}

/// A worker's slot, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct Padded<T>(pub(super) T);

/// A gauge with a slot per worker, cheap to clone (the slots are shared).
#[derive(Debug, Clone)]
pub struct WorkerGauge(Arc<[Padded<AtomicU64>]>);

impl Default for WorkerGauge {
    /// A gauge at 0.
    fn default() -> Self {
        WorkerGauge(slots())
    }
}

impl WorkerGauge {
    /// Adds one.
    pub fn inc(&self) {
        let (slot, own) = mine(&self.0);
        add(&slot.0, 1, own);
    }

    /// Takes one away (from this thread's slot: one slot may go below 0 when another worker
    /// added the one, the sum does not). A slot holds its value in two's complement.
    pub fn dec(&self) {
        let (slot, own) = mine(&self.0);
        add(&slot.0, u64::MAX, own);
    }

    /// The value: the sum of the slots, each read on its own.
    pub fn get(&self) -> i64 {
        self.0
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add) as i64
    }
}

impl TypedMetric for WorkerGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for WorkerGauge {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A counter with a slot per worker, cheap to clone (the slots are shared).
#[derive(Debug, Clone)]
pub struct WorkerCounter(Arc<[Padded<AtomicU64>]>);

impl Default for WorkerCounter {
    /// A counter at 0.
    fn default() -> Self {
        WorkerCounter(slots())
    }
}

impl WorkerCounter {
    /// Adds one.
    pub fn inc(&self) {
        let (slot, own) = mine(&self.0);
        add(&slot.0, 1, own);
    }

    /// The count: the sum of the slots.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl TypedMetric for WorkerCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for WorkerCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_the_sum_of_the_slots_whichever_thread_moved_it() {
        let g = WorkerGauge(slots_of(3));
        let c = WorkerCounter(slots_of(3));
        // Two workers and a thread that is none, at once: no add is lost.
        std::thread::scope(|s| {
            for worker in [Some(0), Some(1), None] {
                let (g, c) = (&g, &c);
                s.spawn(move || {
                    if let Some(i) = worker {
                        crate::workers::become_worker(i);
                    }
                    for _ in 0..10_000 {
                        g.inc();
                        c.inc();
                    }
                });
            }
        });
        assert_eq!(g.get(), 30_000);
        assert_eq!(c.get(), 30_000);
        for slot in g.0.iter() {
            assert_eq!(
                slot.0.load(Ordering::Relaxed),
                10_000,
                "each in its own slot"
            );
        }
        // A connection counted on one worker and uncounted on another: that slot goes below
        // 0, the sum does not.
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::workers::become_worker(1);
                g.dec();
            });
        });
        g.dec();
        assert_eq!(g.get(), 29_998);
        assert_eq!(g.0[2].0.load(Ordering::Relaxed), 9_999);
    }

    fn slots_of(n: usize) -> Arc<[Padded<AtomicU64>]> {
        (0..n).map(|_| Padded::default()).collect()
    }
}
