//! The runtime snapshot: an immutable view of one validated config (routes, upstreams,
//! settings) that a request loads once and uses to the end. A reload builds a new one,
//! reusing the long-lived servers of the previous snapshot, and swaps it in.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::Config;
use crate::error::{ConfigError, KeyPath};
use crate::metrics::{CodeCounters, Metrics};
use crate::policy::{Compression, RoutePolicy};
use crate::route::{RouteSpec, RouteTable};
use crate::server::Server;
use crate::tls::TlsMaterial;
use crate::upstream::{Inputs, Upstream};

/// What a config names on disk (certificates, keys, CA bundles, maintenance pages), read
/// before a snapshot is built so that building stays pure.
#[derive(Debug, Default, Clone)]
pub struct Files {
    /// TLS material.
    pub tls: TlsMaterial,
    /// Maintenance page bodies by upstream name.
    pub pages: HashMap<String, Bytes>,
    /// Addresses of servers given by host name.
    pub resolved: crate::resolve::Resolved,
}

/// Largest maintenance page read into memory.
const MAX_PAGE: u64 = 1 << 20;

impl Files {
    /// Reads every file `cfg` names (relative paths start at the config's directory).
    /// `strict` refuses certificates that are expired or not yet valid.
    pub fn load(cfg: &Config, config_path: &Path, strict: bool) -> Result<Files, ConfigError> {
        let tls = crate::tls::load(cfg, config_path, strict)?;
        let mut pages = HashMap::new();
        for (name, u) in &cfg.upstreams {
            let Some(page) = &u.maintenance_page else {
                continue;
            };
            let path = crate::tls::resolve(config_path, page);
            let key = || Some(KeyPath::root().k("upstreams").k(name).k("maintenance_page"));
            let meta = std::fs::metadata(&path).map_err(|e| {
                ConfigError::other(
                    config_path,
                    key(),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if meta.len() > MAX_PAGE {
                return Err(ConfigError::other(
                    config_path,
                    key(),
                    format!(
                        "{} is larger than 1MiB: keep maintenance pages small",
                        path.display()
                    ),
                ));
            }
            let body = std::fs::read(&path).map_err(|e| {
                ConfigError::other(
                    config_path,
                    key(),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            pages.insert(name.clone(), Bytes::from(body));
        }
        Ok(Files {
            tls,
            pages,
            resolved: crate::resolve::Resolved::new(),
        })
    }

    /// Every file a config names, for the watcher.
    pub fn paths(cfg: &Config, config_path: &Path) -> Vec<std::path::PathBuf> {
        let mut out = crate::tls::files(cfg, config_path);
        for u in cfg.upstreams.values() {
            if let Some(p) = &u.maintenance_page {
                out.push(crate::tls::resolve(config_path, p));
            }
        }
        out
    }
}

/// Proxy-wide settings from `[server]`, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// TCP connect to an upstream server.
    pub connect_timeout: Duration,
    /// From the request being sent until the response head.
    pub request_timeout: Duration,
    /// Idle client keep-alive connection.
    pub idle_timeout: Duration,
    /// Client request head.
    pub header_read_timeout: Duration,
    /// Pause between reads of a request body.
    pub body_read_timeout: Duration,
    /// Upgraded tunnel with no traffic.
    pub tunnel_idle_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: Option<u64>,
    /// Graceful drain.
    pub shutdown_timeout: Duration,
    /// Pause between reads of an upstream response body.
    pub response_body_idle_timeout: Duration,
    /// Longest time a client may accept no byte of its response (`send_timeout`).
    pub send_timeout: Duration,
    /// Open client connections past which new ones are closed at once.
    pub max_connections: usize,
    /// Whether client connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// `[log] access`.
    pub access_log: crate::config::AccessFormat,
    /// Forward and return `X-Request-Id`.
    pub request_id: bool,
    /// Open client connections per client IP (0: no limit).
    pub max_connections_per_ip: usize,
}

/// One immutable config snapshot.
#[derive(Debug)]
pub struct Runtime {
    /// 1 for the first config, +1 per successful reload.
    pub version: u64,
    /// The config this snapshot was built from.
    pub config: Arc<Config>,
    /// `[server]` settings.
    pub settings: Settings,
    /// `trusted_proxies`.
    pub trusted: Vec<IpNet>,
    /// Request → upstream index.
    pub routes: RouteTable,
    /// What each `[[routes]]` entry adds (compression, rate limit, header rules), in config
    /// order.
    pub policies: Vec<RoutePolicy>,
    /// `[compression]` when enabled: for requests that no `[[routes]]` entry routed (the
    /// only upstream without routes).
    pub compression: Option<Arc<Compression>>,
    /// Upstreams in name order.
    pub upstreams: Vec<Upstream>,
    /// TLS on the client listeners, with `[server.tls]`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The files and addresses this snapshot was built from (kept to rebuild it when DNS
    /// answers change).
    pub files: Files,
    /// `fairway_requests_total{upstream="none",server="none"}`: requests no route matched.
    pub no_route: CodeCounters,
}

impl Runtime {
    /// The snapshot before the first config is applied: no upstreams, no routes, every
    /// default, version 0 (so the first config in force is version 1).
    pub fn before_start(metrics: &Metrics) -> Runtime {
        let mut rt = Runtime::build(Config::empty(), None, metrics, Files::default());
        rt.version = 0;
        rt
    }

    /// Builds a snapshot from a validated config. Servers that `prev` already has (same
    /// upstream, same `addr`) are reused with their health and pool. Pure: binds nothing,
    /// spawns nothing.
    pub fn build(
        config: Config,
        prev: Option<&Runtime>,
        metrics: &Metrics,
        files: Files,
    ) -> Runtime {
        let kept = files.clone();
        let Files {
            tls,
            mut pages,
            resolved,
        } = files;
        let s = &config.server;
        let settings = Settings {
            connect_timeout: s.connect_timeout.0,
            request_timeout: s.request_timeout.0,
            idle_timeout: s.idle_timeout.0,
            header_read_timeout: s.header_read_timeout.0,
            body_read_timeout: s.body_read_timeout.0,
            tunnel_idle_timeout: s.tunnel_idle_timeout.0,
            max_header_bytes: usize::try_from(s.max_header_bytes.0).unwrap_or(usize::MAX),
            max_body_bytes: s.max_body_bytes.map(|b| b.0),
            shutdown_timeout: s.shutdown_timeout.0,
            response_body_idle_timeout: s.response_body_idle_timeout.0,
            send_timeout: s.send_timeout.0,
            max_connections: s.max_connections,
            proxy_protocol: s.proxy_protocol,
            access_log: config.log.access,
            request_id: s.request_id,
            max_connections_per_ip: s.max_connections_per_ip,
        };
        let trusted = s.trusted_proxies.iter().map(|c| c.0).collect();
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|(name, section)| {
                let upstream_tls = tls.upstreams.get(name).cloned();
                let inputs = Inputs {
                    connect_timeout: settings.connect_timeout,
                    metrics,
                    tls: upstream_tls,
                    maintenance_page: pages.remove(name),
                    resolved: &resolved,
                    pending: prev
                        .and_then(|p| p.upstreams.iter().find(|u| &*u.name == name.as_str()))
                        .map(|u| Arc::clone(&u.pending)),
                };
                Upstream::build(name, section, inputs, |addr, written| {
                    prev.and_then(|p| p.find_server(name, addr))
                        .cloned()
                        .unwrap_or_else(|| {
                            let s = Server::new(name, addr, written, metrics);
                            if prev.is_some_and(|p| p.version > 0) {
                                // Added by a reload (not the first config): slow start
                                // ramps it.
                                s.health.mark_new();
                            }
                            Arc::new(s)
                        })
                })
            })
            .collect();
        let names: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
        let specs: Vec<RouteSpec<'_>> = config
            .routes
            .iter()
            .filter_map(|r| {
                Some(RouteSpec {
                    host: r.host.as_deref(),
                    path_prefix: &r.path_prefix,
                    upstream: names.iter().position(|&x| x == r.upstream)?,
                })
            })
            .collect();
        let routes = RouteTable::build(&specs, upstreams.len());
        let compression = Arc::new(Compression::new(&config.compression));
        let enabled = config.compression.enabled;
        let policies = config
            .routes
            .iter()
            .map(|r| {
                RoutePolicy::build(
                    r,
                    (&compression, enabled),
                    s.rate_limit_max_keys,
                    prev.map_or(&[][..], |p| &p.policies),
                )
            })
            .collect();
        metrics.set_tls_expiries(tls.server.as_ref().map_or(&[][..], |t| &t.expiries));
        Runtime {
            version: prev.map_or(1, |p| p.version + 1),
            tls: tls.server.map(|t| t.config),
            files: kept,
            settings,
            trusted,
            routes,
            policies,
            compression: enabled.then_some(compression),
            upstreams,
            no_route: metrics.no_route(),
            config: Arc::new(config),
        }
    }

    /// The long-lived server `addr` of upstream `upstream`, if this snapshot lists it.
    pub fn find_server(&self, upstream: &str, addr: &str) -> Option<&Arc<Server>> {
        self.upstreams
            .iter()
            .find(|u| &*u.name == upstream)?
            .members
            .iter()
            .find(|m| &*m.server.addr == addr)
            .map(|m| &m.server)
    }

    /// Removes the metric series of servers and upstreams that `self` has and `next` has
    /// not.
    pub fn forget_removed(&self, next: &Runtime, metrics: &Metrics) {
        for u in &self.upstreams {
            let kept = next.upstreams.iter().any(|n| n.name == u.name);
            for m in &u.members {
                if next.find_server(&u.name, &m.server.addr).is_none() {
                    metrics.forget_server(&u.name, &m.server.addr, &m.server.metrics);
                }
            }
            if !kept {
                metrics.forget_upstream(&u.name, &u.metrics);
            }
        }
    }

    /// Every server of every upstream.
    pub fn servers(&self) -> impl Iterator<Item = (&Upstream, &Arc<Server>)> {
        self.upstreams
            .iter()
            .flat_map(|u| u.members.iter().map(move |m| (u, &m.server)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(servers: &str) -> Config {
        crate::config::parse(
            Path::new("t.toml"),
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = {servers}\n"),
        )
        .unwrap()
    }

    #[test]
    fn servers_that_stay_are_reused_across_snapshots() {
        let m = Metrics::new();
        let a = Runtime::build(
            cfg(r#"["127.0.0.1:1", "127.0.0.1:2"]"#),
            None,
            &m,
            Files::default(),
        );
        a.find_server("app", "127.0.0.1:1")
            .unwrap()
            .health
            .record_failure(1);
        let b = Runtime::build(
            cfg(r#"[{ addr = "127.0.0.1:1", weight = 5 }, "127.0.0.1:3"]"#),
            Some(&a),
            &m,
            Files::default(),
        );
        assert_eq!(b.version, 2);
        let kept = b.find_server("app", "127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(
            kept,
            a.find_server("app", "127.0.0.1:1").unwrap()
        ));
        assert!(!kept.is_healthy());
        assert!(b.find_server("app", "127.0.0.1:2").is_none());
        assert!(b.find_server("app", "127.0.0.1:3").unwrap().is_healthy());
        assert_eq!(b.upstreams[0].members[0].weight, 5);
    }
}
