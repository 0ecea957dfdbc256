//! An [`Upstream`]: a named pool of servers as one runtime snapshot sees it — its members
//! (server, weight, backup), its balancers and its retry and pool settings.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balance::{self, Balancer, LeastRequest, Ring, SmoothWrr};
use crate::client::PoolSettings;
use crate::config::{BalanceKind, UpstreamSection};
use crate::health::HealthCheck;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::server::{PassivePolicy, Server};
use crate::sticky::{Sticky, server_id};
use crate::timing::fast_random;
use crate::tls::UpstreamTls;

/// A server as listed in one snapshot.
#[derive(Debug)]
pub struct Member {
    /// The long-lived server.
    pub server: Arc<Server>,
    /// Share of traffic.
    pub weight: u32,
    /// Used only when no primary is available.
    pub backup: bool,
}

/// A named pool of servers.
#[derive(Debug)]
pub struct Upstream {
    /// The name in `[upstreams.NAME]`.
    pub name: Arc<str>,
    /// The balancing method.
    pub balance: BalanceKind,
    /// Servers in config order.
    pub members: Vec<Member>,
    primary: Balancer,
    backup: Option<Balancer>,
    /// Further servers to try after a failed try.
    pub retries: u32,
    /// Connection pool settings.
    pub pool: PoolSettings,
    /// Active checks, if configured.
    pub health_check: Option<HealthCheck>,
    /// How failed exchanges take a server out (`max_fails`, `fail_timeout`).
    pub passive: PassivePolicy,
    /// Ramp-up time of a server that comes back.
    pub slow_start: Option<Duration>,
    /// Route to every server when none is healthy.
    pub fail_open: bool,
    /// TLS towards the servers, with `tls = true`.
    pub tls: Option<Arc<UpstreamTls>>,
    /// `hash_prefix_v4`, `hash_prefix_v6`.
    pub hash_prefix: (u8, u8),
    /// The body of maintenance answers.
    pub maintenance_page: Option<bytes::Bytes>,
    /// Metric handles.
    pub metrics: UpstreamMetrics,
    /// `max_connections_per_server`.
    pub max_per_server: Option<u64>,
    /// `max_pending`.
    pub max_pending: Option<usize>,
    /// Requests waiting for a new connection; shared by the snapshots of this upstream.
    pub pending: Arc<std::sync::atomic::AtomicUsize>,
    /// Sticky sessions, with `[upstreams.NAME.sticky]`.
    pub sticky: Option<StickyPool>,
}

/// An upstream's sticky cookie and its members' ids.
#[derive(Debug)]
pub struct StickyPool {
    /// The cookie.
    pub cookie: Sticky,
    /// The id of each member, in member order.
    pub ids: Vec<Box<str>>,
}

impl StickyPool {
    /// The member a cookie value names, if any.
    pub fn member(&self, value: &[u8]) -> Option<usize> {
        self.ids.iter().position(|id| id.as_bytes() == value)
    }
}

