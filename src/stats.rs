//! The stats sampler behind `GET /stats` and the dashboard (CONTRACT §9): every second, a
//! [`Sample`] of each server of the current snapshot (its request count, its 5xx count and
//! its duration histogram), kept in a ring of the last 61 per server. Rates, the share of 5xx
//! and latency percentiles over the last minute are differences between the newest sample
//! and the oldest one within 60 s, so the request path does nothing for them beyond the
//! counters and the histogram it already updates.
//!
//! Rings are keyed by (upstream name, `addr`), like the servers themselves, so a reload that
//! keeps a server keeps its history; a server gone from the config loses its ring at the next
//! sample.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::context::Context;
use crate::metrics::{BucketCounts, DURATION_BUCKETS};
use crate::runtime::Runtime;
use crate::server::Server;

/// Time between two samples.
pub const PERIOD: Duration = Duration::from_secs(1);

/// The span rates and percentiles are computed over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Samples kept per server: one minute of one-second intervals.
const KEPT: usize = 61;

/// How much older than [`WINDOW`] the oldest sample may be and still count: ticks come a
/// little late now and then, so 60 intervals span slightly more than 60 s.
const SLACK: Duration = Duration::from_millis(500);

/// (upstream name, server `addr`).
type Key = (Arc<str>, Arc<str>);

/// One server's cumulative counters at one instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// Responses counted (`fairway_requests_total`, every code).
    requests: u64,
    /// Of which 5xx.
    errors: u64,
    /// `fairway_upstream_server_request_duration_seconds` per bucket.
    buckets: BucketCounts,
}

impl Sample {
    fn of(server: &Server, at: Instant) -> Sample {
        let m = &server.metrics;
        Sample {
            at,
            requests: m.codes.total(),
            errors: m.codes.server_errors(),
            buckets: m.duration.counts(),
        }
    }

    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &Sample) -> Delta {
        Delta {
            seconds: self.at.duration_since(earlier.at).as_secs_f64(),
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i])),
        }
    }

    /// Whether a counter went down: the server was replaced by a new one under the same key
    /// (removed and added back between two samples), so older samples mean nothing now.
    fn is_reset_since(&self, earlier: &Sample) -> bool {
        self.requests < earlier.requests
            || self.errors < earlier.errors
            || self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .any(|(a, b)| a < b)
    }
}

/// The difference between two samples.
#[derive(Debug, Clone, Copy)]
struct Delta {
    seconds: f64,
    requests: u64,
    errors: u64,
    buckets: BucketCounts,
}

impl Delta {
    fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn quantile_ms(&self, q: f64) -> Option<f64> {
        quantile(&self.buckets, q).map(|s| s * 1000.0)
    }
}

/// A server's figures over the last minute, for `/stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    /// Responses per second.
    pub rps: f64,
    /// Share of 5xx among those responses; 0 when there were none.
    pub error_ratio: f64,
    /// Median time to the response head, in milliseconds; `None` without requests.
    pub p50_ms: Option<f64>,
    /// 99th percentile, in milliseconds; `None` without requests.
    pub p99_ms: Option<f64>,
    /// One point per sampling interval, oldest first (at most 60).
    pub history: Vec<Point>,
}

/// One interval of a server's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Responses per second in the interval.
    pub rps: f64,
    /// 99th percentile in the interval, in milliseconds; `None` without requests.
    pub p99_ms: Option<f64>,
}

/// The rings of every server, shared by the sampler (writer) and `/stats` (reader).
#[derive(Debug, Default)]
pub struct Stats {
    rings: Mutex<HashMap<Key, VecDeque<Sample>>>,
}

impl Stats {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, VecDeque<Sample>>> {
        self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one sample of every server of `rt`, and drops the rings of servers that `rt`
    /// no longer lists.
    pub fn sample(&self, rt: &Runtime, at: Instant) {
        // Counters are read before the lock is taken, so `/stats` never waits for them.
        let samples: Vec<(Key, Sample)> = rt
            .servers()
            .map(|(_, s)| {
                let key = (Arc::clone(&s.upstream), Arc::clone(&s.addr));
                (key, Sample::of(s, at))
            })
            .collect();
        let listed: HashSet<&Key> = samples.iter().map(|(k, _)| k).collect();
        let mut rings = self.lock();
        rings.retain(|k, _| listed.contains(k));
        for (key, sample) in samples {
            let ring = rings.entry(key).or_default();
            if ring.back().is_some_and(|last| sample.is_reset_since(last)) {
                ring.clear();
            }
            if ring.len() == KEPT {
                ring.pop_front();
            }
            ring.push_back(sample);
        }
    }

