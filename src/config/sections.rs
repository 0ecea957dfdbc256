//! The raw sections of the configuration file (CONTRACT §2): one struct per TOML table,
//! with a `Section` suffix, `deny_unknown_fields` and the contract's defaults. Serde fills
//! them from the text; `validate.rs` then checks what serde cannot, and `Runtime::build`
//! turns the result into the runtime types.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::traffic::{CompressionSection, HeaderRulesSection, RateLimitSection, StickySection};
use super::units::{AccessFormat, Addr, BalanceKind, ByteSize, Cidr, Dur, Listen, StatusRange};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the client listener and proxy-wide timeouts.
    pub server: ServerSection,
    /// `[admin]`: the admin listener.
    #[serde(default)]
    pub admin: AdminSection,
    /// `[upstreams.NAME]`: the pools of servers, by name.
    pub upstreams: BTreeMap<String, UpstreamSection>,
    /// `[[routes]]`: which requests go to which upstream.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: LogSection,
    /// `[compression]`: response compression.
    #[serde(default)]
    pub compression: CompressionSection,
}

impl Config {
    /// The config before any file is read: no listeners, no upstreams, every default.
    pub fn empty() -> Config {
        toml::from_str("[server]\nlisten = []\n[upstreams]\n")
            .expect("the empty config deserializes")
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Addresses to accept client connections on.
    pub listen: Listen,
    /// HTTPS on every listen address.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// TCP connect to an upstream server.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// From sending the request upstream until the response head arrives.
    #[serde(default = "defaults::request_timeout")]
    pub request_timeout: Dur,
    /// An idle client keep-alive connection is closed after this.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Dur,
    /// A client must finish sending a request head within this.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Dur,
    /// Longest pause between reads of a request body.
    #[serde(default = "defaults::body_read_timeout")]
    pub body_read_timeout: Dur,
    /// An upgraded tunnel with no bytes either way for this long is closed.
    #[serde(default = "defaults::tunnel_idle_timeout")]
    pub tunnel_idle_timeout: Dur,
    /// Largest request head; larger gets 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Largest request body; larger gets 413.
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    /// Graceful drain on SIGTERM.
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// Peers whose `X-Forwarded-*` headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// An extra plain-HTTP listener that answers 308 to `https://`.
    #[serde(default)]
    pub redirect_http: Option<Addr>,
    /// Expect a PROXY protocol (v1 or v2) header on every client connection, from
    /// `trusted_proxies` only.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Open client connections past which new ones are accepted and closed at once.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Longest pause between reads of an upstream response body; past it the client's
    /// response is cut off.
    #[serde(default = "defaults::response_body_idle_timeout")]
    pub response_body_idle_timeout: Dur,
    /// Longest time a client may leave its response (HTTP/1.1) or an HTTP/2 stream unread;
    /// past it the client is cut off and its upstream connection released.
    #[serde(default = "defaults::send_timeout")]
    pub send_timeout: Dur,
    /// Open client connections per client IP past which new ones are closed at once; 0 is
    /// no limit.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// Most rate-limit buckets kept per route.
    #[serde(default = "defaults::rate_limit_max_keys")]
    pub rate_limit_max_keys: usize,
    /// Forward every request with `X-Request-Id` and return it to the client.
    #[serde(default = "defaults::request_id")]
    pub request_id: bool,
}

/// `[server.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain (relative paths start at the config file's directory).
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
    /// Extra certificates chosen by SNI; the top-level one is the default.
    #[serde(default)]
    pub certs: Vec<SniCertSection>,
}

/// `[[server.tls.certs]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertSection {
    /// Names this certificate is served for: exact, or `*.example.com`.
    pub server_names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin listener; none turns it off.
    #[serde(default)]
    pub listen: Option<Addr>,
    /// Bearer token required on non-GET admin requests.
    #[serde(default)]
    pub token: Option<String>,
    /// Host names, besides IP literals and `localhost`, accepted in the `Host` of an admin
    /// request other than GET and HEAD (CONTRACT §7); any other name gets 403, which stops
    /// DNS rebinding.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A tracing filter (`info`, `fairway=debug`); `RUST_LOG` wins when set.
    #[serde(default)]
    pub level: Option<String>,
    /// One line per request on stdout.
    #[serde(default)]
    pub access: AccessFormat,
}

