//! The checks of a parsed [`Config`] that serde cannot express: references between
//! sections, duplicates, ranges, and the form of names and addresses. A failure is a key
//! path and a message that says what to change; `parse` adds the file, line and column.

use std::collections::HashSet;
use std::time::Duration;

use crate::error::KeyPath;

use super::sections::{Config, UpstreamSection};
use super::traffic::Direction;
use super::units::{Addr, split_host_port};

/// Largest weight of one server: keeps the round-robin schedule small.
pub const MAX_WEIGHT: u32 = 1000;

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
        self.compression.check(&key().k("compression"))?;
        if s.rate_limit_max_keys == 0 {
            return Err((
                key().k("server").k("rate_limit_max_keys"),
                "0 would keep no bucket: give a positive number such as 100000".into(),
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
            if let Some(rl) = &r.rate_limit {
                rl.check(&at().k("rate_limit"))?;
            }
            for (k, rules, dir) in [
                ("request_headers", &r.request_headers, Direction::Request),
                ("response_headers", &r.response_headers, Direction::Response),
            ] {
                if let Some(rules) = rules {
                    rules.check(&at().k(k), dir)?;
                }
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
    if let Some(sticky) = &u.sticky {
        sticky.check(&at().k("sticky"))?;
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

/// Dot-separated labels of letters, digits, `-` and `_`, none empty.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn validate_host_pattern(h: &str) -> Result<(), String> {
    if is_host_name(h.strip_prefix("*.").unwrap_or(h)) {
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
    if is_host_name(h.strip_suffix('.').unwrap_or(h)) {
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
    use crate::config::tests::{MIN, err, p};

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