    /// The last minute of server `addr` of `upstream`; zeros while it has fewer than two
    /// samples.
    pub fn window(&self, upstream: &Arc<str>, addr: &Arc<str>) -> Window {
        let key = (Arc::clone(upstream), Arc::clone(addr));
        self.lock().get(&key).map(window).unwrap_or_default()
    }
}

/// Rates and percentiles between the newest sample and the oldest within [`WINDOW`], and the
/// per-interval history inside that span.
fn window(ring: &VecDeque<Sample>) -> Window {
    let Some(newest) = ring.back() else {
        return Window::default();
    };
    let first = ring
        .iter()
        .position(|s| newest.at.duration_since(s.at) <= WINDOW + SLACK)
        .unwrap_or(ring.len() - 1);
    let total = newest.since(&ring[first]);
    let history = ring
        .iter()
        .skip(first)
        .zip(ring.iter().skip(first + 1))
        .map(|(a, b)| {
            let d = b.since(a);
            Point {
                rps: d.rps(),
                p99_ms: d.quantile_ms(0.99),
            }
        })
        .collect();
    Window {
        rps: total.rps(),
        error_ratio: if total.requests > 0 {
            total.errors as f64 / total.requests as f64
        } else {
            0.0
        },
        p50_ms: total.quantile_ms(0.5),
        p99_ms: total.quantile_ms(0.99),
        history,
    }
}

/// The `q`-quantile (0 ≤ q ≤ 1), in seconds, of the durations counted per bucket in
/// `counts`: found by rank, then placed by linear interpolation between the bounds of its
/// bucket (as Prometheus's `histogram_quantile` does, the first bucket starting at 0). In the
/// `+Inf` bucket it is the largest finite bound. `None` when nothing was counted.
pub fn quantile(counts: &BucketCounts, q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let largest = DURATION_BUCKETS[DURATION_BUCKETS.len() - 1];
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = DURATION_BUCKETS.get(i) else {
                return Some(largest);
            };
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let into = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * into);
        }
        below += count;
    }
    Some(largest)
}

