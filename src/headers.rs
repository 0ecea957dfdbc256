//! Request and response head rewriting, as pure functions (CONTRACT §3): hop-by-hop
//! stripping, `X-Forwarded-For`/`-Proto`/`-Host` and `X-Real-IP`, and the client IP as
//! `trusted_proxies` allow it to be known.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
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
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// Whether the request asks for a WebSocket upgrade, the only upgrade that is tunnelled:
/// `Connection` lists `upgrade` and there is exactly one `Upgrade` line, whose value is the
/// single token `websocket` (any case). Anything else (`h2c`, `websocket, h2c`, two
/// `Upgrade` lines) is no upgrade at all and its `Upgrade` is stripped like any hop-by-hop
/// header, so that no tunnel can be opened to smuggle requests past the proxy.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    is_websocket_upgrade(headers) && has_connection_token(headers, "upgrade")
}

/// Whether `headers` carry exactly one `Upgrade` line naming only `websocket` (a request's
/// offer, or the protocol a `101` switches to).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let mut up = headers.get_all(header::UPGRADE).iter();
    match (up.next(), up.next()) {
        (Some(v), None) => v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"),
        _ => false,
    }
}

/// How an upstream response head frames its body, as far as the proxy must act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One valid `Content-Length`, or `Transfer-Encoding: chunked` alone, or neither.
    Clean,
    /// Both `Transfer-Encoding: chunked` and `Content-Length`: the body is framed by the
    /// chunked coding, the length is removed before relaying and the connection is not
    /// reused (RFC 9112 §6.3).
    ChunkedOverLength,
}

/// Checks the framing headers of an upstream response (RFC 9112 §6.3). More than one
/// `Content-Length` (lines or list members, even equal ones) or one that is not a plain
/// decimal is an invalid response, and so is a `Transfer-Encoding` other than exactly
/// `chunked` (a body in an unknown coding cannot be relayed as it is).
pub fn response_framing(headers: &HeaderMap) -> Result<Framing, &'static str> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) => {
            let b = v.as_bytes();
            if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            Some(v)
        }
        (Some(_), Some(_)) => return Err("more than one Content-Length"),
    };
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(Framing::Clean),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            Ok(if length.is_some() {
                Framing::ChunkedOverLength
            } else {
                Framing::Clean
            })
        }
        _ => Err("unsupported Transfer-Encoding"),
    }
}

/// Whether a `Connection` header lists `token`.
pub fn has_connection_token(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Copies every value of `headers` into one allocation of their own, so that keeping a
/// value no longer keeps alive the read buffer it was parsed from.
pub fn detach_values(headers: &mut HeaderMap) {
    let total: usize = headers.values().map(|v| v.len()).sum();
    let mut buf = BytesMut::with_capacity(total);
    for v in headers.values_mut() {
        let sensitive = v.is_sensitive();
        buf.extend_from_slice(v.as_bytes());
        let bytes = buf.split().freeze();
        // The bytes were a valid header value a moment ago.
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(bytes) {
            copy.set_sensitive(sensitive);
            *v = copy;
        }
    }
}

/// Removes hop-by-hop headers: `Connection` and the headers it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`. With `upgrade`,
/// `Upgrade` is kept and `Connection: upgrade` is set, as a tunnel needs them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        // Work on bytes: a token list with obs-text must still have every name it lists
        // removed (RFC 9110 §7.6.1), even if the value is not valid UTF-8.
        let mut named: Vec<HeaderName> = Vec::new();
        let mut close = false;
        for v in headers.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.is_empty()
                    // Removed below in any case.
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"upgrade")
                {
                    continue;
                }
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if let Ok(name) = HeaderName::from_bytes(t) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        if close {
            headers.remove("close");
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn detached_values_keep_nothing_of_the_buffer_they_came_from() {
        let buf = Bytes::from(vec![b'v'; 64 * 1024]);
        let range = buf.as_ptr_range();
        let mut h = HeaderMap::new();
        h.insert(
            "x-a",
            HeaderValue::from_maybe_shared(buf.slice(10..20)).unwrap(),
        );
        h.append(
            "x-a",
            HeaderValue::from_maybe_shared(buf.slice(30..33)).unwrap(),
        );
        let mut secret = HeaderValue::from_maybe_shared(buf.slice(40..48)).unwrap();
        secret.set_sensitive(true);
        h.insert("authorization", secret);
        detach_values(&mut h);
        for v in h.values() {
            assert!(
                !range.contains(&v.as_bytes().as_ptr()),
                "still in the buffer"
            );
        }
        let a: Vec<&[u8]> = h.get_all("x-a").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(a, [&b"vvvvvvvvvv"[..], b"vvv"]);
        assert_eq!(h["authorization"].as_bytes(), b"vvvvvvvv");
        assert!(h["authorization"].is_sensitive());
    }

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
    fn hop_by_hop_headers_are_stripped() {
        let mut m = h(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut m, false);
        let names: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn names_listed_in_connection_go_whatever_the_bytes() {
        let mut m = HeaderMap::new();
        m.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-one, \x93, close").unwrap(),
        );
        m.insert("x-one", HeaderValue::from_static("1"));
        m.insert("close", HeaderValue::from_static("1"));
        m.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut m, false);
        let names: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn only_a_single_websocket_upgrade_is_an_upgrade() {
        let yes = [
            h(&[("connection", "Upgrade"), ("upgrade", "websocket")]),
            h(&[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "WebSocket"),
            ]),
        ];
        for m in &yes {
            assert!(is_upgrade_request(m), "{m:?}");
        }
        let no = [
            h(&[("connection", "upgrade"), ("upgrade", "h2c")]),
            h(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]),
            h(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]),
            h(&[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("upgrade", "h2c"),
            ]),
            h(&[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("upgrade", "websocket"),
            ]),
            h(&[("connection", "upgrade"), ("upgrade", "websocketx")]),
            h(&[("upgrade", "websocket")]),
        ];
        for m in &no {
            assert!(!is_upgrade_request(m), "{m:?}");
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        use Framing::*;
        assert_eq!(response_framing(&h(&[])), Ok(Clean));
        assert_eq!(response_framing(&h(&[("content-length", "12")])), Ok(Clean));
        assert_eq!(
            response_framing(&h(&[("transfer-encoding", "chunked")])),
            Ok(Clean)
        );
        assert_eq!(
            response_framing(&h(&[
                ("content-length", "3"),
                ("transfer-encoding", "Chunked")
            ])),
            Ok(ChunkedOverLength)
        );
        for bad in [
            h(&[("content-length", "3"), ("content-length", "3")]),
            h(&[("content-length", "3, 3")]),
            h(&[("content-length", "+3")]),
            h(&[("content-length", "")]),
            h(&[("transfer-encoding", "gzip, chunked")]),
            h(&[("transfer-encoding", "gzip")]),
            h(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ]),
        ] {
            assert!(response_framing(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut m = h(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade_request(&m));
        strip_hop_by_hop(&mut m, true);
        assert_eq!(m["connection"], "upgrade");
        assert_eq!(m["upgrade"], "websocket");
        let m = h(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(!is_upgrade_request(&m));
    }
}