/// `[upstreams.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// How a server is chosen.
    #[serde(default)]
    pub balance: BalanceKind,
    /// The servers of the pool.
    pub servers: Vec<ServerEntry>,
    /// Further servers tried when a try fails (CONTRACT §2 `retries`).
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Pooled idle keep-alive connections to each server.
    #[serde(default = "defaults::max_idle_per_server")]
    pub max_idle_per_server: usize,
    /// A pooled connection idle this long is closed.
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Dur,
    /// Active health checks.
    #[serde(default)]
    pub health_check: Option<HealthCheckSection>,
    /// Passive failure detection.
    #[serde(default)]
    pub passive: PassiveSection,
    /// A server that comes back (or is added) ramps up to its full weight over this long.
    #[serde(default)]
    pub slow_start: Option<Dur>,
    /// When every server is down, route to all of them instead of answering 503.
    #[serde(default)]
    pub fail_open: bool,
    /// Connect to the servers over TLS.
    #[serde(default)]
    pub tls: bool,
    /// PEM CA bundle that server certificates must chain to (default: the system's roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name sent in SNI and checked against the server certificate (default: the host of
    /// each server's `addr`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Accept any server certificate. Dangerous: for testing only.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// `ip_hash` groups IPv4 clients by this prefix length (Nginx uses 24).
    #[serde(default = "defaults::hash_prefix_v4")]
    pub hash_prefix_v4: u8,
    /// `ip_hash` groups IPv6 clients by this prefix length.
    #[serde(default = "defaults::hash_prefix_v6")]
    pub hash_prefix_v6: u8,
    /// A file served as the body of maintenance answers (`POST /maintenance`).
    #[serde(default)]
    pub maintenance_page: Option<PathBuf>,
    /// DNS server (`IP:PORT`) for servers given by host name; the system's when unset.
    #[serde(default)]
    pub resolver: Option<Addr>,
    /// How often host names are resolved again.
    #[serde(default = "defaults::resolve_interval")]
    pub resolve_interval: Dur,
    /// Requests in flight to one server past which it is not chosen (circuit breaking).
    #[serde(default)]
    pub max_connections_per_server: Option<usize>,
    /// Requests waiting for a new upstream connection past which more get 503 at once.
    #[serde(default)]
    pub max_pending: Option<usize>,
    /// Sticky sessions by cookie.
    #[serde(default)]
    pub sticky: Option<StickySection>,
}

/// One entry of `servers`: a table or a plain `"host:port"` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    /// `host:port` as written; the server's identity and its `server` metric label.
    pub addr: String,
    /// Share of traffic relative to the others.
    pub weight: u32,
    /// Used only when no primary server is available.
    pub backup: bool,
}

