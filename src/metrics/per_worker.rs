//! [`WorkerGauge`] and [`WorkerCounter`]: a gauge and a counter that requests and
//! connections move on every worker thread. Each worker counts in a slot of its own, on a
//! cache line no other worker writes, so counting never waits for a line another core
//! holds; a read sums the slots. The duration histograms keep their rows in the same slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// The calling worker's slot of `slots` (threads that are no worker share the first).
pub(super) fn mine<T>(slots: &[T]) -> &T {
    &slots[crate::workers::index() % slots.len()]
}

/// A slot per worker, each on a cache line of its own.
pub(super) fn slots<T: Default>() -> Arc<[Padded<T>]> {
    (0..crate::workers::count().max(1))
        .map(|_| Padded::default())
        .collect()
}

/// A worker's slot, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct Padded<T>(pub(super) T);

/// A gauge with a slot per worker, cheap to clone (the slots are shared).
#[derive(Debug, Clone)]
pub struct WorkerGauge(Arc<[Padded<AtomicI64>]>);

impl Default for WorkerGauge {
    /// A gauge at 0.
    fn default() -> Self {
        WorkerGauge(slots())
    }
}

impl WorkerGauge {
    fn slot(&self) -> &AtomicI64 {
        &mine(&self.0).0
    }

    /// Adds one.
    pub fn inc(&self) {
        self.slot().fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away (from this worker's slot: one slot may go below 0 when another worker
    /// added the one, the sum does not).
    pub fn dec(&self) {
        self.slot().fetch_sub(1, Ordering::Relaxed);
    }

    /// The value: the sum of the slots, each read on its own.
    pub fn get(&self) -> i64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
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
        mine(&self.0).0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count: the sum of the slots.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
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
    fn the_value_is_the_sum_of_the_slots_whichever_worker_moved_it() {
        let g = WorkerGauge(Arc::from([Padded::default(), Padded::default()]));
        g.inc();
        g.inc();
        // A connection counted on one worker and uncounted on another.
        g.0[1].0.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(g.get(), 1);
        g.dec();
        assert_eq!(g.get(), 0);
        assert_eq!(g.0[0].0.load(Ordering::Relaxed), 1);

        let c = WorkerCounter(Arc::from([Padded::default(), Padded::default()]));
        c.inc();
        c.0[1].0.fetch_add(2, Ordering::Relaxed);
        assert_eq!(c.get(), 3);
    }
}
