//! Request and response head rewriting, as pure functions (CONTRACT §3): what a head's
//! framing and connection fields say ([`Facts`], noted while `h1` parses it), hop-by-hop
//! stripping of response heads, upgrade detection and response framing here; a head's field
//! lines as they came ([`RawFields`]: every request's, and an HTTP/1.x response's) in
//! `headers/lines.rs`; the request head as it goes upstream, rewritten while it is written,
//! in `headers/upstream.rs`; forwarded information (and the underscore spellings of its
//! header names) and the client IP in `headers/forwarded.rs`; per-route header rules and the
//! request ID in `headers/rules.rs`; re-exported from here.

mod forwarded;
mod lines;
mod rules;
mod upstream;

pub use forwarded::{
    Origin, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP, client_ip, is_trusted,
};
pub use lines::{Field, Lines, RawFields, give_back_map, take_map};
pub use rules::{HeaderRules, X_REQUEST_ID, new_request_id, put_request_id, request_id};
pub use upstream::{UpstreamRequest, write_upstream_head};

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// RFC 9110 §5.6.2 `tchar`: the bytes of a token (a field name, a cookie name). A `match`
/// rather than a search of the symbol list: it runs per byte of every forwarded `Host`.
pub const fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~')
}

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

/// What a head's framing and connection fields say, noted field by field as the head is
/// parsed (or read off a header map with [`Facts::of`]): the proxy's decisions on framing,
/// persistence and hop-by-hop fields then need no lookup in the header map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// Which hop-by-hop fields by definition are present: bit `i` for [`HOP_BY_HOP`]`[i]`.
    pub hop: u8,
    /// `Content-Length` lines (saturating).
    pub lengths: u8,
    /// The value of the last `Content-Length` line, when it is 1 to 19 decimal digits.
    pub length: Option<u64>,
    /// `Transfer-Encoding` lines (saturating).
    pub codings: u8,
    /// The last `Transfer-Encoding` line ends with the `chunked` coding.
    pub chunked_last: bool,
    /// The last `Transfer-Encoding` line is exactly `chunked`.
    pub chunked_only: bool,
    /// `Connection` lists `close`.
    pub close: bool,
    /// `Connection` lists `keep-alive`.
    pub keep_alive: bool,
    /// `Connection` lists `upgrade`.
    pub upgrade: bool,
    /// `Connection` lists another name (a field to leave out too).
    pub lists: bool,
}

/// The bits of [`Facts::hop`].
const CONNECTION_BIT: u8 = 1;
const UPGRADE_BIT: u8 = 1 << 6;

impl Facts {
    /// Reads the facts off a header map (a head not parsed by fairway).
    pub fn of(headers: &HeaderMap) -> Facts {
        let mut f = Facts::default();
        for (name, value) in headers {
            f.note(name, value.as_bytes());
        }
        f
    }

    /// Notes one field line.
    #[inline]
    pub fn note(&mut self, name: &HeaderName, value: &[u8]) {
        let kind = if *name == header::CONTENT_LENGTH {
            Kind::ContentLength
        } else if *name == header::CONNECTION {
            Kind::Hop(0)
        } else if *name == header::TRANSFER_ENCODING {
            Kind::Hop(5)
        } else if *name == header::UPGRADE {
            Kind::Hop(6)
        } else if *name == header::TE {
            Kind::Hop(3)
        } else if *name == header::TRAILER {
            Kind::Hop(4)
        } else if *name == KEEP_ALIVE {
            Kind::Hop(1)
        } else if *name == PROXY_CONNECTION {
            Kind::Hop(2)
        } else {
            return;
        };
        self.note_kind(kind, value);
    }

    /// Notes one field line by its name in lower case; what kind of field it is.
    #[inline]
    pub fn note_raw(&mut self, name: &[u8], value: &[u8]) -> Kind {
        let kind = Kind::of_lower(name);
        self.note_kind(kind, value);
        kind
    }

