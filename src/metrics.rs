//! Prometheus metrics (CONTRACT §5): one [`Metrics`] owning the registry and the typed
//! families, plus the handles that the request path uses. Handles are resolved once per
//! server (kept across reloads with the server) and per upstream snapshot; the request path
//! never formats a label or takes a registry lock. `forget_*` removes the series of servers
//! and upstreams that a reload dropped.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

mod histogram;
mod per_worker;
mod process;

pub use histogram::{BUCKETS, BucketCounts, DurationHistogram};
pub use per_worker::{WorkerCounter, WorkerGauge};

/// `Content-Type` of the exposition (text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `server` label of responses the proxy gave itself.
pub const NO_SERVER: &str = "none";

/// Histogram buckets, in seconds: 0.5 ms to 30 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

/// `{upstream, server, code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Upstream name.
    pub upstream: String,
    /// Server `addr` as written, or `none`.
    pub server: String,
    /// HTTP status code.
    pub code: u16,
}

/// `{upstream, server}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    /// Upstream name.
    pub upstream: String,
    /// Server `addr` as written.
    pub server: String,
}

/// `{upstream, server, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// Upstream name.
    pub upstream: String,
    /// Server `addr` as written.
    pub server: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// `{upstream}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Upstream name.
    pub upstream: String,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// The registry and every metric family of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, WorkerCounter>,
    duration: Family<UpstreamLabels, DurationHistogram>,
    server_duration: Family<ServerLabels, DurationHistogram>,
    healthy: Family<ServerLabels, Gauge>,
    active: Family<ServerLabels, WorkerGauge>,
    health_checks: Family<CheckLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    /// `fairway_config_last_reload_successful`.
    pub last_reload_successful: Gauge,
    /// `fairway_client_connections_active`.
    pub connections_active: WorkerGauge,
    /// When the process started, as Unix seconds (`fairway_process_start_time_seconds`).
    pub process_start_time: f64,
    /// `fairway_client_connections_rejected_total`.
    pub connections_rejected: Counter,
    /// `fairway_access_log_dropped_total`.
    pub access_log_dropped: Counter,
    tls_expiry: Family<ServerNameLabels, Gauge>,
    maintenance: Family<UpstreamLabels, Gauge>,
    dns: Family<DnsLabels, Counter>,
    rate_limited: Family<UpstreamLabels, Counter>,
    sticky_reassignments: Family<UpstreamLabels, Counter>,
    /// `fairway_compressed_responses_total` by algorithm.
    compressed: [(&'static str, Counter); 3],
    /// `fairway_compression_bytes_total{direction="in"}`: bytes before compression.
    pub compression_in: Counter,
    /// `fairway_compression_bytes_total{direction="out"}`: bytes after compression.
    pub compression_out: Counter,
}

/// `{algorithm}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlgorithmLabels {
    /// `gzip`, `br` or `zstd`.
    pub algorithm: &'static str,
}

/// `{direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` (before compression) or `out` (after).
    pub direction: &'static str,
}

