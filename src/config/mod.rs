//! The configuration file: a serde mirror of the TOML (CONTRACT §2) with defaults, unit
//! parsing (durations, sizes, CIDRs) and the semantic checks that serde cannot express.
//!
//! `load(path)` reads, parses and validates; every failure is a [`ConfigError`] naming the
//! file, the line and column, the key path and what to change. `Runtime::build` turns the
//! validated [`Config`] into the snapshot that serves requests.
//!
//! The value types with their own parsing live in `units`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::error::{ConfigError, KeyPath};

mod units;

pub use units::{
    AccessFormat, Addr, BalanceKind, ByteSize, Cidr, Dur, Listen, StatusRange, parse_duration,
    parse_size, split_host_port,
};

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
    pub fn path_prefix() -> String {
        "/".to_owned()
    }
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

// ---------------------------------------------------------------------------------------
// Loading and validation.

/// Largest weight of one server: keeps the round-robin schedule small.
pub const MAX_WEIGHT: u32 = 1000;

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
    parse(path, &text)
}

/// Parses and validates `text`, naming `path` in errors.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let de =
        toml::Deserializer::parse(text).map_err(|e| ConfigError::toml(path, text, None, &e))?;
    let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = KeyPath::from_serde(e.path());
        ConfigError::toml(path, text, Some(key), e.inner())
    })?;
    cfg.validate()
        .map_err(|(key, message)| ConfigError::at_key(path, text, key, message))?;
    Ok(cfg)
}

