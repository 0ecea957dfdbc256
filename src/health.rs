//! Server health: the [`HealthState`] machine (consecutive passes and failures against the
//! thresholds), the active checker task of one server, and the one-shot probe that both the
//! checker and `fairway check --probe` use.
//!
//! Passive detection feeds the same machine: a proxied request whose connect fails or whose
//! connection breaks before the response head is a failure. Only an active check brings a
//! server back; without one, a passively downed server is tried again after `fail_timeout`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use http::{HeaderValue, Method, Request, header};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::body::RequestBody;
use crate::client;
use crate::config::{HealthCheckSection, StatusRange};
use crate::server::{Server, Target};
use crate::tls::UpstreamTls;

/// Active check settings of one upstream, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// GET target.
    pub path: String,
    /// `Host` header; the server's `addr` when none.
    pub host: Option<String>,
    /// Between checks of one server.
    pub interval: Duration,
    /// A check slower than this fails.
    pub timeout: Duration,
    /// Consecutive passes to mark up.
    pub healthy_threshold: u32,
    /// Consecutive failures to mark down.
    pub unhealthy_threshold: u32,
    /// Passing statuses.
    pub expect: StatusRange,
    /// The upstream's `resolver`, for servers given by host name not resolved yet.
    pub resolver: Option<std::net::SocketAddr>,
}

impl HealthCheck {
    /// From the config section.
    pub fn from_section(s: &HealthCheckSection) -> HealthCheck {
        HealthCheck {
            path: s.path.clone(),
            host: s.host.clone(),
            interval: s.interval.0,
            timeout: s.timeout.0,
            healthy_threshold: s.healthy_threshold,
            unhealthy_threshold: s.unhealthy_threshold,
            expect: s.expect_status,
            resolver: None,
        }
    }
}

/// A change of a server's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The server may be chosen again.
    Up,
    /// The server is no longer chosen.
    Down,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[derive(Debug, Default)]
struct Streak {
    passes: u32,
    failures: u32,
}

/// Up/down state with consecutive counters. Reads are one atomic load; transitions are
/// serialised by a short lock (never held across an await).
#[derive(Debug)]
pub struct HealthState {
    healthy: AtomicBool,
    /// Consecutive failed proxied requests; read without the lock on the request path.
    failures: AtomicU32,
    /// Consecutive active check passes and failures. Kept apart from the passive streak so
    /// that traffic that still succeeds cannot hide a failing health endpoint.
    checks: Mutex<Streak>,
    /// Milliseconds since the process epoch at which the server last came up.
    up_since_ms: AtomicU64,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState::new()
    }
}

impl HealthState {
    /// A server that starts up (CONTRACT §2), counted as up "since forever" so that slow
    /// start does not ramp servers present at startup.
    pub fn new() -> HealthState {
        HealthState {
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            checks: Mutex::new(Streak::default()),
            up_since_ms: AtomicU64::new(0),
        }
    }

    /// Whether the server may be chosen.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Consecutive failed proxied requests so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    fn streak(&self) -> std::sync::MutexGuard<'_, Streak> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the server has been up, if it came up after the process started.
    pub fn up_for(&self) -> Option<Duration> {
        let ms = self.up_since_ms.load(Ordering::Relaxed);
        (ms != 0 && self.is_healthy())
            .then(|| epoch().elapsed().saturating_sub(Duration::from_millis(ms)))
    }

    /// Marks a server that was just added as coming up now (slow start ramps it).
    pub fn mark_new(&self) {
        self.up_since_ms.store(now_ms().max(1), Ordering::Relaxed);
    }

    /// A passing active check: `threshold` consecutive ones bring a down server up.
    pub fn record_success(&self, threshold: u32) -> Option<Transition> {
        let mut st = self.streak();
        st.failures = 0;
        if self.is_healthy() {
            st.passes = 0;
            return None;
        }
        st.passes += 1;
        if st.passes >= threshold {
            st.passes = 0;
            self.failures.store(0, Ordering::Relaxed);
            self.set(true);
            return Some(Transition::Up);
        }
        None
    }

    /// A failed active check: `threshold` consecutive ones take a server down.
    pub fn record_failure(&self, threshold: u32) -> Option<Transition> {
        let mut st = self.streak();
        st.passes = 0;
        st.failures += 1;
        if self.is_healthy() && st.failures >= threshold {
            self.set(false);
            return Some(Transition::Down);
        }
        None
    }

