//! Request and response head rewriting, as pure functions (CONTRACT §3): hop-by-hop
//! stripping of response heads, upgrade detection and response framing here; the request
//! head as it goes upstream, rewritten while it is written, in `headers/upstream.rs`;
//! forwarded information (and the underscore spellings of its header names) and the client
//! IP in `headers/forwarded.rs`; per-route header rules and the request ID in
//! `headers/rules.rs`; re-exported from here.

mod forwarded;
mod rules;
mod upstream;

pub use forwarded::{
    Origin, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP, client_ip, is_trusted,
};
pub use rules::{HeaderRules, X_REQUEST_ID, new_request_id, request_id};
pub use upstream::{UpstreamRequest, write_upstream_head};

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The hop-by-hop fields by definition (RFC 9110 §7.6.1), lowercase: besides these, every
/// name `Connection` lists.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// The names a `Connection` field lists (`close` among them, which also takes out a field
/// named `close`), besides `keep-alive` and `upgrade`, which are dealt with on their own.
pub(crate) struct Listed<'a> {
    pub(crate) names: Vec<&'a [u8]>,
}

impl<'a> Listed<'a> {
    pub(crate) fn of(headers: &'a HeaderMap) -> Listed<'a> {
        let mut names = Vec::new();
        // Bytes, not strings: a list with obs-text must still have every name it lists
        // left out (RFC 9110 §7.6.1).
        for v in headers.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|&b| b == b',') {
                let t = t.trim_ascii();
                if !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
                {
                    names.push(t);
                }
            }
        }
        Listed { names }
    }

    /// Whether `name` is listed.
    pub(crate) fn lists(&self, name: &HeaderName) -> bool {
        let n = name.as_str().as_bytes();
        self.names.iter().any(|t| t.eq_ignore_ascii_case(n))
    }
}

/// Removes hop-by-hop headers: `Connection` and the headers it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`. With `upgrade`,
/// `Upgrade` is kept and `Connection: upgrade` is set, as a tunnel needs them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names first: most responses carry none of these, and each removal
    // below is a lookup of its own.
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
            || n == header::TE
            || n == header::TRAILER
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
    };
    if !upgrade && !headers.keys().any(hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = Listed::of(headers)
            .names
            .iter()
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
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
pub(crate) mod tests {
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

    /// A header map from name-value pairs, in order (the forwarded tests use it too).
    pub(crate) fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    /// Every kind of hop-by-hop field, and one (`x-kept`) that is not.
    pub(crate) fn hop_by_hop_fields() -> HeaderMap {
        h(&[
            ("connection", "keep-alive, x-secret, close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("close", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ])
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut m = hop_by_hop_fields();
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