impl Config {
    /// Checks what serde cannot: references, duplicates, ranges. On failure gives the key
    /// path and a message that says what to change.
    pub fn validate(&self) -> Result<(), (KeyPath, String)> {
        let key = KeyPath::root;
        let s = &self.server;
        if s.listen.0.is_empty() {
            return Err((
                key().k("server").k("listen"),
                "no listen address: give at least one, such as \"0.0.0.0:8080\"".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, a) in s.listen.0.iter().enumerate() {
            // Port 0 asks for any free port: never a clash.
            if a.port() != 0 && !seen.insert(*a) {
                return Err((
                    key().k("server").k("listen").i(i),
                    format!("listen address {a} is given twice: remove one"),
                ));
            }
        }
        for (name, d) in [
            ("connect_timeout", s.connect_timeout),
            ("request_timeout", s.request_timeout),
            ("idle_timeout", s.idle_timeout),
            ("header_read_timeout", s.header_read_timeout),
            ("body_read_timeout", s.body_read_timeout),
            ("tunnel_idle_timeout", s.tunnel_idle_timeout),
            ("response_body_idle_timeout", s.response_body_idle_timeout),
            ("send_timeout", s.send_timeout),
        ] {
            if d.0.is_zero() {
                return Err((
                    key().k("server").k(name),
                    "must be longer than 0: give a duration such as \"10s\"".into(),
                ));
            }
        }
        if s.max_header_bytes.0 < 8192 {
            return Err((
                key().k("server").k("max_header_bytes"),
                format!(
                    "{} bytes is too small for real browsers: give at least \"8KiB\"",
                    s.max_header_bytes.0
                ),
            ));
        }
        if let Some(tls) = &s.tls {
            for (i, c) in tls.certs.iter().enumerate() {
                let at = || key().k("server").k("tls").k("certs").i(i);
                if c.server_names.is_empty() {
                    return Err((
                        at().k("server_names"),
                        "list at least one name, such as [\"app.example.com\"]".into(),
                    ));
                }
                for (j, n) in c.server_names.iter().enumerate() {
                    if let Err(m) = validate_host_pattern(n) {
                        return Err((at().k("server_names").i(j), m));
                    }
                }
            }
        } else if s.redirect_http.is_some() {
            return Err((
                key().k("server").k("redirect_http"),
                "redirecting to https needs [server.tls]: add it or remove redirect_http".into(),
            ));
        }
        if let Some(Addr(r)) = s.redirect_http
            && r.port() != 0
            && (s.listen.0.contains(&r) || self.admin.listen == Some(Addr(r)))
        {
            return Err((
                key().k("server").k("redirect_http"),
                format!("{r} is already used by another listener"),
            ));
        }
        if s.max_connections == 0 {
            return Err((
                key().k("server").k("max_connections"),
                "0 would refuse every client: give a positive number such as 10000".into(),
            ));
        }
        if s.proxy_protocol && s.trusted_proxies.is_empty() {
            return Err((
                key().k("server").k("proxy_protocol"),
                "PROXY protocol headers are accepted only from trusted_proxies: list your load balancers' addresses there".into(),
            ));
        }
        if s.max_header_bytes.0 > 16 << 20 {
            return Err((
                key().k("server").k("max_header_bytes"),
                "larger than 16MiB: a request head that large is an attack, give at most \"1MiB\""
                    .into(),
            ));
        }
        if let Some(Addr(admin)) = self.admin.listen
            && admin.port() != 0
            && s.listen.0.contains(&admin)
        {
            return Err((
                key().k("admin").k("listen"),
                format!(
                    "{admin} is also a client listen address: the admin listener needs its own"
                ),
            ));
        }
        if matches!(&self.admin.token, Some(t) if t.is_empty()) {
            return Err((
                key().k("admin").k("token"),
                "empty token: give a secret or remove the key".into(),
            ));
        }
        for (i, h) in self.admin.allowed_hosts.iter().enumerate() {
            if let Err(m) = validate_allowed_host(h) {
                return Err((key().k("admin").k("allowed_hosts").i(i), m));
            }
        }
        if let Some(level) = &self.log.level
            && tracing_subscriber::EnvFilter::try_new(level).is_err()
        {
            return Err((
                key().k("log").k("level"),
                format!("invalid level {level:?}: use error, warn, info, debug or trace"),
            ));
        }
        if self.upstreams.is_empty() {
            return Err((
                key().k("upstreams"),
                "no upstream: add an [upstreams.NAME] table with servers".into(),
            ));
        }
        for (name, u) in &self.upstreams {
            validate_upstream(name, u)?;
        }
        let mut routes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = || key().k("routes").i(i);
            if !self.upstreams.contains_key(&r.upstream) {
                let known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
                return Err((
                    at().k("upstream"),
                    format!(
                        "no upstream named {:?}: define [upstreams.{}] or use one of {}",
                        r.upstream,
                        r.upstream,
                        known.join(", ")
                    ),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err((
                    at().k("path_prefix"),
                    format!("{:?} must start with '/', such as \"/api\"", r.path_prefix),
                ));
            }
            // Requests are matched on their normalized path (route.rs): a prefix in any
            // other form could never match.
            match crate::route::normalize_path(&r.path_prefix) {
                Ok(n) if n == r.path_prefix.as_str() => {}
                Ok(n) => {
                    return Err((
                        at().k("path_prefix"),
                        format!(
                            "{:?} is matched against normalized paths (dot segments removed, \
                             unreserved characters decoded): write {:?}",
                            r.path_prefix, n
                        ),
                    ));
                }
                Err(e) => {
                    return Err((
                        at().k("path_prefix"),
                        format!("{:?}: {}", r.path_prefix, e.reason()),
                    ));
                }
            }
            if let Some(h) = &r.host
                && let Err(m) = validate_host_pattern(h)
            {
                return Err((at().k("host"), m));
            }
            let host = r.host.as_deref().map(str::to_ascii_lowercase);
            let prefix = crate::route::normalize_prefix(&r.path_prefix).to_owned();
            if !routes.insert((host, prefix)) {
                return Err((
                    at(),
                    "a route with the same host and path_prefix comes earlier: remove one".into(),
                ));
            }
        }
        Ok(())
    }

    /// Warnings: a config that loads but probably does not do what was meant.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.routes.is_empty() && self.upstreams.len() > 1 {
            out.push(format!(
                "{} upstreams but no [[routes]]: every request will get 404; add [[routes]] entries",
                self.upstreams.len()
            ));
        }
        out
    }
}

fn validate_upstream(name: &str, u: &UpstreamSection) -> Result<(), (KeyPath, String)> {
    let at = || KeyPath::root().k("upstreams").k(name);
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err((
            at(),
            format!("invalid upstream name {name:?}: use letters, digits, '_', '-' and '.'"),
        ));
    }
    if u.servers.is_empty() {
        return Err((
            at().k("servers"),
            "no servers: list at least one, such as servers = [\"127.0.0.1:13000\"]".into(),
        ));
    }
    let mut seen = HashSet::new();
    for (i, s) in u.servers.iter().enumerate() {
        let sk = || at().k("servers").i(i);
        if let Err(m) = validate_server_addr(&s.addr) {
            return Err((sk().k("addr"), m));
        }
        if !seen.insert(s.addr.to_ascii_lowercase()) {
            return Err((
                sk().k("addr"),
                format!(
                    "server {:?} is listed twice in this upstream: remove one",
                    s.addr
                ),
            ));
        }
        if s.weight == 0 {
            return Err((
                sk().k("weight"),
                "weight 0 would never be chosen: give 1 or more, or remove the server".into(),
            ));
        }
        if s.weight > MAX_WEIGHT {
            return Err((
                sk().k("weight"),
                format!(
                    "weight {} is above the maximum of {MAX_WEIGHT}: scale the weights down",
                    s.weight
                ),
            ));
        }
    }
    if u.servers.iter().all(|s| s.backup) {
        return Err((
            at().k("servers"),
            "every server is a backup, so the total primary weight is 0: make at least one a primary (backup = false)".into(),
        ));
    }
    if u.passive.max_fails == Some(0) {
        return Err((at().k("passive").k("max_fails"), "must be 1 or more".into()));
    }
    if matches!(u.passive.fail_timeout, Some(d) if d.0.is_zero()) {
        return Err((
            at().k("passive").k("fail_timeout"),
            "must be longer than 0, such as \"10s\"".into(),
        ));
    }
    if matches!(u.slow_start, Some(d) if d.0.is_zero()) {
        return Err((
            at().k("slow_start"),
            "must be longer than 0, such as \"30s\"; remove the key to turn slow start off".into(),
        ));
    }
    if !u.tls {
        for (k, set) in [
            ("ca", u.ca.is_some()),
            ("server_name", u.server_name.is_some()),
            ("insecure_skip_verify", u.insecure_skip_verify),
        ] {
            if set {
                return Err((
                    at().k(k),
                    "has no effect without tls = true: add tls = true or remove it".into(),
                ));
            }
        }
    }
    if let Some(name) = &u.server_name
        && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        return Err((
            at().k("server_name"),
            format!("{name:?} is not a valid DNS name or IP address"),
        ));
    }
    for (k, v) in [
        ("max_connections_per_server", u.max_connections_per_server),
        ("max_pending", u.max_pending),
    ] {
        if v == Some(0) {
            return Err((
                at().k(k),
                "0 would refuse every request: give a positive number or remove the key".into(),
            ));
        }
    }
    if u.resolve_interval.0 < Duration::from_millis(100) {
        return Err((
            at().k("resolve_interval"),
            "must be at least 100ms, such as \"5s\"".into(),
        ));
    }
    if u.hash_prefix_v4 > 32 {
        return Err((
            at().k("hash_prefix_v4"),
            format!(
                "{} is not an IPv4 prefix length: give 0 to 32",
                u.hash_prefix_v4
            ),
        ));
    }
    if u.hash_prefix_v6 > 128 {
        return Err((
            at().k("hash_prefix_v6"),
            format!(
                "{} is not an IPv6 prefix length: give 0 to 128",
                u.hash_prefix_v6
            ),
        ));
    }
    if u.pool_idle_timeout.0.is_zero() {
        return Err((
            at().k("pool_idle_timeout"),
            "must be longer than 0; to disable pooling set max_idle_per_server = 0".into(),
        ));
    }
    if u.retries > 100 {
        return Err((
            at().k("retries"),
            format!(
                "{} retries is unreasonable: give a small number such as 2",
                u.retries
            ),
        ));
    }
    if let Some(h) = &u.health_check {
        let hk = || at().k("health_check");
        if !h.path.starts_with('/') {
            return Err((
                hk().k("path"),
                format!(
                    "{:?} must start with '/', such as \"/api/__health_check\"",
                    h.path
                ),
            ));
        }
        if h.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err((
                hk().k("path"),
                "must not contain spaces or control characters".into(),
            ));
        }
        if h.interval.0.is_zero() {
            return Err((
                hk().k("interval"),
                "must be longer than 0, such as \"2s\"".into(),
            ));
        }
        if h.timeout.0.is_zero() {
            return Err((
                hk().k("timeout"),
                "must be longer than 0, such as \"1s\"".into(),
            ));
        }
        if h.healthy_threshold == 0 {
            return Err((hk().k("healthy_threshold"), "must be 1 or more".into()));
        }
        if h.unhealthy_threshold == 0 {
            return Err((hk().k("unhealthy_threshold"), "must be 1 or more".into()));
        }
        if let Some(host) = &h.host
            && (host.is_empty() || host.bytes().any(|b| b <= b' ' || b == 0x7f))
        {
            return Err((hk().k("host"), "must be a host name without spaces".into()));
        }
    }
    Ok(())
}

