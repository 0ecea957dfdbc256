//! A [`Server`]: one `addr` of one upstream, long-lived and shared by every runtime snapshot
//! that lists it, so that its health, its in-flight count and its pooled connections survive
//! a reload. Weight and backup belong to the snapshot (`upstream::Member`), not here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::DropGuard;

use crate::client::{Pool, Target};
use crate::health::{HealthCheck, HealthState, Transition};
use crate::metrics::{Metrics, ServerMetrics};
use crate::tls::UpstreamTls;

/// One server of one upstream.
#[derive(Debug)]
pub struct Server {
    /// The `addr` as written in the config: identity, `server` label, `/status` key.
    pub addr: Arc<str>,
    /// The name of the upstream this server belongs to.
    pub upstream: Arc<str>,
    /// The entry as written in the config: the same as `addr`, or the `host:port` a
    /// resolved address came from. Its host is the TLS name and the health check's `Host`.
    pub name: Arc<str>,
    /// Where connections go.
    pub target: Target,
    /// Up or down, with the consecutive counters.
    pub health: HealthState,
    /// The running active checker and its settings; dropping it stops the checker.
    pub checker: Mutex<Option<Checker>>,
    /// Taken out of rotation by `POST .../drain`: no new requests, in-flight ones finish.
    draining: AtomicBool,
    /// Idle keep-alive connections to this server.
    pub pool: Pool,
    /// Metric handles, resolved once; the active-request gauge is the in-flight count.
    pub metrics: ServerMetrics,
}

impl Server {
    /// A new server; it starts healthy (CONTRACT §2: a fresh start serves at once).
    pub fn new(upstream: &str, addr: &str, name: &str, metrics: &Metrics) -> Server {
        Server {
            addr: Arc::from(addr),
            name: Arc::from(name),
            upstream: Arc::from(upstream),
            target: Target::parse(addr),
            health: HealthState::new(),
            checker: Mutex::new(None),
            draining: AtomicBool::new(false),
            pool: Pool::default(),
            metrics: metrics.server(upstream, addr),
        }
    }

    /// Whether the server may be chosen.
    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// Whether new requests may go to this server: healthy and not draining.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining()
    }

    /// Whether the server is being drained.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts or ends draining; returns whether that changed anything.
    pub fn set_draining(&self, on: bool) -> bool {
        let changed = self.draining.swap(on, Ordering::Relaxed) != on;
        if changed {
            tracing::info!(upstream = %self.upstream, server = %self.addr, draining = on, "drain state changed");
        }
        changed
    }

    /// Publishes and logs a state change (once per change).
    pub fn on_transition(&self, t: Transition, reason: &str) {
        match t {
            Transition::Up => {
                self.metrics.healthy.set(1);
                tracing::info!(upstream = %self.upstream, server = %self.addr, reason, "server is up");
            }
            Transition::Down => {
                self.metrics.healthy.set(0);
                tracing::warn!(upstream = %self.upstream, server = %self.addr, reason, "server is down");
            }
        }
    }

    /// Requests in flight to this server.
    pub fn active_requests(&self) -> u64 {
        self.metrics.active.get().max(0) as u64
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.metrics.active.inc();
        ActiveGuard(Arc::clone(self))
    }
}

/// How passive failures take a server out of rotation (CONTRACT §2; §7
/// `[upstreams.NAME.passive]`), as one snapshot's upstream says.
#[derive(Debug, Clone, Copy)]
pub struct PassivePolicy {
    /// Consecutive failures that mark the server down.
    pub max_fails: u32,
    /// Without active checks, how long a server taken down this way rests.
    pub fail_timeout: Duration,
    /// Whether an active checker brings the server back (otherwise `fail_timeout` does).
    pub has_active_check: bool,
}

impl Server {
    /// Counts a failure of an exchange with this server that the server caused (never
    /// one the client caused). Without active checks, a server taken down this way is
    /// tried again after `fail_timeout`.
    pub fn record_passive_failure(self: &Arc<Self>, policy: PassivePolicy, reason: &str) {
        if self.health.record_passive_failure(policy.max_fails) != Some(Transition::Down) {
            return;
        }
        self.on_transition(Transition::Down, reason);
        if !policy.has_active_check {
            let weak = Arc::downgrade(self);
            // One more failure after the rest takes it down again, as Nginx's max_fails
            // does.
            let streak = policy.max_fails.saturating_sub(1);
            tokio::spawn(async move {
                tokio::time::sleep(policy.fail_timeout).await;
                if let Some(s) = weak.upgrade()
                    && s.health.force_up(streak)
                {
                    s.on_transition(Transition::Up, "fail_timeout passed, trying it again");
                }
            });
        }
    }
}

/// A running active checker: its settings and the guard that stops it when dropped.
#[derive(Debug)]
pub struct Checker {
    /// The check settings it runs with.
    pub settings: HealthCheck,
    /// The TLS settings it connects with.
    pub tls: Option<Arc<UpstreamTls>>,
    /// Stops the task when dropped.
    pub _stop: DropGuard,
}

/// A request in flight to a server; dropped with the response body (or on error), so the
/// count cannot leak on cancellation.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Server>);

impl ActiveGuard {
    /// The server this request went to.
    pub fn server(&self) -> &Arc<Server> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.metrics.active.dec();
    }
}
