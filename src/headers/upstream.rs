//! The request head as it goes upstream, rewritten while it is written (CONTRACT §3): one
//! pass over the client's fields that leaves out the hop-by-hop ones (`Connection` and every
//! name it lists, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`,
//! `Upgrade` unless a WebSocket upgrade goes through), the underscore spellings of forwarded
//! fields and the forwarded fields fairway replaces; then fairway's own fields. The client's
//! lines are read, never changed: no field is removed from them or inserted into them.

use bytes::{BufMut, BytesMut};
use http::Method;
use http::header::{self, HeaderName, HeaderValue};

use super::RawFields;
use super::forwarded::{
    IpText, Origin, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP, canonical,
    is_underscore_spelling, push_forwarded_element, put_ip,
};
use super::rules::{HeaderRules, X_REQUEST_ID};

/// A request head to write upstream.
pub struct UpstreamRequest<'a> {
    /// The method.
    pub method: &'a Method,
    /// The request target in origin form.
    pub target: &'a str,
    /// The client's field lines.
    pub fields: &'a RawFields,
    /// Who asked, through what.
    pub origin: &'a Origin,
    /// The `Host` the client asked for (its `Host`, or HTTP/2's `:authority`, or the
    /// authority of an absolute-form target).
    pub host: Option<&'a [u8]>,
    /// `host` is an absolute-form target's authority: it replaces the client's `Host`
    /// (RFC 9112 §3.2.2).
    pub host_from_target: bool,
    /// A WebSocket upgrade goes through: `Upgrade` is kept and `Connection: upgrade` set.
    pub upgrade: bool,
    /// The request came over HTTP/2: its `cookie` crumbs are joined into one field (RFC
    /// 9113 §8.2.3).
    pub http2: bool,
    /// The request has a body.
    pub has_body: bool,
    /// The `X-Request-Id` to forward (replacing the client's), when `request_id` is on.
    pub request_id: Option<&'a HeaderValue>,
    /// The route's `request_headers`, applied after fairway's own fields.
    pub rules: Option<&'a HeaderRules>,
}