/// `{upstream, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// Upstream name.
    pub upstream: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// `{server_name}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerNameLabels {
    /// An SNI name, or `default` for the top-level certificate.
    pub server_name: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every family; the process collector included.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, WorkerCounter>::default();
        let duration = Family::<UpstreamLabels, DurationHistogram>::default();
        let server_duration = Family::<ServerLabels, DurationHistogram>::default();
        let healthy = Family::<ServerLabels, Gauge>::default();
        let active = Family::<ServerLabels, WorkerGauge>::default();
        let health_checks = Family::<CheckLabels, Counter>::default();
        let retries = Family::<UpstreamLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let last_reload_successful = Gauge::default();
        let connections_active = WorkerGauge::default();
        let connections_rejected = Counter::default();
        let access_log_dropped = Counter::default();
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "fairway_requests",
            "Requests answered, by upstream, server and status code",
            requests.clone(),
        );
        registry.register(
            "fairway_request_duration_seconds",
            "Time from the request head to the response head, by upstream",
            duration.clone(),
        );
        registry.register(
            "fairway_upstream_server_request_duration_seconds",
            "Time from the request head to the response head, by the server of the last try",
            server_duration.clone(),
        );
        registry.register(
            "fairway_upstream_server_healthy",
            "Whether a server is considered healthy (1) or not (0)",
            healthy.clone(),
        );
        registry.register(
            "fairway_upstream_active_requests",
            "Requests (and tunnels) in flight to a server",
            active.clone(),
        );
        registry.register(
            "fairway_health_checks",
            "Active health checks, by result",
            health_checks.clone(),
        );
        registry.register(
            "fairway_retries",
            "Requests sent to another server after a failed try",
            retries.clone(),
        );
        registry.register(
            "fairway_config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "fairway_config_last_reload_successful",
            "Whether the last config reload succeeded (1) or not (0)",
            last_reload_successful.clone(),
        );
        registry.register(
            "fairway_client_connections_active",
            "Open client connections",
            connections_active.clone(),
        );
        registry.register(
            "fairway_client_connections_rejected",
            "Client connections closed at once because max_connections or max_connections_per_ip was reached",
            connections_rejected.clone(),
        );
        registry.register(
            "fairway_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let tls_expiry = Family::<ServerNameLabels, Gauge>::default();
        registry.register(
            "fairway_tls_certificate_expiry_timestamp_seconds",
            "When the certificate served for a name expires, as Unix seconds",
            tls_expiry.clone(),
        );
        let maintenance = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "fairway_upstream_maintenance",
            "Whether an upstream is in maintenance (1) or not (0)",
            maintenance.clone(),
        );
        let dns = Family::<DnsLabels, Counter>::default();
        registry.register(
            "fairway_dns_resolutions",
            "Resolutions of servers given by host name, by result",
            dns.clone(),
        );
        let rate_limited = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "fairway_rate_limited",
            "Requests answered 429 by a route's rate limit, by upstream",
            rate_limited.clone(),
        );
        let sticky_reassignments = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "fairway_sticky_reassignments",
            "Requests whose sticky cookie named a server that could not take them",
            sticky_reassignments.clone(),
        );
        let compressed_family = Family::<AlgorithmLabels, Counter>::default();
        registry.register(
            "fairway_compressed_responses",
            "Responses compressed, by algorithm",
            compressed_family.clone(),
        );
        let compressed = ["zstd", "br", "gzip"].map(|algorithm| {
            (
                algorithm,
                compressed_family.get_or_create_owned(&AlgorithmLabels { algorithm }),
            )
        });
        let bytes_family = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "fairway_compression_bytes",
            "Response body bytes before (in) and after (out) compression",
            bytes_family.clone(),
        );
        let compression_in = bytes_family.get_or_create_owned(&DirectionLabels { direction: "in" });
        let compression_out =
            bytes_family.get_or_create_owned(&DirectionLabels { direction: "out" });
        let process_start_time = process::start_time();
        let start_gauge = Gauge::<f64, AtomicU64>::default();
        start_gauge.set(process_start_time);
        registry.register(
            "fairway_process_start_time_seconds",
            "When the fairway process started, as Unix seconds (it changes with an upgrade)",
            start_gauge,
        );
        registry.register_collector(Box::new(process::ProcessCollector::new(process_start_time)));
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        last_reload_successful.set(1);
        Metrics {
            registry,
            requests,
            duration,
            server_duration,
            healthy,
            active,
            health_checks,
            retries,
            reloads,
            last_reload_successful,
            connections_active,
            process_start_time,
            connections_rejected,
            access_log_dropped,
            tls_expiry,
            maintenance,
            dns,
            rate_limited,
            sticky_reassignments,
            compressed,
            compression_in,
            compression_out,
        }
    }

    /// Counts a response compressed with `algorithm` (`zstd`, `br` or `gzip`).
    pub fn count_compressed(&self, algorithm: &str) {
        if let Some((_, c)) = self.compressed.iter().find(|(a, _)| *a == algorithm) {
            c.inc();
        }
    }

    /// Counts a resolution of a host-name server.
    pub fn record_dns(&self, upstream: &str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.dns
            .get_or_create(&DnsLabels {
                upstream: upstream.to_owned(),
                result,
            })
            .inc();
    }

    /// Sets `fairway_upstream_maintenance` for one upstream.
    pub fn set_maintenance(&self, upstream: &str, on: bool) {
        self.maintenance
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(on));
    }

    /// Replaces the certificate expiry series.
    pub fn set_tls_expiries(&self, expiries: &[(String, i64)]) {
        self.tls_expiry.clear();
        for (name, at) in expiries {
            self.tls_expiry
                .get_or_create(&ServerNameLabels {
                    server_name: name.clone(),
                })
                .set(*at);
        }
    }

    /// The exposition in text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Counts a reload.
    pub fn record_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.last_reload_successful.set(i64::from(ok));
    }

    /// Handles for one server of one upstream.
    pub fn server(&self, upstream: &str, addr: &str) -> ServerMetrics {
        let labels = ServerLabels {
            upstream: upstream.to_owned(),
            server: addr.to_owned(),
        };
        let check = |result| {
            self.health_checks.get_or_create_owned(&CheckLabels {
                upstream: upstream.to_owned(),
                server: addr.to_owned(),
                result,
            })
        };
        let healthy = self.healthy.get_or_create_owned(&labels);
        healthy.set(1);
        ServerMetrics {
            codes: CodeCounters::new(self.requests.clone(), upstream, addr),
            duration: self.server_duration.get_or_create_owned(&labels),
            healthy,
            active: self.active.get_or_create_owned(&labels),
            checks_ok: check("success"),
            checks_failed: check("failure"),
        }
    }

    /// Handles for one upstream (in one snapshot).
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let labels = UpstreamLabels {
            upstream: name.to_owned(),
        };
        UpstreamMetrics {
            duration: self.duration.get_or_create_owned(&labels),
            retries: self.retries.get_or_create_owned(&labels),
            rate_limited: self.rate_limited.get_or_create_owned(&labels),
            sticky_reassignments: self.sticky_reassignments.get_or_create_owned(&labels),
            no_server: CodeCounters::new(self.requests.clone(), name, NO_SERVER),
        }
    }

    /// `fairway_requests_total{upstream="none",server="none"}`, for requests no route matched.
    pub fn no_route(&self) -> CodeCounters {
        CodeCounters::new(self.requests.clone(), NO_SERVER, NO_SERVER)
    }

    /// Removes every series of a server that left the config.
    pub fn forget_server(&self, upstream: &str, addr: &str, m: &ServerMetrics) {
        let labels = ServerLabels {
            upstream: upstream.to_owned(),
            server: addr.to_owned(),
        };
        self.healthy.remove(&labels);
        self.active.remove(&labels);
        self.server_duration.remove(&labels);
        for result in ["success", "failure"] {
            self.health_checks.remove(&CheckLabels {
                upstream: upstream.to_owned(),
                server: addr.to_owned(),
                result,
            });
        }
        m.codes.forget();
    }

    /// Removes every series of an upstream that left the config.
    pub fn forget_upstream(&self, name: &str, m: &UpstreamMetrics) {
        let labels = UpstreamLabels {
            upstream: name.to_owned(),
        };
        self.duration.remove(&labels);
        self.retries.remove(&labels);
        self.rate_limited.remove(&labels);
        self.sticky_reassignments.remove(&labels);
        self.maintenance.remove(&labels);
        for result in ["success", "failure"] {
            self.dns.remove(&DnsLabels {
                upstream: name.to_owned(),
                result,
            });
        }
        m.no_server.forget();
    }
}

