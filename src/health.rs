//! Server health: the [`HealthState`] machine (consecutive passes and failures against the
//! thresholds) and the active check's settings ([`HealthCheck`]). The checker task that runs
//! the checks is `checker`.
//!
//! Passive detection feeds the same machine: a proxied request whose connect fails or whose
//! connection breaks before the response head is a failure. Only an active check brings a
//! server back; without one, a passively downed server is tried again after `fail_timeout`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{HealthCheckSection, StatusRange};

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
}
