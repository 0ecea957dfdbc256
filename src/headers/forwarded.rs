//! Forwarded information (CONTRACT §3): who the client is as `trusted_proxies` allow it to
//! be known, the `X-Forwarded-For`/`-Proto`/`-Host`, `X-Real-IP` and RFC 7239 `Forwarded`
//! headers that tell the upstream, and the underscore spellings of those names that must not
//! reach it, as pure functions over a request's headers.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
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

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP` and
/// `Forwarded`: kept (and, for `X-Forwarded-For` and `Forwarded`, appended to) from a trusted
/// peer, overwritten otherwise. `host` is the `Host` the client asked for.
pub fn set_forwarded(headers: &mut HeaderMap, origin: &Origin, host: Option<&HeaderValue>) {
    let peer = canonical(origin.peer);
    let peer_value = ip_value(peer);
    set_rfc7239(headers, origin, host);
    if origin.trusted {
        let mut joined = joined_values(headers, &X_FORWARDED_FOR);
        let value = if joined.is_empty() {
            peer_value
        } else {
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer_value.as_bytes());
            // Valid: trimmed header values joined by ", ".
            HeaderValue::from_maybe_shared(Bytes::from(joined)).unwrap_or(peer_value)
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

/// Every value of `name` in order, trimmed, empty ones skipped, joined with `, `: several
/// field lines of a list-based field are one list (RFC 9110 §5.3). Empty when there is none.
fn joined_values(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut joined = Vec::new();
    for v in headers.get_all(name) {
        let v = v.as_bytes().trim_ascii();
        if v.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(v);
    }
    joined
}

/// Sets `Forwarded` (RFC 7239) to fairway's own element for this hop, appended to what a
/// trusted peer sent (§4: each proxy adds its element to the list) and replacing what any
/// other peer sent, as CONTRACT §3 does for `X-Forwarded-For`. Set even when the client sent
/// none, so an upstream that reads only RFC 7239 learns the same as from `X-Forwarded-*`.
fn set_rfc7239(headers: &mut HeaderMap, origin: &Origin, host: Option<&HeaderValue>) {
    let mut value = if origin.trusted {
        joined_values(headers, &header::FORWARDED)
    } else {
        // Room for the whole element at once: `for="[v6]";proto=https;host="…"`.
        Vec::with_capacity(64 + host.map_or(0, |h| h.len()))
    };
    if !value.is_empty() {
        value.extend_from_slice(b", ");
    }
    push_forwarded_element(&mut value, origin.peer, origin.proto, host);
    match HeaderValue::from_maybe_shared(Bytes::from(value)) {
        Ok(v) => {
            headers.insert(header::FORWARDED, v);
        }
        // Not reached (every byte comes from a valid header value or is ASCII), but a
        // forged value must not pass on if it were.
        Err(_) => {
            headers.remove(header::FORWARDED);
        }
    }
}

/// Appends the RFC 7239 forwarded-element `for=<peer>;proto=<proto>;host=<host>` to `buf`;
/// `host` is left out when the request has none.
fn push_forwarded_element(
    buf: &mut Vec<u8>,
    peer: IpAddr,
    proto: &str,
    host: Option<&HeaderValue>,
) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = match canonical(peer) {
        IpAddr::V4(v4) => write!(buf, "for={v4}"),
        // RFC 7239 §6: an IPv6 node is bracketed, and since `[` and `:` are not token
        // characters the value must be a quoted-string (§4).
        IpAddr::V6(v6) => write!(buf, "for=\"[{v6}]\""),
    };
    buf.extend_from_slice(b";proto=");
    buf.extend_from_slice(proto.as_bytes());
    if let Some(host) = host.map(HeaderValue::as_bytes).filter(|h| !h.is_empty()) {
        buf.extend_from_slice(b";host=");
        push_token_or_quoted(buf, host);
    }
}

/// Appends `v` as a token when it is one, else as a quoted-string (RFC 7239 §4, RFC 9110
/// §5.6.4): a `Host` with a port (`:`) or an IPv6 literal (`[`, `]`) is quoted.
fn push_token_or_quoted(buf: &mut Vec<u8>, v: &[u8]) {
    if v.iter().all(|&b| is_tchar(b)) {
        buf.extend_from_slice(v);
        return;
    }
    buf.push(b'"');
    for &b in v {
        if b == b'"' || b == b'\\' {
            buf.push(b'\\');
        }
        buf.push(b);
    }
    buf.push(b'"');
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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
    use crate::headers::tests::h;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
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

    fn forwarded_of(m: &HeaderMap) -> Vec<&str> {
        m.get_all(header::FORWARDED)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn forwarded_element_for_an_ipv4_peer() {
        let mut m = HeaderMap::new();
        set_forwarded(
            &mut m,
            &origin("192.0.2.60", false),
            Some(&HeaderValue::from_static("app.example")),
        );
        assert_eq!(
            forwarded_of(&m),
            ["for=192.0.2.60;proto=http;host=app.example"]
        );
    }

    #[test]
    fn forwarded_element_for_an_ipv6_peer_is_quoted_and_bracketed() {
        let mut m = HeaderMap::new();
        let mut o = origin("2001:db8::1", false);
        o.proto = "https";
        set_forwarded(&mut m, &o, None);
        // No Host: no `host` parameter.
        assert_eq!(forwarded_of(&m), ["for=\"[2001:db8::1]\";proto=https"]);
        let mut m = HeaderMap::new();
        set_forwarded(&mut m, &origin("::ffff:192.0.2.60", false), None);
        assert_eq!(forwarded_of(&m), ["for=192.0.2.60;proto=http"]);
    }

    #[test]
    fn forwarded_host_outside_token_is_a_quoted_string() {
        let cases = [
            ("app.example:8080", "host=\"app.example:8080\""),
            ("[2001:db8::2]:443", "host=\"[2001:db8::2]:443\""),
            ("a\"b\\c", "host=\"a\\\"b\\\\c\""),
            ("", "proto=http"),
        ];
        for (host, tail) in cases {
            let mut m = HeaderMap::new();
            let host = HeaderValue::from_str(host).unwrap();
            set_forwarded(&mut m, &origin("192.0.2.60", false), Some(&host));
            let v = forwarded_of(&m);
            assert!(v[0].ends_with(tail), "{host:?}: {v:?}");
        }
    }

    #[test]
    fn forwarded_from_an_untrusted_peer_is_replaced() {
        let mut m = h(&[
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("forwarded", "for=7.7.7.7"),
        ]);
        set_forwarded(
            &mut m,
            &origin("192.0.2.60", false),
            Some(&HeaderValue::from_static("app.example")),
        );
        assert_eq!(
            forwarded_of(&m),
            ["for=192.0.2.60;proto=http;host=app.example"]
        );
    }

    #[test]
    fn forwarded_from_a_trusted_peer_gets_the_element_appended() {
        let mut m = h(&[
            (
                "forwarded",
                "for=203.0.113.7;proto=https;host=front.example",
            ),
            ("forwarded", " "),
            ("forwarded", "for=198.51.100.2, for=\"[2001:db8::3]\" "),
        ]);
        set_forwarded(
            &mut m,
            &origin("10.0.0.1", true),
            Some(&HeaderValue::from_static("app.example:8080")),
        );
        assert_eq!(
            forwarded_of(&m),
            [
                "for=203.0.113.7;proto=https;host=front.example, for=198.51.100.2, \
                 for=\"[2001:db8::3]\", for=10.0.0.1;proto=http;host=\"app.example:8080\""
            ]
        );
        // Nothing sent: fairway's element alone.
        let mut m = HeaderMap::new();
        set_forwarded(&mut m, &origin("10.0.0.1", true), None);
        assert_eq!(forwarded_of(&m), ["for=10.0.0.1;proto=http"]);
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