/// Per-server handles.
#[derive(Debug)]
pub struct ServerMetrics {
    /// `fairway_requests_total` by code.
    pub codes: CodeCounters,
    /// `fairway_upstream_server_request_duration_seconds`.
    pub duration: DurationHistogram,
    /// `fairway_upstream_server_healthy`.
    pub healthy: Gauge,
    /// `fairway_upstream_active_requests`.
    pub active: WorkerGauge,
    /// `fairway_health_checks_total{result="success"}`.
    pub checks_ok: Counter,
    /// `fairway_health_checks_total{result="failure"}`.
    pub checks_failed: Counter,
}

/// Per-upstream handles.
#[derive(Debug)]
pub struct UpstreamMetrics {
    /// `fairway_request_duration_seconds`.
    pub duration: DurationHistogram,
    /// `fairway_retries_total`.
    pub retries: Counter,
    /// `fairway_rate_limited_total`.
    pub rate_limited: Counter,
    /// `fairway_sticky_reassignments_total`.
    pub sticky_reassignments: Counter,
    /// `fairway_requests_total{server="none"}`.
    pub no_server: CodeCounters,
}

/// `fairway_requests_total` for one (upstream, server): one lazily created counter per status
/// code, so the label set is formatted once per code, never per request.
pub struct CodeCounters {
    family: Family<RequestLabels, WorkerCounter>,
    upstream: String,
    server: String,
    table: Box<[OnceLock<WorkerCounter>]>,
    /// Set once the server left the config: late responses must not bring its series back.
    forgotten: std::sync::atomic::AtomicBool,
    /// Orders series creation against `forget` (taken only on those rare paths).
    lifecycle: std::sync::Mutex<()>,
}