/// What building an upstream needs besides its config section.
pub struct Inputs<'a> {
    /// `server.connect_timeout`.
    pub connect_timeout: Duration,
    /// The metric families.
    pub metrics: &'a Metrics,
    /// TLS towards the servers.
    pub tls: Option<Arc<UpstreamTls>>,
    /// The maintenance page body.
    pub maintenance_page: Option<bytes::Bytes>,
    /// Addresses of host-name servers.
    pub resolved: &'a crate::resolve::Resolved,
    /// The pending-request counter of the previous snapshot's upstream of that name.
    pub pending: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Upstream {
    /// Builds the snapshot view of an upstream; `server_for(addr, name)` yields the long-lived
    /// server (reused from the previous snapshot when it was there).
    pub fn build(
        name: &str,
        section: &UpstreamSection,
        inputs: Inputs<'_>,
        mut server_for: impl FnMut(&str, &str) -> Arc<Server>,
    ) -> Upstream {
        let Inputs {
            connect_timeout,
            metrics,
            tls,
            maintenance_page,
            resolved,
            pending,
        } = inputs;
        // A host-name entry becomes one member per resolved address (as `IP:PORT`); until
        // it resolves, one member that resolves on each connect.
        let mut members: Vec<Member> = Vec::new();
        for e in &section.servers {
            match resolved.get(&(name.to_owned(), e.addr.clone())) {
                Some(addrs) => {
                    for a in addrs {
                        members.push(Member {
                            server: server_for(&a.to_string(), &e.addr),
                            weight: e.weight,
                            backup: e.backup,
                        });
                    }
                }
                None => members.push(Member {
                    server: server_for(&e.addr, &e.addr),
                    weight: e.weight,
                    backup: e.backup,
                }),
            }
        }
        let make = |backup: bool| -> Option<Balancer> {
            let chosen: Vec<(usize, &Member)> = members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.backup == backup)
                .collect();
            if chosen.is_empty() {
                return None;
            }
            Some(match section.balance {
                BalanceKind::RoundRobin => Balancer::RoundRobin(SmoothWrr::new(
                    chosen.iter().map(|(i, m)| (*i, m.weight)).collect(),
                )),
                BalanceKind::LeastRequest => Balancer::LeastRequest(LeastRequest::new(
                    chosen.iter().map(|(i, m)| (*i, m.weight)).collect(),
                )),
                BalanceKind::IpHash => Balancer::IpHash(Ring::new(
                    &chosen
                        .iter()
                        .map(|(i, m)| (*i, &*m.server.addr, m.weight))
                        .collect::<Vec<_>>(),
                )),
            })
        };
        let primary =
            make(false).unwrap_or_else(|| Balancer::RoundRobin(SmoothWrr::new(Vec::new())));
        let backup = make(true);
        let sticky = section.sticky.as_ref().map(|s| StickyPool {
            cookie: Sticky::new(s),
            ids: members
                .iter()
                .map(|m| server_id(name, &m.server.addr))
                .collect(),
        });
        Upstream {
            sticky,
            name: Arc::from(name),
            balance: section.balance,
            primary,
            backup,
            members,
            retries: section.retries,
            pool: PoolSettings {
                max_idle: section.max_idle_per_server,
                idle_timeout: section.pool_idle_timeout.0,
                connect_timeout,
                resolver: section.resolver.map(|a| a.0),
            },
            metrics: metrics.upstream(name),
            health_check: section.health_check.as_ref().map(|h| HealthCheck {
                resolver: section.resolver.map(|a| a.0),
                ..HealthCheck::from_section(h)
            }),
            passive: PassivePolicy {
                max_fails: section.passive.max_fails.unwrap_or_else(|| {
                    section
                        .health_check
                        .as_ref()
                        .map_or(3, |h| h.unhealthy_threshold)
                }),
                fail_timeout: section
                    .passive
                    .fail_timeout
                    .map_or(Duration::from_secs(10), |d| d.0),
                has_active_check: section.health_check.is_some(),
            },
            slow_start: section.slow_start.map(|d| d.0),
            fail_open: section.fail_open,
            tls,
            hash_prefix: (section.hash_prefix_v4, section.hash_prefix_v6),
            maintenance_page,
            max_per_server: section.max_connections_per_server.map(|n| n as u64),
            max_pending: section.max_pending,
            pending: pending.unwrap_or_default(),
        }
    }

    /// Chooses a member for a request from `client_ip`, skipping members in `tried` and
    /// servers that are down. Backups are chosen only when no primary is left. A server in
    /// slow start is passed over with a probability that falls as it warms up. With
    /// `fail_open` and every server down, health is ignored.
    pub fn select(&self, client_ip: IpAddr, tried: &[usize]) -> Option<usize> {
        let key = match self.balance {
            BalanceKind::IpHash => {
                balance::client_key_grouped(client_ip, self.hash_prefix.0, self.hash_prefix.1)
            }
            BalanceKind::RoundRobin | BalanceKind::LeastRequest => 0,
        };
        let load = |i: usize| self.members[i].server.active_requests();
        let available = |i: usize| self.can_take(i, tried);
        let pick = |ok: &dyn Fn(usize) -> bool| {
            self.primary
                .pick(key, ok, load)
                .or_else(|| self.backup.as_ref().and_then(|b| b.pick(key, ok, load)))
        };
        if let Some(ramp) = self
            .slow_start
            .filter(|_| self.balance != BalanceKind::IpHash)
        {
            let warm = |i: usize| available(i) && self.is_warm_enough(i, ramp);
            if let Some(m) = pick(&warm) {
                return Some(m);
            }
        }
        if let Some(m) = pick(&available) {
            return Some(m);
        }
        if self.fail_open && !self.has_healthy_server() {
            return pick(&|i: usize| !tried.contains(&i) && !self.members[i].server.is_draining());
        }
        None
    }

    /// Whether member `i` can take a request now: not tried yet, healthy, not draining, and
    /// below `max_connections_per_server`.
    pub fn can_take(&self, i: usize, tried: &[usize]) -> bool {
        let s = &self.members[i].server;
        !tried.contains(&i)
            && s.is_available()
            && self
                .max_per_server
                .is_none_or(|max| s.active_requests() < max)
    }

    /// Slow start: a server up for `t` of `ramp` is taken with probability `t / ramp` (at
    /// least 10%, as Envoy's default minimum weight).
    fn is_warm_enough(&self, i: usize, ramp: Duration) -> bool {
        let Some(up) = self.members[i].server.health.up_for() else {
            return true;
        };
        if up >= ramp {
            return true;
        }
        let share = (up.as_secs_f64() / ramp.as_secs_f64()).max(0.1);
        (fast_random() % 10_000) as f64 / 10_000.0 < share
    }

    /// Whether every available server is at `max_connections_per_server`.
    pub fn is_saturated(&self) -> bool {
        let Some(max) = self.max_per_server else {
            return false;
        };
        self.members
            .iter()
            .filter(|m| m.server.is_available())
            .all(|m| m.server.active_requests() >= max)
    }

    /// Whether any server could take a request now (healthy and not draining).
    pub fn has_healthy_server(&self) -> bool {
        self.members.iter().any(|m| m.server.is_available())
    }
}
