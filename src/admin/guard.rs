//! The admin listener's cross-site guard (CONTRACT §7, `[admin] allowed_hosts`). A page on
//! another site, or one that reached the admin address through DNS rebinding, can make an
//! operator's browser send requests to a loopback admin listener; without a token nothing
//! else stops a reload, a drain or the maintenance switch. So every admin request other than
//! GET and HEAD passes [`check`] before the token is looked at, while a script (`curl -X POST`,
//! which sends neither `Origin` nor `Sec-Fetch-Site`, and an IP or `localhost` as `Host`) is
//! not affected.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::{HeaderMap, Request, header};

/// Why a mutating admin request was refused; each variant is one rule of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The host the request addressed is neither an IP literal, `localhost`, nor a name in
    /// `admin.allowed_hosts`: the DNS-rebinding case, where an attacker's name points at us.
    HostNotAllowed,
    /// `Origin` names another origin than the request's host, or is `null`.
    ForeignOrigin,
    /// `Sec-Fetch-Site: cross-site`.
    CrossSiteFetch,
}

impl Refusal {
    /// The rule in a few words, for the log.
    pub fn rule(self) -> &'static str {
        match self {
            Refusal::HostNotAllowed => "host not allowed",
            Refusal::ForeignOrigin => "foreign origin",
            Refusal::CrossSiteFetch => "cross-site fetch",
        }
    }

    /// The text/plain body of the 403 answer, naming the rule.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::HostNotAllowed => {
                "403 forbidden: cross-site admin request refused (host not allowed: use an IP address or localhost, or list the name in admin.allowed_hosts)\n"
            }
            Refusal::ForeignOrigin => {
                "403 forbidden: cross-site admin request refused (foreign origin)\n"
            }
            Refusal::CrossSiteFetch => {
                "403 forbidden: cross-site admin request refused (cross-site fetch)\n"
            }
        }
    }
}

/// Checks one mutating admin request: its host, then `Origin`, then `Sec-Fetch-Site`.
/// `allowed_hosts` is `admin.allowed_hosts` of the current config.
pub fn check<B>(req: &Request<B>, allowed_hosts: &[String]) -> Result<(), Refusal> {
    let host = match request_host(req) {
        Some(Some(value)) => {
            let host = split_authority(value).ok_or(Refusal::HostNotAllowed)?;
            if !is_allowed_host(host.name, allowed_hosts) {
                return Err(Refusal::HostNotAllowed);
            }
            Some(host)
        }
        // HTTP/1.0 without `Host`: no name to rebind, only the address the client dialled.
        Some(None) => None,
        None => return Err(Refusal::HostNotAllowed),
    };
    let headers = req.headers();
    if headers.contains_key(header::ORIGIN) && !is_same_origin(headers, host) {
        return Err(Refusal::ForeignOrigin);
    }
    let cross_site = headers.get_all("sec-fetch-site").iter().any(|v| {
        v.as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"cross-site")
    });
    if cross_site {
        return Err(Refusal::CrossSiteFetch);
    }
    Ok(())
}

/// The authority the client addressed: the request target's when it has one (HTTP/2's
/// `:authority`, or an absolute-form HTTP/1.1 target, which RFC 9112 §3.2.2 says wins over
/// `Host`), else the one `Host` header. `Some(None)`: no host given at all. `None`: several
/// `Host` headers or one that is not text, which the guard refuses rather than guessing.
fn request_host<B>(req: &Request<B>) -> Option<Option<&str>> {
    if let Some(authority) = req.uri().authority() {
        return Some(Some(authority.as_str()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return None;
    }
    match first {
        None => Some(None),
        Some(v) => v.to_str().ok().map(Some),
    }
}

/// A `host[:port]` split in two; case and a trailing dot are left for the comparisons to
/// ignore.
#[derive(Debug, Clone, Copy)]
struct Authority<'a> {
    /// A name, an IPv4 literal, or an IPv6 literal with its brackets.
    name: &'a str,
    /// `None` when the port is absent or empty (RFC 3986 §6.2.3: both mean the default).
    port: Option<u16>,
}

/// Splits `host[:port]`; `None` when it is not that shape (user info, a path, an IPv6
/// literal without brackets, a port that is not a number).
fn split_authority(s: &str) -> Option<Authority<'_>> {
    let (name, port) = if s.starts_with('[') {
        let close = s.find(']')?;
        let (name, rest) = s.split_at(close + 1);
        if rest.is_empty() {
            (name, "")
        } else {
            (name, rest.strip_prefix(':')?)
        }
    } else {
        match s.split_once(':') {
            Some((name, port)) => (name, port),
            None => (s, ""),
        }
    };
    let is_name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let is_literal_byte = |b: u8| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'[' | b']');
    let name_ok = if name.starts_with('[') {
        name.bytes().all(is_literal_byte)
    } else {
        name.bytes().all(is_name_byte)
    };
    if name.is_empty() || !name_ok || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port = if port.is_empty() {
        None
    } else {
        Some(port.parse().ok()?)
    };
    Some(Authority { name, port })
}

/// The name without the trailing dot of a fully qualified name (`localhost.` is `localhost`).
fn trim_dot(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

/// CONTRACT §7: IP literals and `localhost` need no listing; other names must be in
/// `admin.allowed_hosts`, compared without case and trailing dot.
fn is_allowed_host(name: &str, allowed_hosts: &[String]) -> bool {
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok();
    }
    let name = trim_dot(name);
    name.parse::<Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed_hosts
            .iter()
            .any(|a| trim_dot(a).eq_ignore_ascii_case(name))
}