    fn note_kind(&mut self, kind: Kind, value: &[u8]) {
        match kind {
            Kind::Other => {}
            Kind::ContentLength => {
                self.lengths = self.lengths.saturating_add(1);
                self.length = parse_length(value);
            }
            Kind::Hop(i) => {
                if i == 0 {
                    self.connection_tokens(value);
                } else if i == 5 {
                    self.codings = self.codings.saturating_add(1);
                    let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                    self.chunked_last = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                    self.chunked_only = value.trim_ascii().eq_ignore_ascii_case(b"chunked");
                }
                self.hop |= 1 << i;
            }
        }
    }

    fn connection_tokens(&mut self, value: &[u8]) {
        for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
                // `close` also takes out a field named `close`.
                self.lists = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if !t.is_empty() {
                self.lists = true;
            }
        }
    }
}

/// What a field is to the proxy's framing and hop-by-hop decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Content-Length`.
    ContentLength,
    /// Hop-by-hop by definition: [`HOP_BY_HOP`]`[i]`.
    Hop(u8),
    /// Anything else.
    Other,
}

impl Kind {
    /// The kind of a field by its name in lower case (as a received name is once lowered:
    /// an exact comparison costs less than one ignoring case).
    #[inline]
    pub fn of_lower(name: &[u8]) -> Kind {
        match name {
            b"te" => Kind::Hop(3),
            b"upgrade" => Kind::Hop(6),
            b"trailer" => Kind::Hop(4),
            b"connection" => Kind::Hop(0),
            b"keep-alive" => Kind::Hop(1),
            b"content-length" => Kind::ContentLength,
            b"proxy-connection" => Kind::Hop(2),
            b"transfer-encoding" => Kind::Hop(5),
            _ => Kind::Other,
        }
    }
}

/// A `Content-Length` value: 1 to 19 digits, nothing else.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Whether the request asks for a WebSocket upgrade, the only upgrade that is tunnelled:
/// `Connection` lists `upgrade` and there is exactly one `Upgrade` line, whose value is the
/// single token `websocket` (any case). Anything else (`h2c`, `websocket, h2c`, two
/// `Upgrade` lines) is no upgrade at all and its `Upgrade` is stripped like any hop-by-hop
/// header, so that no tunnel can be opened to smuggle requests past the proxy.
pub fn is_upgrade_request(fields: &RawFields) -> bool {
    websocket_only(fields.all(b"upgrade")) && lists_token(fields.all(b"connection"), "upgrade")
}

/// Whether `headers` carry exactly one `Upgrade` line naming only `websocket` (the protocol
/// a `101` switches to).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    websocket_only(
        headers
            .get_all(header::UPGRADE)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// Whether there is exactly one `Upgrade` value, naming only `websocket`.
fn websocket_only<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> bool {
    match (values.next(), values.next()) {
        (Some(v), None) => v.trim_ascii().eq_ignore_ascii_case(b"websocket"),
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
    framing_of(&Facts::of(headers))
}

/// [`response_framing`] from the facts of the head.
pub fn framing_of(f: &Facts) -> Result<Framing, &'static str> {
    let length = match f.lengths {
        0 => false,
        1 if f.length.is_some() => true,
        1 => return Err("invalid Content-Length"),
        _ => return Err("more than one Content-Length"),
    };
    match f.codings {
        0 => Ok(Framing::Clean),
        1 if f.chunked_only => Ok(if length {
            Framing::ChunkedOverLength
        } else {
            Framing::Clean
        }),
        _ => Err("unsupported Transfer-Encoding"),
    }
}

/// Whether a `Connection` header lists `token`.
pub fn has_connection_token(headers: &HeaderMap, token: &str) -> bool {
    lists_token(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
        token,
    )
}

/// Whether one of the `Connection` values lists `token`; a value with other than visible
/// ASCII lists nothing.
fn lists_token<'a>(mut values: impl Iterator<Item = &'a [u8]>, token: &str) -> bool {
    values.any(|v| {
        v.is_ascii()
            && v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
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
            names.extend(Listed::names_in(v.as_bytes()));
        }
        Listed { names }
    }

    /// The names one `Connection` value lists.
    pub(crate) fn names_in(value: &[u8]) -> impl Iterator<Item = &[u8]> {
        value
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
            })
    }
}