impl<'de> Deserialize<'de> for ServerEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            addr: String,
            #[serde(default = "one")]
            weight: u32,
            #[serde(default)]
            backup: bool,
        }
        fn one() -> u32 {
            1
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServerEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a \"host:port\" string or a table { addr = \"host:port\", weight = N, backup = BOOL }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ServerEntry, E> {
                Ok(ServerEntry {
                    addr: s.to_owned(),
                    weight: 1,
                    backup: false,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ServerEntry, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ServerEntry {
                    addr: t.addr,
                    weight: t.weight,
                    backup: t.backup,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `[upstreams.NAME.health_check]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    /// HTTP GET target.
    #[serde(default = "defaults::health_path")]
    pub path: String,
    /// From the end of one check of a server to the start of the next.
    #[serde(default = "defaults::health_interval")]
    pub interval: Dur,
    /// A check slower than this fails. May be longer than `interval` (CONTRACT §2): checks
    /// of one server run one after another, so they cannot overlap.
    #[serde(default = "defaults::health_timeout")]
    pub timeout: Dur,
    /// Consecutive passes to mark a server up.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures to mark a server down.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passing status range, `"200-399"` or `"200"`.
    #[serde(default = "defaults::expect_status")]
    pub expect_status: StatusRange,
    /// `Host` header of the check; the server's `addr` when unset.
    #[serde(default)]
    pub host: Option<String>,
}

/// `[upstreams.NAME.passive]`: marking servers down from proxied requests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveSection {
    /// Consecutive failed requests that mark a server down; defaults to the health check's
    /// `unhealthy_threshold` (3).
    #[serde(default)]
    pub max_fails: Option<u32>,
    /// Without active checks, a passively downed server is tried again after this.
    #[serde(default)]
    pub fail_timeout: Option<Dur>,
}

/// `[[routes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Exact host or `*.example.com`; none matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Matched on path segments.
    #[serde(default = "defaults::path_prefix")]
    pub path_prefix: String,
    /// Name of an upstream.
    pub upstream: String,
    /// Overrides `[compression] enabled` for this route's requests.
    #[serde(default)]
    pub compression: Option<bool>,
    /// A token bucket per key.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSection>,
    /// Fields set and removed on the request sent upstream.
    #[serde(default)]
    pub request_headers: Option<HeaderRulesSection>,
    /// Fields set and removed on the response sent to the client.
    #[serde(default)]
    pub response_headers: Option<HeaderRulesSection>,
}

mod defaults {
    use super::{ByteSize, Dur, StatusRange};
    use std::time::Duration;

    pub fn connect_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn request_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn idle_timeout() -> Dur {
        Dur(Duration::from_secs(75))
    }
    pub fn header_read_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn body_read_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn tunnel_idle_timeout() -> Dur {
        Dur(Duration::from_secs(3600))
    }
    pub fn shutdown_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_header_bytes() -> ByteSize {
        ByteSize(64 * 1024)
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn max_idle_per_server() -> usize {
        64
    }
    pub fn pool_idle_timeout() -> Dur {
        Dur(Duration::from_secs(4))
    }
    pub fn health_path() -> String {
        "/".to_owned()
    }
    pub fn health_interval() -> Dur {
        Dur(Duration::from_secs(2))
    }
    pub fn health_timeout() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn expect_status() -> StatusRange {
        StatusRange(200, 399)
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn response_body_idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn send_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn resolve_interval() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn hash_prefix_v4() -> u8 {
        32
    }
    pub fn hash_prefix_v6() -> u8 {
        64
    }
    pub fn rate_limit_max_keys() -> usize {
        100_000
    }
    pub fn request_id() -> bool {
        true
    }
    pub fn path_prefix() -> String {
        "/".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{MIN, p};

    #[test]
    fn minimal_config_has_contract_defaults() {
        let c = p(MIN).unwrap();
        assert_eq!(c.server.connect_timeout.0, Duration::from_secs(5));
        assert_eq!(c.server.request_timeout.0, Duration::from_secs(60));
        assert_eq!(c.server.idle_timeout.0, Duration::from_secs(75));
        assert_eq!(c.server.header_read_timeout.0, Duration::from_secs(10));
        assert_eq!(c.server.body_read_timeout.0, Duration::from_secs(60));
        assert_eq!(c.server.tunnel_idle_timeout.0, Duration::from_secs(3600));
        assert_eq!(c.server.max_header_bytes.0, 65536);
        assert_eq!(c.server.max_body_bytes, None);
        assert_eq!(c.server.shutdown_timeout.0, Duration::from_secs(30));
        let u = &c.upstreams["app"];
        assert_eq!(u.balance, BalanceKind::RoundRobin);
        assert_eq!(u.retries, 2);
        assert_eq!(u.max_idle_per_server, 64);
        assert_eq!(u.pool_idle_timeout.0, Duration::from_secs(4));
        assert_eq!(u.servers[0].weight, 1);
        assert_eq!(u.servers[1].weight, 2);
        assert!(!u.servers[1].backup);
    }
}