impl std::fmt::Debug for CodeCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeCounters")
            .field("upstream", &self.upstream)
            .field("server", &self.server)
            .finish()
    }
}

impl CodeCounters {
    fn new(
        family: Family<RequestLabels, WorkerCounter>,
        upstream: &str,
        server: &str,
    ) -> CodeCounters {
        CodeCounters {
            family,
            upstream: upstream.to_owned(),
            server: server.to_owned(),
            table: (0..600).map(|_| OnceLock::new()).collect(),
            forgotten: std::sync::atomic::AtomicBool::new(false),
            lifecycle: std::sync::Mutex::new(()),
        }
    }

    /// Counts one response with status `code`.
    pub fn inc(&self, code: u16) {
        let i = usize::from(code).min(599);
        self.table[i]
            .get_or_init(|| {
                // First response with this code: create the series, unless the server has
                // left the config (then count into a detached counter nobody exports).
                let _one = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
                if self.forgotten.load(std::sync::atomic::Ordering::Relaxed) {
                    return WorkerCounter::default();
                }
                self.family.get_or_create_owned(&RequestLabels {
                    upstream: self.upstream.clone(),
                    server: self.server.clone(),
                    code,
                })
            })
            .inc();
    }

    /// Total responses counted.
    pub fn total(&self) -> u64 {
        Self::sum(&self.table)
    }

    /// Responses counted with a 5xx status.
    pub fn server_errors(&self) -> u64 {
        Self::sum(&self.table[500..])
    }

    fn sum(counters: &[OnceLock<WorkerCounter>]) -> u64 {
        counters
            .iter()
            .filter_map(|c| c.get())
            .map(|c| c.get())
            .sum()
    }

    fn forget(&self) {
        let _one = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.forgotten
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for (code, c) in self.table.iter().enumerate() {
            if c.get().is_some() {
                self.family.remove(&RequestLabels {
                    upstream: self.upstream.clone(),
                    server: self.server.clone(),
                    code: code as u16,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_contract_names() {
        let m = Metrics::new();
        let s = m.server("app", "127.0.0.1:1");
        let u = m.upstream("app");
        s.codes.inc(200);
        s.codes.inc(200);
        u.no_server.inc(503);
        u.duration.observe(0.002);
        s.duration.observe(0.002);
        s.codes.inc(503);
        let text = m.encode();
        for name in [
            "fairway_requests_total{upstream=\"app\",server=\"127.0.0.1:1\",code=\"200\"} 2",
            "fairway_upstream_server_request_duration_seconds_count{upstream=\"app\",server=\"127.0.0.1:1\"} 1",
            "fairway_upstream_server_request_duration_seconds_bucket{upstream=\"app\",server=\"127.0.0.1:1\",le=\"0.0025\"} 1",
            "fairway_upstream_server_request_duration_seconds_bucket{upstream=\"app\",server=\"127.0.0.1:1\",le=\"0.001\"} 0",
            "fairway_process_start_time_seconds ",
            "fairway_requests_total{upstream=\"app\",server=\"none\",code=\"503\"} 1",
            "fairway_request_duration_seconds_count{upstream=\"app\"} 1",
            "fairway_upstream_server_healthy{upstream=\"app\",server=\"127.0.0.1:1\"} 1",
            "fairway_upstream_active_requests{upstream=\"app\",server=\"127.0.0.1:1\"} 0",
            "fairway_health_checks_total{upstream=\"app\",server=\"127.0.0.1:1\",result=\"failure\"} 0",
            "fairway_retries_total{upstream=\"app\"} 0",
            "fairway_config_reloads_total{result=\"failure\"} 0",
            "fairway_config_last_reload_successful 1",
            "fairway_client_connections_active 0",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        assert_eq!(s.codes.total(), 3);
        assert_eq!(s.codes.server_errors(), 1);
    }

    #[test]
    fn forgotten_servers_leave_the_exposition() {
        let m = Metrics::new();
        let s = m.server("app", "10.0.0.1:1");
        s.codes.inc(502);
        m.forget_server("app", "10.0.0.1:1", &s);
        let text = m.encode();
        assert!(!text.contains("10.0.0.1:1"), "{text}");
    }
}