/// Removes hop-by-hop headers: `Connection` and the headers it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`. With `upgrade`,
/// `Upgrade` is kept and `Connection: upgrade` is set, as a tunnel needs them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let facts = Facts::of(headers);
    strip_known(headers, &facts, upgrade);
}

/// [`strip_hop_by_hop`], with the facts of the head: only the fields present are looked up.
pub fn strip_known(headers: &mut HeaderMap, facts: &Facts, upgrade: bool) {
    if facts.hop & CONNECTION_BIT != 0 {
        if facts.lists {
            let named: Vec<HeaderName> = Listed::of(headers)
                .names
                .iter()
                .filter_map(|t| HeaderName::from_bytes(t).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    let others = facts.hop & !(CONNECTION_BIT | UPGRADE_BIT);
    if others != 0 {
        for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
            if others & (1 << i) != 0 {
                headers.remove(*name);
            }
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if facts.hop & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn tchar_is_the_grammar_of_rfc_9110() {
        // tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" /
        //         "`" / "|" / "~" / DIGIT / ALPHA
        for b in 0..=u8::MAX {
            let want = b.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".as_bytes().contains(&b);
            assert_eq!(is_tchar(b), want, "byte {b:#04x}");
        }
    }

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

    /// The fields of a header map as the lines an HTTP/2 request becomes.
    pub(crate) fn lines(m: &HeaderMap) -> RawFields {
        RawFields::from_map(m, &mut Facts::default())
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
    fn each_hop_by_hop_field_sets_the_bit_of_its_place_in_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let f = Facts::of(&h(&[(name, "x")]));
            assert_eq!(f.hop, 1 << i, "{name}");
            // The same by the name's bytes, lowered.
            let mut raw = Facts::default();
            assert_eq!(raw.note_raw(name.as_bytes(), b"x"), Kind::Hop(i as u8));
            assert_eq!(raw, f, "{name}");
        }
        let mut raw = Facts::default();
        assert_eq!(raw.note_raw(b"content-length", b"12"), Kind::ContentLength);
        assert_eq!((raw.lengths, raw.length), (1, Some(12)));
        for other in ["content-lengths", "tee", "x-upgrade", "date"] {
            assert_eq!(Kind::of_lower(other.as_bytes()), Kind::Other, "{other}");
        }
    }

    #[test]
    fn facts_note_framing_and_connection_fields() {
        let f = Facts::of(&hop_by_hop_fields());
        assert_eq!(f.hop, 0b111_1111);
        assert!(f.close && f.keep_alive && f.lists && !f.upgrade);
        assert_eq!((f.codings, f.chunked_last, f.chunked_only), (1, true, true));
        assert_eq!((f.lengths, f.length), (0, None));

        let f = Facts::of(&h(&[
            ("content-length", "12"),
            ("connection", "Upgrade"),
            ("transfer-encoding", "gzip, chunked"),
            ("x-other", "close"),
        ]));
        assert_eq!(f.hop, 1 | 1 << 5);
        assert!(f.upgrade && !f.close && !f.keep_alive && !f.lists);
        assert_eq!(
            (f.codings, f.chunked_last, f.chunked_only),
            (1, true, false)
        );
        assert_eq!((f.lengths, f.length), (1, Some(12)));

        let f = Facts::of(&h(&[("connection", "keep-alive"), ("x-a", "1")]));
        assert_eq!(f.hop, 1);
        assert!(f.keep_alive && !f.lists);
        let mut m = h(&[("connection", "keep-alive"), ("x-a", "1")]);
        strip_known(&mut m, &f, false);
        assert_eq!(m, h(&[("x-a", "1")]));
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
            assert!(is_upgrade_request(&lines(m)), "{m:?}");
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
            assert!(!is_upgrade_request(&lines(m)), "{m:?}");
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
        assert!(is_upgrade_request(&lines(&m)));
        strip_hop_by_hop(&mut m, true);
        assert_eq!(m["connection"], "upgrade");
        assert_eq!(m["upgrade"], "websocket");
        let m = h(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(!is_upgrade_request(&lines(&m)));
    }
}
