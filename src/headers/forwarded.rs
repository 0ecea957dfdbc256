//! Forwarded information (CONTRACT §3): who the client is as `trusted_proxies` allow it to
//! be known, the `X-Forwarded-For`/`-Proto`/`-Host` and `X-Real-IP` headers that tell the
//! upstream, and the underscore spellings of those names that must not reach it, as pure
//! functions over a request's headers.

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP`.
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Whether `ip` lies in one of the trusted networks.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port or brackets.
fn parse_xff_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|sa| sa.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
        .map(canonical)
}

/// The client IP: the peer, unless the peer is a trusted proxy, in which case the right-most
/// `X-Forwarded-For` address that is not itself trusted (the left-most when all are).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut candidate = peer;
    // Header lines in order, entries right to left.
    let lines: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for line in lines.iter().rev() {
        for entry in line.rsplit(',') {
            match parse_xff_entry(entry) {
                Some(ip) => {
                    candidate = ip;
                    if !is_trusted(ip, trusted) {
                        return ip;
                    }
                }
                // Garbage ends the chain of trust: the last good hop is the client.
                None => return candidate,
            }
        }
    }
    candidate
}

/// What the proxy knows about the request's origin.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The TCP peer.
    pub peer: IpAddr,
    /// The client IP (see [`client_ip`]).
    pub client: IpAddr,
    /// Whether the peer is a trusted proxy.
    pub trusted: bool,
    /// `"http"` or `"https"`.
    pub proto: &'static str,
}

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Real-IP`: kept
/// (and, for `X-Forwarded-For`, appended to) from a trusted peer, overwritten otherwise.
/// `host` is the `Host` the client asked for.
pub fn set_forwarded(headers: &mut HeaderMap, origin: &Origin, host: Option<&HeaderValue>) {
    let peer = canonical(origin.peer);
    let peer_value = ip_value(peer);
    if origin.trusted {
        let mut joined: Option<String> = None;
        for v in headers.get_all(&X_FORWARDED_FOR) {
            let s = String::from_utf8_lossy(v.as_bytes());
            let s = s.trim();
            if s.is_empty() {
                continue;
            }
            let j = joined.get_or_insert_with(String::new);
            if !j.is_empty() {
                j.push_str(", ");
            }
            j.push_str(s);
        }
        let value = match joined {
            Some(mut j) => {
                j.push_str(", ");
                j.push_str(peer_value.to_str().unwrap_or_default());
                HeaderValue::from_str(&j).unwrap_or(peer_value)
            }
            None => peer_value,
        };
        headers.insert(X_FORWARDED_FOR.clone(), value);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(origin.proto),
            );
        }
        if !headers.contains_key(&X_FORWARDED_HOST)
            && let Some(h) = host
        {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
        if !headers.contains_key(&X_REAL_IP) {
            headers.insert(X_REAL_IP.clone(), ip_value(origin.client));
        }
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), peer_value.clone());
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(origin.proto),
        );
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
        headers.insert(X_REAL_IP.clone(), peer_value);
    }
}

fn ip_value(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 64];
    let len = {
        use std::io::Write;
        let mut w = &mut buf[..];
        let _ = write!(w, "{ip}");
        64 - w.len()
    };
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The forwarded headers whose underscore spellings [`remove_underscore_spellings`] removes.
const FORWARDED_NAMES: [&str; 7] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "forwarded",
];

/// Whether `name` (lowercase, as in a `HeaderMap`) is one of [`FORWARDED_NAMES`] spelled with
/// at least one `_` in place of a `-`.
fn is_underscore_spelling(name: &[u8]) -> bool {
    name.contains(&b'_')
        && FORWARDED_NAMES.iter().any(|f| {
            f.len() == name.len()
                && f.bytes()
                    .zip(name)
                    .all(|(f, &n)| f == if n == b'_' { b'-' } else { n })
        })
}

/// Removes `X_Forwarded_For`, `X-Real_IP` and every other underscore spelling of a forwarded
/// header, whoever the peer is. WSGI and CGI servers turn `-` into `_` when they name headers
/// (`HTTP_X_FORWARDED_FOR`), so to them such a spelling is the real header, with a value
/// fairway never rewrote. fairway's own values travel in the canonical names only, and a
/// trusted proxy in front passes the client's underscore headers through unchanged, so none
/// of them is worth keeping.
pub fn remove_underscore_spellings(headers: &mut HeaderMap) {
    // Most requests have no name with `_`: then nothing matches and nothing is allocated.
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_underscore_spelling(k.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn client_ip_from_untrusted_peer_ignores_xff() {
        let headers = h(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(
            client_ip(ip("1.2.3.4"), &headers, &nets(&["10.0.0.0/8"])),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn client_ip_from_trusted_peer_is_rightmost_untrusted() {
        let t = nets(&["10.0.0.0/8"]);
        let headers = h(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.2")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &t), ip("1.2.3.4"));
        let headers = h(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &t), ip("10.0.0.3"));
        let headers = h(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2:5000"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &t), ip("2.2.2.2"));
        let headers = h(&[("x-forwarded-for", "1.1.1.1, garbage, 10.0.0.9")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &headers, &t), ip("10.0.0.9"));
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &t),
            ip("10.0.0.1")
        );
    }

    fn origin(peer: &str, trusted: bool) -> Origin {
        Origin {
            peer: ip(peer),
            client: ip(peer),
            trusted,
            proto: "http",
        }
    }

    #[test]
    fn untrusted_peer_overwrites_forwarded_headers() {
        let mut m = h(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        set_forwarded(
            &mut m,
            &origin("1.2.3.4", false),
            Some(&HeaderValue::from_static("app")),
        );
        assert_eq!(m["x-forwarded-for"], "1.2.3.4");
        assert_eq!(m["x-forwarded-proto"], "http");
        assert_eq!(m["x-forwarded-host"], "app");
        assert_eq!(m["x-real-ip"], "1.2.3.4");
        assert_eq!(m.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn trusted_peer_appends_and_keeps() {
        let mut m = h(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "front"),
        ]);
        let mut o = origin("10.0.0.1", true);
        o.client = ip("2.2.2.2");
        set_forwarded(&mut m, &o, Some(&HeaderValue::from_static("app")));
        assert_eq!(m["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        assert_eq!(m["x-forwarded-proto"], "https");
        assert_eq!(m["x-forwarded-host"], "front");
        assert_eq!(m["x-real-ip"], "2.2.2.2");
    }

    #[test]
    fn mapped_v4_peer_is_written_as_v4() {
        let mut m = HeaderMap::new();
        set_forwarded(&mut m, &origin("::ffff:1.2.3.4", false), None);
        assert_eq!(m["x-forwarded-for"], "1.2.3.4");
    }

    #[test]
    fn underscore_spellings_of_forwarded_headers_are_removed() {
        let mut m = h(&[
            ("x_forwarded_for", "6.6.6.6"),
            ("x-forwarded_for", "6.6.6.6"),
            ("x_forwarded_proto", "https"),
            ("x_forwarded_host", "evil"),
            ("x_forwarded_port", "443"),
            ("x_forwarded_prefix", "/admin"),
            ("x-real_ip", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x_request_id", "kept"),
            ("x_forwarded_for_x", "kept"),
            ("x_custom", "kept"),
            ("forwarded", "for=1.1.1.1"),
        ]);
        remove_underscore_spellings(&mut m);
        let mut names: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "forwarded",
                "x-forwarded-for",
                "x_custom",
                "x_forwarded_for_x",
                "x_request_id",
            ]
        );
    }
}
