//! [`DurationHistogram`]: the request duration histograms, per upstream and per server.
//! Unlike `prometheus_client`'s histogram (a mutex every observation takes, and bucket counts
//! only the encoder can read) it is a row of atomic counters, so a request observes without a
//! lock, requests on other threads do not wait for each other (each worker counts in a row
//! of its own), and the stats sampler reads the bucket counts each second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::DURATION_BUCKETS;
use super::per_worker::{Padded, add, mine, slots};

/// Buckets of a [`DurationHistogram`]: one per bound of [`DURATION_BUCKETS`], then `+Inf`.
pub const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// Observation counts per bucket (not cumulative): `counts[i]` counts durations above bound
/// `i - 1` and at most bound `i` of [`DURATION_BUCKETS`]; the last one those above them all.
pub type BucketCounts = [u64; BUCKETS];

/// A histogram over [`DURATION_BUCKETS`], cheap to clone (the counters are shared). Each
/// worker thread counts in a row of its own, on cache lines no other worker writes: a
/// request's observation never waits for a line another core holds. A read sums the rows.
#[derive(Debug, Clone)]
pub struct DurationHistogram(Arc<[Padded<Row>]>);

#[derive(Debug, Default)]
struct Row {
    counts: [AtomicU64; BUCKETS],
    /// The sum of observations in nanoseconds: an integer adds without a compare loop, and
    /// 2^64 ns is 584 years of summed request time.
    sum_nanos: AtomicU64,
}

impl Default for DurationHistogram {
    /// A histogram with a row per worker.
    fn default() -> Self {
        DurationHistogram(slots())
    }
}

impl DurationHistogram {
    /// Counts one duration, in seconds.
    pub fn observe(&self, seconds: f64) {
        let i = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS - 1);
        let (row, own) = mine(&self.0);
        add(&row.0.counts[i], 1, own);
        // `as` saturates: a negative or NaN duration adds nothing.
        let nanos = (seconds * 1e9) as u64;
        add(&row.0.sum_nanos, nanos, own);
    }

    /// The count of each bucket now. Each is read on its own, so an observation made during
    /// the read may be in the next read only; their sum is the histogram's count.
    pub fn counts(&self) -> BucketCounts {
        std::array::from_fn(|i| {
            self.0
                .iter()
                .map(|r| r.0.counts[i].load(Ordering::Relaxed))
                .sum()
        })
    }

    /// The sum of the observations, in seconds.
    fn sum(&self) -> f64 {
        let nanos: u64 = self
            .0
            .iter()
            .map(|r| r.0.sum_nanos.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add);
        nanos as f64 / 1e9
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts = self.counts();
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        let sum = self.sum();
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_bucket_of_their_upper_bound() {
        let h = DurationHistogram::default();
        h.observe(0.0005); // on the first bound: first bucket
        h.observe(0.0006);
        h.observe(0.3);
        h.observe(100.0);
        h.observe(f64::NAN);
        let c = h.counts();
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 1);
        assert_eq!(c[9], 1, "0.3 s is in (0.25, 0.5]");
        assert_eq!(c[BUCKETS - 1], 2, "above 30 s, and NaN");
        assert_eq!(c.iter().sum::<u64>(), 5);
    }

    #[test]
    fn each_worker_counts_in_its_own_row_and_a_read_sums_them() {
        let h = DurationHistogram(Arc::from([Padded::default(), Padded::default()]));
        // A thread that is no worker counts in the last row; the first stands for a
        // worker's observations.
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::workers::become_worker(0);
                h.observe(0.002);
                h.observe(0.002);
            });
        });
        h.observe(0.002);
        assert_eq!(h.0[0].0.counts[2].load(Ordering::Relaxed), 2);
        assert_eq!(h.counts()[2], 3, "0.002 s is in (0.001, 0.0025]");
        assert!((h.sum() - 0.006).abs() < 1e-9);
    }
}