/// Samples every server each [`PERIOD`] until the proxy stops.
pub async fn run(ctx: Arc<Context>, stats: Arc<Stats>) {
    let mut tick = crate::timing::ticker(PERIOD);
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rt = ctx.runtime.load_full();
        stats.sample(&rt, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::BUCKETS;

    /// Bucket counts with `n` observations in bucket `i` for each `(i, n)`.
    fn counts(cells: &[(usize, u64)]) -> BucketCounts {
        let mut c = [0; BUCKETS];
        for &(i, n) in cells {
            c[i] = n;
        }
        c
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn no_observations_have_no_quantile() {
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        // 100 observations in (0.01, 0.025]: the median is halfway through the bucket.
        let c = counts(&[(5, 100)]);
        assert!(close(quantile(&c, 0.5).unwrap(), 0.0175));
        assert!(close(quantile(&c, 0.99).unwrap(), 0.01 + 0.015 * 0.99));
        assert!(close(quantile(&c, 1.0).unwrap(), 0.025));
        assert!(close(quantile(&c, 0.0).unwrap(), 0.01));
        // The first bucket starts at 0.
        let c = counts(&[(0, 4)]);
        assert!(close(quantile(&c, 0.5).unwrap(), 0.00025));
    }

    #[test]
    fn quantiles_find_the_bucket_by_rank() {
        // 90 fast (≤ 1 ms), 10 slow in (0.25, 0.5].
        let c = counts(&[(1, 90), (9, 10)]);
        let p50 = quantile(&c, 0.5).unwrap();
        assert!(p50 > 0.0005 && p50 <= 0.001, "{p50}");
        assert!(close(p50, 0.0005 + 0.0005 * (50.0 / 90.0)));
        // Rank 99 is the 9th of 10 in the slow bucket.
        assert!(close(quantile(&c, 0.99).unwrap(), 0.25 + 0.25 * 0.9));
        // Rank 90 ends the fast bucket exactly: its upper bound.
        assert!(close(quantile(&c, 0.9).unwrap(), 0.001));
    }

    #[test]
    fn the_overflow_bucket_reports_the_largest_bound() {
        let c = counts(&[(BUCKETS - 1, 3)]);
        assert_eq!(quantile(&c, 0.5), Some(30.0));
    }

    fn sample(at: Instant, requests: u64, errors: u64, fast: u64) -> Sample {
        Sample {
            at,
            requests,
            errors,
            buckets: counts(&[(1, fast)]),
        }
    }

    #[test]
    fn a_window_is_the_difference_over_the_last_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut ring = VecDeque::new();
        // 70 seconds of 10 requests per second, one in ten a 5xx; the first sample is
        // older than the window and must not count.
        ring.push_back(sample(at(0), 0, 0, 0));
        for s in 10..=70 {
            let n = (s - 10) * 10 + 1000;
            ring.push_back(sample(at(s), n, n / 10, n));
        }
        let w = window(&ring);
        assert!(close(w.rps, 10.0), "{w:?}");
        assert!(close(w.error_ratio, 0.1), "{w:?}");
        let p50 = w.p50_ms.unwrap();
        assert!(p50 > 0.5 && p50 <= 1.0, "{p50}");
        assert_eq!(w.history.len(), 60);
        assert!(w.history.iter().all(|p| close(p.rps, 10.0)));
        assert!(w.history.iter().all(|p| p.p99_ms.is_some()));
    }

    #[test]
    fn a_window_without_requests_has_zero_rates_and_no_percentiles() {
        let t0 = Instant::now();
        let ring = VecDeque::from([
            sample(t0, 5, 1, 5),
            sample(t0 + Duration::from_secs(1), 5, 1, 5),
        ]);
        let w = window(&ring);
        assert_eq!(
            w,
            Window {
                rps: 0.0,
                error_ratio: 0.0,
                p50_ms: None,
                p99_ms: None,
                history: vec![Point {
                    rps: 0.0,
                    p99_ms: None
                }],
            }
        );
        // One sample: no interval yet.
        assert_eq!(
            window(&VecDeque::from([sample(t0, 5, 1, 5)])),
            Window::default()
        );
        assert_eq!(window(&VecDeque::new()), Window::default());
    }

    fn runtime(servers: &str, prev: Option<&Runtime>, m: &crate::metrics::Metrics) -> Runtime {
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = {servers}\n"),
        )
        .unwrap();
        Runtime::build(cfg, prev, m, crate::runtime::Files::default())
    }

    fn ring_len(stats: &Stats, addr: &str) -> Option<usize> {
        let key: Key = (Arc::from("app"), Arc::from(addr));
        stats.lock().get(&key).map(VecDeque::len)
    }

    #[test]
    fn rings_follow_the_servers_of_the_snapshot() {
        let m = crate::metrics::Metrics::new();
        let stats = Stats::default();
        let a = runtime(r#"["127.0.0.1:1", "127.0.0.1:2"]"#, None, &m);
        let t0 = Instant::now();
        for s in 0..KEPT as u64 + 5 {
            stats.sample(&a, t0 + Duration::from_secs(s));
        }
        assert_eq!(ring_len(&stats, "127.0.0.1:1"), Some(KEPT));
        // A reload keeps :1 (and its history), drops :2 and adds :3.
        let b = runtime(r#"["127.0.0.1:1", "127.0.0.1:3"]"#, Some(&a), &m);
        stats.sample(&b, t0 + Duration::from_secs(100));
        assert_eq!(ring_len(&stats, "127.0.0.1:1"), Some(KEPT));
        assert_eq!(ring_len(&stats, "127.0.0.1:2"), None);
        assert_eq!(ring_len(&stats, "127.0.0.1:3"), Some(1));
        // Requests counted between two samples show in the window.
        let kept = b.find_server("app", "127.0.0.1:1").unwrap();
        for code in [200, 200, 500, 503] {
            kept.metrics.codes.inc(code);
            kept.metrics.duration.observe(0.02);
        }
        stats.sample(&b, t0 + Duration::from_secs(101));
        let w = stats.window(&kept.upstream, &kept.addr);
        assert!(close(w.error_ratio, 0.5), "{w:?}");
        assert!(close(w.p50_ms.unwrap(), 10.0 + 15.0 * 0.5), "{w:?}");
        assert_eq!(w.history.last().map(|p| p.rps), Some(4.0));
    }

    #[test]
    fn a_counter_that_goes_back_is_a_new_server() {
        let t0 = Instant::now();
        let later = sample(t0 + Duration::from_secs(1), 3, 0, 3);
        assert!(later.is_reset_since(&sample(t0, 10, 0, 10)));
        assert!(!later.is_reset_since(&sample(t0, 1, 0, 1)));
    }
}
