//! Forwarded information (CONTRACT §3): who the client is as `trusted_proxies` allow it to
//! be known, the `X-Forwarded-For`/`-Proto`/`-Host`, `X-Real-IP` and RFC 7239 `Forwarded`
//! headers that tell the upstream, and the underscore spellings of those names that must not
//! reach it, as pure functions over a request's headers.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, BytesMut};
use http::header::HeaderName;
use ipnet::IpNet;

use super::RawFields;

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

pub(super) fn canonical(ip: IpAddr) -> IpAddr {
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
pub fn client_ip(peer: IpAddr, fields: &RawFields, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut candidate = peer;
    // Header lines right to left, entries right to left; a line with other than visible
    // ASCII is passed over.
    let lines = fields
        .all(b"x-forwarded-for")
        .rev()
        .filter_map(|v| std::str::from_utf8(v).ok().filter(|v| v.is_ascii()));
    for line in lines {
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

/// Appends the RFC 7239 forwarded-element `for=<peer>;proto=<proto>;host=<host>` to `buf`;
/// `host` is left out when the request has none. `peer` is the canonical peer address.
pub(super) fn push_forwarded_element(
    buf: &mut BytesMut,
    peer: &IpText,
    proto: &str,
    host: Option<&[u8]>,
) {
    if peer.v6 {
        // RFC 7239 §6: an IPv6 node is bracketed, and since `[` and `:` are not token
        // characters the value must be a quoted-string (§4).
        buf.extend_from_slice(b"for=\"[");
        buf.extend_from_slice(peer.as_bytes());
        buf.extend_from_slice(b"]\"");
    } else {
        buf.extend_from_slice(b"for=");
        buf.extend_from_slice(peer.as_bytes());
    }
    buf.extend_from_slice(b";proto=");
    buf.extend_from_slice(proto.as_bytes());
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        buf.extend_from_slice(b";host=");
        push_token_or_quoted(buf, host);
    }
}

/// Writes `ip` in its text form: dotted decimal, or RFC 5952 for IPv6.
pub(super) fn put_ip(out: &mut BytesMut, ip: IpAddr) {
    out.extend_from_slice(IpText::of(ip).as_bytes());
}

/// An IP address in its text form (dotted decimal, or RFC 5952 for IPv6), on the stack: a
/// request head going upstream names its peer up to three times and formats it once.
pub(super) struct IpText {
    text: [u8; 45],
    len: usize,
    /// The address is IPv6.
    pub(super) v6: bool,
}

impl IpText {
    pub(super) fn of(ip: IpAddr) -> IpText {
        let mut t = IpText {
            text: [0; 45],
            len: 0,
            v6: ip.is_ipv6(),
        };
        match ip {
            // Dotted decimal by hand: the formatting machinery costs more than the header.
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    if octet >= 100 {
                        t.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        t.push(b'0' + octet / 10 % 10);
                    }
                    t.push(b'0' + octet % 10);
                }
            }
            // Room for the longest IPv6 text there is (45 bytes, an embedded IPv4 address).
            IpAddr::V6(_) => {
                let _ = std::fmt::Write::write_fmt(&mut t, format_args!("{ip}"));
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        self.text[self.len] = b;
        self.len += 1;
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.text
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Appends `v` as a token when it is one, else as a quoted-string (RFC 7239 §4, RFC 9110
/// §5.6.4): a `Host` with a port (`:`) or an IPv6 literal (`[`, `]`) is quoted.
fn push_token_or_quoted(buf: &mut BytesMut, v: &[u8]) {
    if v.iter().all(|&b| super::is_tchar(b)) {
        buf.extend_from_slice(v);
        return;
    }
    buf.put_u8(b'"');
    for &b in v {
        if b == b'"' || b == b'\\' {
            buf.put_u8(b'\\');
        }
        buf.put_u8(b);
    }
    buf.put_u8(b'"');
}

/// The forwarded headers whose underscore spellings never go upstream.
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
/// at least one `_` in place of a `-`. Such a field never goes upstream, whoever the peer
/// is: WSGI and CGI servers turn `-` into `_` when they name headers
/// (`HTTP_X_FORWARDED_FOR`), so to them such a spelling is the real header, with a value
/// fairway never rewrote. fairway's own values travel in the canonical names only, and a
/// trusted proxy in front passes the client's underscore headers through unchanged, so none
/// of them is worth keeping.
pub(super) fn is_underscore_spelling(name: &[u8]) -> bool {
    name.contains(&b'_')
        && FORWARDED_NAMES.iter().any(|f| {
            f.len() == name.len()
                && f.bytes()
                    .zip(name)
                    .all(|(f, &n)| f == if n == b'_' { b'-' } else { n })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::tests::{h, lines};
    use crate::headers::upstream::tests::written;
    use http::{HeaderMap, HeaderValue};

    /// The forwarded fields as they go upstream, in place of the client's.
    fn set_forwarded(m: &mut HeaderMap, o: &Origin, host: Option<&HeaderValue>) {
        *m = written(m, o, host, false, false).0;
    }

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
            client_ip(ip("1.2.3.4"), &lines(&headers), &nets(&["10.0.0.0/8"])),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn client_ip_from_trusted_peer_is_rightmost_untrusted() {
        let t = nets(&["10.0.0.0/8"]);
        let headers = h(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.2")]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &lines(&headers), &t),
            ip("1.2.3.4")
        );
        let headers = h(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &lines(&headers), &t),
            ip("10.0.0.3")
        );
        let headers = h(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2:5000"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &lines(&headers), &t),
            ip("2.2.2.2")
        );
        let headers = h(&[("x-forwarded-for", "1.1.1.1, garbage, 10.0.0.9")]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &lines(&headers), &t),
            ip("10.0.0.9")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &lines(&HeaderMap::new()), &t),
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
        m.get_all(http::header::FORWARDED)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn ip_text_holds_every_address_form() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            // An IPv4-mapped address is written with its IPv4 part dotted.
            "::ffff:255.255.255.255",
            "1111:2222:3333:4444:5555:6666:255.255.255.255",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(
                IpText::of(ip).as_bytes(),
                ip.to_string().as_bytes(),
                "{text}"
            );
        }
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
        set_forwarded(&mut m, &origin("10.0.0.1", true), None);
        let mut names: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "forwarded",
                "transfer-encoding",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-real-ip",
                "x_custom",
                "x_forwarded_for_x",
                "x_request_id",
            ]
        );
        assert_eq!(m["x-forwarded-for"], "1.1.1.1, 10.0.0.1");
    }
}