fn validate_server_addr(addr: &str) -> Result<(), String> {
    let (host, _) = split_host_port(addr)?;
    if addr.starts_with('[') {
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("invalid IPv6 address in {addr:?}"))?;
        return Ok(());
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "invalid host in server address {addr:?}: write an IP address or a DNS name"
        ));
    }
    Ok(())
}

fn validate_host_pattern(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid host {h:?}: write an exact name (\"app.example.com\") or a wildcard (\"*.example.com\"), without port"
        ))
    }
}

/// An `admin.allowed_hosts` entry: a bare host name, as the `Host` header carries it
/// without its port. A trailing dot is allowed, as the guard ignores it.
fn validate_allowed_host(h: &str) -> Result<(), String> {
    let name = h.strip_suffix('.').unwrap_or(h);
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid host name {h:?}: write a bare name such as \"admin.example.com\", without scheme, port, path or wildcard"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("fairway.toml"), text)
    }

    const MIN: &str = r#"
[server]
listen = "127.0.0.1:8080"

[upstreams.app]
servers = ["127.0.0.1:13000", { addr = "127.0.0.1:13001", weight = 2 }]
"#;

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

    #[test]
    fn a_mapped_trusted_proxy_below_96_names_its_entry() {
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::ffff:10.0.0.0/80\"]\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n",
        );
        assert!(
            e.starts_with("fairway.toml:3:") && e.contains("server.trusted_proxies[1]: "),
            "{e}"
        );
        assert!(
            e.contains("::ffff:10.0.0.0/80") && e.contains("below 96"),
            "{e}"
        );
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\nconect_timeout = \"1s\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n",
        );
        assert!(e.starts_with("fairway.toml:3:1: "), "{e}");
        assert!(e.contains("conect_timeout"), "{e}");
        assert!(e.contains("connect_timeout"), "{e}");
    }

    #[test]
    fn bad_value_names_key_path() {
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\nidle_timeout = \"soon\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n",
        );
        assert!(
            e.starts_with("fairway.toml:3:16: server.idle_timeout: "),
            "{e}"
        );
        let e = err(
            "[server]\nlisten = \"127.0.0.1:1\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\", { addr = \"127.0.0.1:3\", weight = 0 }]\n",
        );
        assert!(e.contains("fairway.toml:4:"), "{e}");
        assert!(e.contains("upstreams.a.servers[1].weight"), "{e}");
    }

    #[test]
    fn semantic_errors() {
        let base = "[server]\nlisten = \"127.0.0.1:1\"\n";
        let e = err(&format!("{base}[upstreams.a]\nservers=[]\n"));
        assert!(e.contains("upstreams.a.servers: no servers"), "{e}");
        let e = err(&format!(
            "{base}[upstreams.a]\nservers=[\"127.0.0.1:2\", \"127.0.0.1:2\"]\n"
        ));
        assert!(
            e.contains("upstreams.a.servers[1].addr") && e.contains("twice"),
            "{e}"
        );
        let e = err(&format!("{base}[upstreams.a]\nservers=[\"127.0.0.1\"]\n"));
        assert!(
            e.contains("fairway.toml:4:10: upstreams.a.servers[0].addr"),
            "{e}"
        );
        let e = err(&format!(
            "{base}[upstreams.a]\nservers=[{{ addr = \"127.0.0.1:2\", backup = true }}]\n"
        ));
        assert!(e.contains("total primary weight is 0"), "{e}");
        let e = err(&format!(
            "{base}[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n[[routes]]\nupstream = \"b\"\n"
        ));
        assert!(
            e.contains("fairway.toml:6:12: routes[0].upstream: no upstream named \"b\""),
            "{e}"
        );
        let e = err(&format!(
            "{base}[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n[upstreams.a.health_check]\nunhealthy_threshold = 0\n"
        ));
        assert!(
            e.contains("upstreams.a.health_check.unhealthy_threshold"),
            "{e}"
        );
        let e = err(&format!(
            "{base}[upstreams.a]\nservers=[\"127.0.0.1:2\"]\nbalance = \"random\"\n"
        ));
        assert!(
            e.contains("upstreams.a.balance") && e.contains("round_robin"),
            "{e}"
        );
        let e = err("[server]\nlisten = \"nowhere\"\n[upstreams.a]\nservers=[\"127.0.0.1:2\"]\n");
        assert!(e.contains("fairway.toml:2:10: server.listen"), "{e}");
    }

    #[test]
    fn admin_allowed_hosts() {
        let with = |hosts: &str| {
            format!("{MIN}[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = {hosts}\n")
        };
        assert!(p(MIN).unwrap().admin.allowed_hosts.is_empty());
        let c = p(&with(
            r#"["admin.example.com", "fairway-admin", "admin.internal."]"#,
        ))
        .unwrap();
        assert_eq!(c.admin.allowed_hosts.len(), 3);
        for (bad, index) in [
            (r#"["admin.example.com", "admin.example.com:9901"]"#, 1),
            (r#"["http://admin.example.com"]"#, 0),
            (r#"["admin.example.com/"]"#, 0),
            (r#"["admin example"]"#, 0),
            (r#"[""]"#, 0),
            (r#"["*.example.com"]"#, 0),
        ] {
            let e = err(&with(bad));
            assert!(
                e.contains(&format!("admin.allowed_hosts[{index}]: invalid host name")),
                "{bad}: {e}"
            );
            assert!(e.starts_with("fairway.toml:9:"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_health_check_timeout_may_be_longer_than_its_interval() {
        let c = p(&format!(
            "{MIN}[upstreams.app.health_check]\ninterval = \"100ms\"\ntimeout = \"2s\"\n"
        ))
        .unwrap();
        let h = c.upstreams["app"].health_check.as_ref().unwrap();
        assert_eq!(
            (h.interval.0, h.timeout.0),
            (Duration::from_millis(100), Duration::from_secs(2))
        );
    }

    #[test]
    fn a_path_prefix_must_be_in_normal_form() {
        let with = |prefix: &str| {
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"127.0.0.1:1\"]\n\
                 [[routes]]\npath_prefix = \"{prefix}\"\nupstream = \"app\"\n"
            )
        };
        assert!(p(&with("/api/v1")).is_ok());
        assert!(p(&with("/files%2Fx")).is_ok());
        let e = err(&with("/api/./v1"));
        assert!(
            e.contains("routes[0].path_prefix") && e.contains("\"/api/v1\""),
            "{e}"
        );
        let e = err(&with("/%61pi"));
        assert!(e.contains("write \"/api\""), "{e}");
        let e = err(&with("/../api"));
        assert!(e.contains("routes[0].path_prefix"), "{e}");
    }

    #[test]
    fn bad_toml_syntax_has_location() {
        let e = err("[server\nlisten = 1\n");
        assert!(e.starts_with("fairway.toml:1:"), "{e}");
    }

    #[test]
    fn server_addresses() {
        assert!(validate_server_addr("app1:13000").is_ok());
        assert!(validate_server_addr("[::1]:13000").is_ok());
        assert!(validate_server_addr("nocobase.app.svc.cluster.local:13000").is_ok());
        assert!(validate_server_addr("127.0.0.1:0").is_err());
        assert!(validate_server_addr("::1:80").is_err());
        assert!(validate_server_addr("999.1.1.1:80").is_err());
        assert!(validate_server_addr(":80").is_err());
    }
}
