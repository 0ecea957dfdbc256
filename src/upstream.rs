//! An [`Upstream`]: a named pool of servers as one runtime snapshot sees it — its members
//! (server, weight, backup), its balancers and its retry and pool settings.

use std::net::IpAddr;
use std::sync::Arc;

use crate::balance::{self, Balancer, Ring, SmoothWrr};
use crate::client::PoolSettings;
use crate::config::{BalanceKind, UpstreamSection};
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::server::Server;

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
    /// Metric handles.
    pub metrics: UpstreamMetrics,
}

impl Upstream {
    /// Builds the snapshot view of an upstream; `server_for(addr)` yields the long-lived
    /// server (reused from the previous snapshot when it was there).
    pub fn build(
        name: &str,
        section: &UpstreamSection,
        connect_timeout: std::time::Duration,
        metrics: &Metrics,
        mut server_for: impl FnMut(&str) -> Arc<Server>,
    ) -> Upstream {
        let members: Vec<Member> = section
            .servers
            .iter()
            .map(|e| Member {
                server: server_for(&e.addr),
                weight: e.weight,
                backup: e.backup,
            })
            .collect();
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
        Upstream {
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
            },
            metrics: metrics.upstream(name),
        }
    }

    /// Chooses a member for a request from `client_ip`, skipping members in `tried` and
    /// servers that are down. Backups are chosen only when no primary is left.
    pub fn select(&self, client_ip: IpAddr, tried: &[usize]) -> Option<usize> {
        let key = match self.balance {
            BalanceKind::IpHash => balance::client_key(client_ip),
            BalanceKind::RoundRobin => 0,
        };
        let ok = |i: usize| !tried.contains(&i) && self.members[i].server.is_healthy();
        self.primary
            .pick(key, ok)
            .or_else(|| self.backup.as_ref().and_then(|b| b.pick(key, ok)))
    }

    /// Whether any server could take a request now.
    pub fn has_healthy_server(&self) -> bool {
        self.members.iter().any(|m| m.server.is_healthy())
    }
}