/// `Origin` is `http(s)://host[:port]` naming the request's own host. A port left out on
/// one side stands for the default port of the origin's scheme, so `http://admin.example`
/// matches `Host: admin.example:80` and `https://admin.example` matches `admin.example`
/// (a TLS-terminating proxy in front of the admin listener). `null`, other schemes, a path,
/// several `Origin` headers, or no request host to compare with: foreign.
fn is_same_origin(headers: &HeaderMap, host: Option<Authority<'_>>) -> bool {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let (Some(origin), None, Some(host)) = (origins.next(), origins.next(), host) else {
        return false;
    };
    let Some((scheme, rest)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return false;
    };
    let default_port = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return false;
    };
    let Some(origin) = split_authority(rest) else {
        return false;
    };
    let ports_match = match (origin.port, host.port) {
        (Some(a), Some(b)) => a == b,
        (Some(p), None) | (None, Some(p)) => p == default_port,
        (None, None) => true,
    };
    ports_match && trim_dot(origin.name).eq_ignore_ascii_case(trim_dot(host.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/reload");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn verdict(headers: &[(&str, &str)]) -> Result<(), Refusal> {
        check(&req(headers), &["admin.example".to_owned()])
    }

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1:9901",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:9901",
            "[::1]",
            "localhost:9901",
            "LOCALHOST",
            "localhost.",
            "localhost:",
            "admin.example",
            "Admin.Example.:9901",
        ] {
            assert_eq!(verdict(&[("host", ok)]), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "sub.admin.example",
            "::1",
            "[::1",
            "[fe80::1%25eth0]",
            "[::1]x",
            "127.0.0.1:port",
            "127.0.0.1:99999",
            "user@127.0.0.1",
            "2130706433",
            "",
        ] {
            assert_eq!(
                verdict(&[("host", bad)]),
                Err(Refusal::HostNotAllowed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn no_host_passes_and_two_hosts_do_not() {
        assert_eq!(verdict(&[]), Ok(()));
        assert_eq!(
            verdict(&[("host", "127.0.0.1"), ("host", "127.0.0.1")]),
            Err(Refusal::HostNotAllowed)
        );
    }

    #[test]
    fn the_target_authority_wins_over_host() {
        let r = Request::post("http://evil.example/reload")
            .header("host", "127.0.0.1")
            .body(())
            .unwrap();
        assert_eq!(check(&r, &[]), Err(Refusal::HostNotAllowed));
        let r = Request::post("http://127.0.0.1:9901/reload")
            .header("origin", "http://127.0.0.1:9901")
            .body(())
            .unwrap();
        assert_eq!(check(&r, &[]), Ok(()));
    }

    #[test]
    fn origins() {
        let same = |host: &str, origin: &str| verdict(&[("host", host), ("origin", origin)]);
        assert_eq!(same("127.0.0.1:9901", "http://127.0.0.1:9901"), Ok(()));
        assert_eq!(same("LOCALHOST:9901", "http://localhost:9901"), Ok(()));
        assert_eq!(same("[::1]:9901", "http://[::1]:9901"), Ok(()));
        assert_eq!(same("admin.example", "http://admin.example:80"), Ok(()));
        assert_eq!(same("admin.example:80", "http://admin.example"), Ok(()));
        assert_eq!(same("admin.example", "https://admin.example"), Ok(()));
        assert_eq!(same("admin.example.", "http://admin.example"), Ok(()));
        for foreign in [
            "http://evil.example",
            "http://127.0.0.1:9902",
            "http://127.0.0.1",
            "https://127.0.0.1:443",
            "null",
            "file://127.0.0.1:9901",
            "http://127.0.0.1:9901/",
            "http://user@127.0.0.1:9901",
            "127.0.0.1:9901",
            "",
        ] {
            assert_eq!(
                same("127.0.0.1:9901", foreign),
                Err(Refusal::ForeignOrigin),
                "{foreign:?}"
            );
        }
        // Nothing to compare with: foreign.
        assert_eq!(
            verdict(&[("origin", "http://127.0.0.1")]),
            Err(Refusal::ForeignOrigin)
        );
        assert_eq!(
            verdict(&[
                ("host", "127.0.0.1"),
                ("origin", "http://127.0.0.1"),
                ("origin", "http://127.0.0.1")
            ]),
            Err(Refusal::ForeignOrigin)
        );
    }

    #[test]
    fn sec_fetch_site() {
        for ok in ["same-origin", "same-site", "none"] {
            assert_eq!(
                verdict(&[("host", "127.0.0.1"), ("sec-fetch-site", ok)]),
                Ok(())
            );
        }
        assert_eq!(
            verdict(&[("host", "127.0.0.1"), ("sec-fetch-site", "Cross-Site")]),
            Err(Refusal::CrossSiteFetch)
        );
    }

    #[test]
    fn the_host_rule_comes_first() {
        assert_eq!(
            verdict(&[
                ("host", "evil.example"),
                ("origin", "http://evil.example"),
                ("sec-fetch-site", "cross-site")
            ]),
            Err(Refusal::HostNotAllowed)
        );
    }
}