    /// A proxied request that failed to connect or broke before the response head:
    /// `threshold` consecutive ones take a server down (CONTRACT §2).
    pub fn record_passive_failure(&self, threshold: u32) -> Option<Transition> {
        let mut st = self.streak();
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.is_healthy() && failures >= threshold {
            st.passes = 0;
            self.set(false);
            return Some(Transition::Down);
        }
        None
    }

    /// A proxied request that got a response head: the passive failure streak ends (it
    /// does not bring a down server up; only active checks do).
    pub fn record_passive_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Brings a server back without checks (health checks removed by a reload, or
    /// `fail_timeout` passed). `failures` is where the passive streak restarts.
    pub fn force_up(&self, failures: u32) -> bool {
        let mut st = self.streak();
        *st = Streak::default();
        self.failures.store(failures, Ordering::Relaxed);
        if self.is_healthy() {
            return false;
        }
        self.set(true);
        true
    }

    fn set(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        if healthy {
            self.up_since_ms.store(now_ms().max(1), Ordering::Relaxed);
        }
    }
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    /// Connecting failed.
    Connect(std::io::Error),
    /// No complete answer within the timeout.
    Timeout,
    /// The connection broke.
    Http(hyper::Error),
    /// The status is outside `expect_status`.
    Status(u16),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                f.write_str("connection refused")
            }
            ProbeError::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                f.write_str("connect timed out")
            }
            ProbeError::Connect(e) => write!(f, "connect failed: {e}"),
            ProbeError::Timeout => f.write_str("timed out"),
            ProbeError::Http(e) => write!(f, "connection broke: {e}"),
            ProbeError::Status(c) => write!(f, "status {c}"),
        }
    }
}