/// Writes the head of `r` to `out`, in origin form, for HTTP/1.1; returns whether the body
/// goes out chunked (it has one, and no `Content-Length` to frame it).
pub fn write_upstream_head(out: &mut BytesMut, r: &UpstreamRequest<'_>) -> bool {
    let h = r.fields;
    // Hop-by-hop lines (by definition, or named by `Connection`) are marked as parsed; the
    // fields the rewrite asks about count only when not among them.
    let sent = Sent::of(h);
    let o = r.origin;
    // From a trusted peer, the forwarded fields it set are kept (X-Forwarded-For and
    // Forwarded get this hop appended); from any other, all are replaced.
    let keep_proto = o.trusted && sent.has(Sent::X_FORWARDED_PROTO);
    let keep_host = o.trusted && sent.has(Sent::X_FORWARDED_HOST);
    let keep_real_ip = o.trusted && sent.has(Sent::X_REAL_IP);
    let join_cookies = r.http2
        && sent.has(Sent::COOKIE)
        && h.all(b"cookie").nth(1).is_some()
        && !r
            .rules
            .is_some_and(|rules| rules.overrides(&header::COOKIE));
    let has_host = sent.has(Sent::HOST) && !r.host_from_target;
    // A field of fairway's own that the route's rules remove.
    let removed = |name: &HeaderName| r.rules.is_some_and(|rules| rules.remove.contains(name));
    let chunked = r.has_body && !sent.has(Sent::CONTENT_LENGTH);

    out.reserve(
        r.method.as_str().len()
            + r.target.len()
            + h.head().len()
            + 256
            + r.host.map_or(0, |v| 3 * v.len()),
    );
    out.put_slice(r.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(r.target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    // The client's lines that go on: not hop-by-hop (an `Upgrade` of a WebSocket upgrade
    // aside), not an underscore spelling of a forwarded field, not one fairway replaces.
    h.write_where(out, |f| {
        let name = f.name;
        let replaced = match name {
            b"x-forwarded-for" | b"forwarded" => true,
            b"x-forwarded-proto" => !keep_proto,
            b"x-forwarded-host" => !keep_host,
            b"x-real-ip" => !keep_real_ip,
            b"cookie" => join_cookies,
            b"host" => r.host_from_target,
            b"x-request-id" => r.request_id.is_some(),
            _ => false,
        } || r.rules.is_some_and(|rules| rules.overrides_name(name));
        !replaced && (!f.hop || (r.upgrade && name == b"upgrade")) && !is_underscore_spelling(name)
    });
    if !has_host && let Some(host) = r.host {
        field(out, "host", host);
    }
    if r.upgrade {
        field(out, "connection", b"upgrade");
    }
    if join_cookies {
        out.put_slice(b"cookie: ");
        let mut first = true;
        for v in h.all(b"cookie").filter(|v| !v.is_empty()) {
            if !first {
                out.put_slice(b"; ");
            }
            first = false;
            out.put_slice(v);
        }
        out.put_slice(b"\r\n");
    }

    let peer = IpText::of(canonical(o.peer));
    // X-Forwarded-For: what a trusted peer sent, then this hop's peer.
    if !removed(&X_FORWARDED_FOR) {
        out.put_slice(b"x-forwarded-for: ");
        if o.trusted
            && sent.has(Sent::X_FORWARDED_FOR)
            && join_values(out, h.all(b"x-forwarded-for"))
        {
            out.put_slice(b", ");
        }
        out.put_slice(peer.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !keep_proto && !removed(&X_FORWARDED_PROTO) {
        field(out, "x-forwarded-proto", o.proto.as_bytes());
    }
    if !keep_host
        && !removed(&X_FORWARDED_HOST)
        && let Some(host) = r.host
    {
        field(out, "x-forwarded-host", host);
    }
    if !keep_real_ip && !removed(&X_REAL_IP) {
        out.put_slice(b"x-real-ip: ");
        if o.trusted {
            put_ip(out, o.client);
        } else {
            out.put_slice(peer.as_bytes());
        }
        out.put_slice(b"\r\n");
    }
    // Forwarded (RFC 7239): the same, as one list of elements.
    if !removed(&header::FORWARDED) {
        out.put_slice(b"forwarded: ");
        if o.trusted && sent.has(Sent::FORWARDED) && join_values(out, h.all(b"forwarded")) {
            out.put_slice(b", ");
        }
        push_forwarded_element(out, &peer, o.proto, r.host);
        out.put_slice(b"\r\n");
    }
    if let Some(id) = r.request_id
        && !removed(&X_REQUEST_ID)
    {
        field(out, "x-request-id", id.as_bytes());
    }
    if let Some(rules) = r.rules {
        for (name, value) in &rules.set {
            field(out, name.as_str(), value.as_bytes());
        }
    }

    if chunked {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    }
    out.put_slice(b"\r\n");
    chunked
}

/// Which of the fields the rewrite asks about the client sent (not as hop-by-hop lines),
/// noted in one pass over the lines instead of a search each.
#[derive(Default)]
struct Sent(u8);

impl Sent {
    const HOST: u8 = 1;
    const CONTENT_LENGTH: u8 = 1 << 1;
    const COOKIE: u8 = 1 << 2;
    const FORWARDED: u8 = 1 << 3;
    const X_FORWARDED_FOR: u8 = 1 << 4;
    const X_FORWARDED_PROTO: u8 = 1 << 5;
    const X_FORWARDED_HOST: u8 = 1 << 6;
    const X_REAL_IP: u8 = 1 << 7;

    fn of(h: &RawFields) -> Sent {
        let mut bits = 0u8;
        for f in h.iter().filter(|f| !f.hop) {
            bits |= match f.name {
                b"host" => Sent::HOST,
                b"content-length" => Sent::CONTENT_LENGTH,
                b"cookie" => Sent::COOKIE,
                b"forwarded" => Sent::FORWARDED,
                b"x-forwarded-for" => Sent::X_FORWARDED_FOR,
                b"x-forwarded-proto" => Sent::X_FORWARDED_PROTO,
                b"x-forwarded-host" => Sent::X_FORWARDED_HOST,
                b"x-real-ip" => Sent::X_REAL_IP,
                _ => 0,
            };
        }
        Sent(bits)
    }

    /// Whether the field of `bit` was sent.
    fn has(&self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

fn field(out: &mut BytesMut, name: &str, value: &[u8]) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Writes the `values` of one field, trimmed, empty ones skipped, joined with `, ` (several
/// field lines of a list-based field are one list, RFC 9110 §5.3); whether any was written.
fn join_values<'a>(out: &mut BytesMut, values: impl Iterator<Item = &'a [u8]>) -> bool {
    let mut any = false;
    for v in values {
        let v = v.trim_ascii();
        if v.is_empty() {
            continue;
        }
        if any {
            out.put_slice(b", ");
        }
        out.put_slice(v);
        any = true;
    }
    any
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::headers::tests::{h, lines};
    use http::HeaderMap;

    pub(in crate::headers) fn origin(peer: &str, trusted: bool) -> Origin {
        Origin {
            peer: peer.parse().unwrap(),
            client: peer.parse().unwrap(),
            trusted,
            proto: "http",
        }
    }

    /// The head written for `headers`, parsed back: its fields, and whether the body goes
    /// chunked.
    pub(in crate::headers) fn written(
        headers: &HeaderMap,
        origin: &Origin,
        host: Option<&HeaderValue>,
        upgrade: bool,
        http2: bool,
    ) -> (HeaderMap, bool) {
        let mut out = BytesMut::new();
        let chunked = write_upstream_head(
            &mut out,
            &UpstreamRequest {
                method: &Method::POST,
                target: "/t?q=1",
                fields: &lines(headers),
                origin,
                host: host.map(HeaderValue::as_bytes),
                host_from_target: false,
                upgrade,
                http2,
                has_body: true,
                request_id: None,
                rules: None,
            },
        );
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        let len = req.parse(&out).unwrap().unwrap();
        assert_eq!(len, out.len(), "one head, nothing after it");
        assert_eq!(
            (req.method, req.path, req.version),
            (Some("POST"), Some("/t?q=1"), Some(1))
        );
        let mut m = HeaderMap::new();
        for f in req.headers.iter() {
            m.append(
                HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(f.value).unwrap(),
            );
        }
        (m, chunked)
    }

    fn names(m: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = m.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    const OURS: [&str; 5] = [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
        "transfer-encoding",
    ];

    #[test]
    fn hop_by_hop_fields_and_the_names_connection_lists_are_left_out() {
        let m = crate::headers::tests::hop_by_hop_fields();
        let (w, chunked) = written(&m, &origin("1.2.3.4", false), None, false, false);
        assert!(chunked);
        let mut want: Vec<&str> = OURS.to_vec();
        want.push("x-kept");
        want.sort_unstable();
        assert_eq!(names(&w), want);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_says_connection_upgrade() {
        let m = h(&[
            ("connection", "Upgrade, x-secret"),
            ("x-secret", "1"),
            ("upgrade", "websocket"),
            ("host", "app"),
        ]);
        let host = HeaderValue::from_static("app");
        let (w, _) = written(&m, &origin("1.2.3.4", false), Some(&host), true, false);
        assert_eq!(w["connection"], "upgrade");
        assert_eq!(w["upgrade"], "websocket");
        assert_eq!(w["host"], "app");
        assert!(!w.contains_key("x-secret"));
    }

    #[test]
    fn obs_text_in_connection_still_leaves_out_what_it_lists() {
        let mut m = h(&[("x-secret", "1"), ("x-kept", "1")]);
        m.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, caf\xe9").unwrap(),
        );
        let (w, _) = written(&m, &origin("1.2.3.4", false), None, false, false);
        assert!(!w.contains_key("x-secret"));
        assert!(w.contains_key("x-kept"));
    }

    #[test]
    fn a_length_frames_the_body_unless_connection_lists_it() {
        let m = h(&[("content-length", "5")]);
        let (w, chunked) = written(&m, &origin("1.2.3.4", false), None, false, false);
        assert!(!chunked);
        assert_eq!(w["content-length"], "5");
        assert!(!w.contains_key("transfer-encoding"));
        let m = h(&[("content-length", "5"), ("connection", "content-length")]);
        let (w, chunked) = written(&m, &origin("1.2.3.4", false), None, false, false);
        assert!(chunked);
        assert!(!w.contains_key("content-length"));
        assert_eq!(w["transfer-encoding"], "chunked");
    }

    #[test]
    fn the_host_asked_for_is_sent_when_the_client_sent_none() {
        let host = HeaderValue::from_static("app.example");
        let (w, _) = written(
            &HeaderMap::new(),
            &origin("1.2.3.4", false),
            Some(&host),
            false,
            true,
        );
        assert_eq!(w["host"], "app.example");
        assert_eq!(w["x-forwarded-host"], "app.example");
    }

    #[test]
    fn http2_cookie_crumbs_are_joined_into_one_field() {
        let o = origin("1.2.3.4", false);
        let m = h(&[
            ("cookie", "a=1"),
            ("cookie", ""),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
        ]);
        let (w, _) = written(&m, &o, None, false, true);
        let v: Vec<_> = w.get_all("cookie").iter().collect();
        assert_eq!(v, ["a=1; b=2; c=3"]);
        let m = h(&[("cookie", "a=1; b=2")]);
        let (w, _) = written(&m, &o, None, false, true);
        assert_eq!(w["cookie"], "a=1; b=2");
        // HTTP/1.1 cookies are passed as they came.
        let m = h(&[("cookie", "a=1"), ("cookie", "b=2")]);
        let (w, _) = written(&m, &o, None, false, false);
        assert_eq!(w.get_all("cookie").iter().count(), 2);
    }

    #[test]
    fn addresses_are_written_as_they_display() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.100.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = BytesMut::new();
            put_ip(&mut out, ip);
            assert_eq!(&out[..], ip.to_string().as_bytes());
        }
    }
}