/// Largest health response body read (the rest is not waited for).
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Sends one health check to `target` over its own connection; `Ok(status)` when it passes.
pub async fn probe(
    target: &Target,
    addr: &str,
    hc: &HealthCheck,
    tls: Option<&UpstreamTls>,
) -> Result<u16, ProbeError> {
    let attempt = async {
        let mut conn = client::dial(target, addr, hc.timeout, tls, hc.resolver)
            .await
            .map_err(ProbeError::Connect)?;
        let host = hc.host.as_deref().unwrap_or(addr);
        let mut req = Request::new(RequestBody::Empty);
        *req.method_mut() = Method::GET;
        *req.uri_mut() = hc
            .path
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        if let Ok(h) = HeaderValue::from_str(host) {
            req.headers_mut().insert(header::HOST, h);
        }
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("fairway-health-check"),
        );
        let resp = conn
            .sender
            .send_request(req)
            .await
            .map_err(ProbeError::Http)?;
        let status = resp.status().as_u16();
        // Read (a bounded part of) the body so the server sees a complete exchange.
        let mut body = resp.into_body();
        let mut read = 0usize;
        while read < MAX_PROBE_BODY {
            match body.frame().await {
                Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        if hc.expect.contains(status) {
            Ok(status)
        } else {
            Err(ProbeError::Status(status))
        }
    };
    match tokio::time::timeout(hc.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

/// `fairway check --probe`: one check to every server of every upstream (with the
/// upstream's `health_check` settings, or the defaults). Returns a table to print and
/// whether every upstream has at least one passing server.
pub async fn probe_all(
    cfg: &crate::config::Config,
    tls: &crate::tls::TlsMaterial,
) -> (String, bool) {
    let defaults: HealthCheckSection =
        toml::from_str("").unwrap_or_else(|_| unreachable!("every health_check key has a default"));
    let mut rows = vec![(
        "UPSTREAM".to_owned(),
        "SERVER".to_owned(),
        "RESULT".to_owned(),
    )];
    let mut all_ok = true;
    for (name, u) in &cfg.upstreams {
        let mut hc = HealthCheck::from_section(u.health_check.as_ref().unwrap_or(&defaults));
        hc.resolver = u.resolver.map(|a| a.0);
        let upstream_tls = tls.upstreams.get(name).cloned();
        let mut tasks = Vec::new();
        for e in &u.servers {
            let (hc, addr, t) = (hc.clone(), e.addr.clone(), upstream_tls.clone());
            tasks.push(tokio::spawn(async move {
                let target = Target::parse(&addr);
                let r = probe(&target, &addr, &hc, t.as_deref()).await;
                (addr, r)
            }));
        }
        let mut passing = 0;
        for t in tasks {
            let Ok((addr, result)) = t.await else {
                continue;
            };
            let text = match result {
                Ok(code) => {
                    passing += 1;
                    format!("ok ({code} on {})", hc.path)
                }
                Err(e) => format!("FAIL: {e} ({})", hc.path),
            };
            rows.push((name.clone(), addr, text));
        }
        if passing == 0 {
            all_ok = false;
        }
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (a, b, c) in rows {
        out.push_str(&format!("{a:<w0$}  {b:<w1$}  {c}\n"));
    }
    (out, all_ok)
}

/// `d` scaled by a random factor in [1 - spread, 1 + spread].
fn jitter(d: Duration, spread: f64) -> Duration {
    let r = (crate::timing::fast_random() % 10_000) as f64 / 10_000.0; // [0, 1)
    d.mul_f64(1.0 - spread + 2.0 * spread * r)
}

/// Checks one server until `cancel` fires or the server is gone, one check at a time: the
/// next starts `interval` after the previous one ended. Logs each state change once.
pub async fn run_checker(
    server: Weak<Server>,
    hc: HealthCheck,
    tls: Option<Arc<UpstreamTls>>,
    cancel: CancellationToken,
) {
    // The first check comes soon after start (a fresh start serves at once, CONTRACT §2),
    // spread over a fraction of the interval.
    let mut wait = jitter(hc.interval.min(Duration::from_millis(500)) / 2, 1.0);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // CONTRACT §2: the wait is counted from the end of this check (the sleep above runs
        // after the probe below returned), so checks never overlap whatever `timeout` is.
        // It is never shorter than `interval`, and up to 10% longer so that the checks of
        // many servers do not fire in lockstep.
        wait = hc.interval + jitter(hc.interval / 20, 1.0);
        let Some(s) = server.upgrade() else { return };
        let target = s.target.clone();
        let addr = Arc::clone(&s.name);
        drop(s);
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = probe(&target, &addr, &hc, tls.as_deref()) => r,
        };
        let Some(s) = server.upgrade() else { return };
        match result {
            Ok(_) => {
                s.metrics.checks_ok.inc();
                if s.health.record_success(hc.healthy_threshold) == Some(Transition::Up) {
                    s.on_transition(Transition::Up, "health check passed");
                }
            }
            Err(e) => {
                s.metrics.checks_failed.inc();
                tracing::debug!(upstream = %s.upstream, server = %s.addr, reason = %e, "health check failed");
                if s.health.record_failure(hc.unhealthy_threshold) == Some(Transition::Down) {
                    s.on_transition(Transition::Down, &format!("health check: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_govern_transitions() {
        let h = HealthState::new();
        assert!(h.is_healthy());
        assert_eq!(h.record_failure(3), None);
        assert_eq!(h.record_failure(3), None);
        assert_eq!(h.record_failure(3), Some(Transition::Down));
        assert!(!h.is_healthy());
        assert_eq!(h.record_failure(3), None);
        assert_eq!(h.record_success(2), None);
        assert_eq!(h.record_success(2), Some(Transition::Up));
        assert!(h.is_healthy());
        assert_eq!(h.record_success(2), None);
    }

    #[test]
    fn a_proxied_success_breaks_a_passive_streak_only() {
        let h = HealthState::new();
        h.record_passive_failure(2);
        h.record_passive_success();
        assert_eq!(h.record_passive_failure(2), None);
        assert_eq!(h.record_passive_failure(2), Some(Transition::Down));
        let h = HealthState::new();
        h.record_failure(2);
        h.record_passive_success();
        assert_eq!(
            h.record_failure(2),
            Some(Transition::Down),
            "traffic must not hide failing checks"
        );
    }

    #[test]
    fn a_failure_breaks_a_pass_streak() {
        let h = HealthState::new();
        h.record_failure(1);
        assert_eq!(h.record_success(2), None);
        assert_eq!(h.record_failure(1), None);
        assert_eq!(h.record_success(2), None);
        assert_eq!(h.record_success(2), Some(Transition::Up));
    }

    #[test]
    fn force_up_restarts_the_streak_where_asked() {
        let h = HealthState::new();
        h.record_passive_failure(1);
        assert!(h.force_up(2));
        assert!(h.is_healthy());
        assert_eq!(h.record_passive_failure(3), Some(Transition::Down));
    }

    #[test]
    fn servers_present_at_start_are_not_ramping() {
        let h = HealthState::new();
        assert_eq!(h.up_for(), None);
        h.mark_new();
        assert!(h.up_for().is_some());
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(1000), 0.1);
            assert!(
                d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
                "{d:?}"
            );
        }
    }
}
