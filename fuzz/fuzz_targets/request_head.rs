//! The request head as the proxy rewrites it: client IP, hop-by-hop stripping (with and
//! without an upgrade, as responses get it), the head written upstream
//! (`headers::write_upstream_head`, parsed back with httparse), `X-Forwarded-*`, upgrade
//! detection, the host part of `Host` and a route lookup. Besides "no panic", checks the security invariants of CONTRACT §3.
//!
//! Input layout (everything is optional; short input uses defaults):
//! - byte 0: flags. bit 0: peer is IPv6 (16 bytes follow) else IPv4 (4 bytes);
//!   bit 1: add a trusted network derived from the next 5 bytes (4 address bytes and a
//!   prefix length); bit 2: proto is `https`; bit 3: trust the fixed private networks.
//! - then the peer address bytes, then (bit 1) the derived network.
//! - the rest, split on `\n`: line 1 is the `Host` value, line 2 the path, each further
//!   line a header `name:value` (split at the first `:`; lines that are not a valid
//!   header are skipped).

#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fairway::headers::{self, HOP_BY_HOP, Origin};
use fairway::route::{RouteSpec, RouteTable, host_only};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::{IpNet, Ipv4Net};
use libfuzzer_sys::fuzz_target;

struct Input<'a> {
    peer: IpAddr,
    trusted: Vec<IpNet>,
    proto: &'static str,
    host: &'a [u8],
    path: &'a [u8],
    headers: HeaderMap,
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Some(head)
}

fn decode(mut data: &[u8]) -> Input<'_> {
    let flags = take(&mut data, 1).map_or(0, |b| b[0]);
    let peer = if flags & 1 != 0 {
        match take(&mut data, 16) {
            Some(b) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap())),
            None => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    } else {
        match take(&mut data, 4) {
            Some(b) => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            None => IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        }
    };
    let mut trusted: Vec<IpNet> = Vec::new();
    if flags & 2 != 0
        && let Some(b) = take(&mut data, 5)
    {
        let net = Ipv4Net::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]), b[4] % 33)
            .expect("prefix length is at most 32");
        trusted.push(IpNet::V4(net.trunc()));
    }
    if flags & 8 != 0 {
        for n in ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8", "::1/128"] {
            trusted.push(n.parse().unwrap());
        }
    }
    let proto = if flags & 4 != 0 { "https" } else { "http" };
    let mut lines = data.split(|&b| b == b'\n');
    let host = lines.next().unwrap_or_default();
    let path = lines.next().unwrap_or_default();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value.trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    Input {
        peer,
        trusted,
        proto,
        host,
        path,
        headers,
    }
}

/// The IP as `set_forwarded` writes it: IPv4-mapped IPv6 as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every header name the `Connection` header(s) list, as an intermediary must remove them
/// (RFC 9110 §7.6.1): tokens split on `,`, trimmed, compared case-insensitively.
fn connection_named(headers: &HeaderMap) -> HashSet<HeaderName> {
    let mut out = HashSet::new();
    for v in headers.get_all(header::CONNECTION) {
        for t in v.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(t.trim_ascii()) {
                out.insert(name);
            }
        }
    }
    out
}

fn routes() -> (RouteTable, RouteTable) {
    let r = |host: Option<&'static str>, path_prefix: &'static str, upstream: usize| RouteSpec {
        host,
        path_prefix,
        upstream,
    };
    let specific = [
        r(Some("app.example.com"), "/api/", 0),
        r(Some("*.example.com"), "/", 1),
        r(Some("[::1]"), "/", 2),
        r(None, "/static", 3),
    ];
    let mut with_default = specific.to_vec();
    with_default.push(r(None, "/", 0));
    (
        RouteTable::build(&specific, 4),
        RouteTable::build(&with_default, 4),
    )
}

fuzz_target!(|data: &[u8]| {
    let input = decode(data);
    let peer = input.peer;
    let canon = canonical(peer);
    let original = input.headers;
    let lines = headers::RawFields::from_map(&original, &mut headers::Facts::default());

    // The client IP.
    let trusted = headers::is_trusted(peer, &input.trusted);
    let client = headers::client_ip(peer, &lines, &input.trusted);
    if !trusted {
        assert_eq!(client, canon, "an untrusted peer's XFF must be ignored");
    } else if !original.contains_key(&headers::X_FORWARDED_FOR) {
        assert_eq!(client, canon);
    }

    // Upgrade detection.
    let upgrade = headers::is_upgrade_request(&lines);
    if upgrade {
        let up = original.get(header::UPGRADE).expect("an upgrade needs Upgrade");
        assert!(!up.as_bytes().eq_ignore_ascii_case(b"h2c"));
        assert!(headers::has_connection_token(&original, "upgrade"));
    }
    let named = connection_named(&original);

    // Hop-by-hop stripping without an upgrade: nothing hop-by-hop survives.
    let mut plain = original.clone();
    headers::strip_hop_by_hop(&mut plain, false);
    for h in HOP_BY_HOP {
        assert!(!plain.contains_key(h), "{h} survived strip_hop_by_hop(false)");
    }
    for n in &named {
        assert!(
            !plain.contains_key(n),
            "{n}, named in Connection, survived strip_hop_by_hop(false)"
        );
    }
    // Nothing else is touched.
    for (k, v) in &original {
        if !HOP_BY_HOP.contains(&k.as_str()) && !named.contains(k) {
            assert!(plain.get_all(k).iter().any(|x| x == v), "{k} was lost");
        }
    }

    // With an upgrade: Upgrade is kept, Connection is exactly `upgrade`.
    let mut tunnel = original.clone();
    headers::strip_hop_by_hop(&mut tunnel, true);
    let conn: Vec<_> = tunnel.get_all(header::CONNECTION).iter().collect();
    assert_eq!(conn, [&HeaderValue::from_static("upgrade")]);
    for h in ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"] {
        assert!(!tunnel.contains_key(h), "{h} survived strip_hop_by_hop(true)");
    }
    assert!(
        original
            .get_all(header::UPGRADE)
            .iter()
            .eq(tunnel.get_all(header::UPGRADE).iter()),
        "Upgrade changed on an upgrade request"
    );

    // X-Forwarded-*.
    let host_value = HeaderValue::from_bytes(input.host).ok();
    let origin = Origin {
        peer,
        client,
        trusted,
        proto: input.proto,
    };
    // The head as it goes upstream, parsed back.
    let written = |upgrade: bool| -> HeaderMap {
        let mut out = bytes::BytesMut::new();
        headers::write_upstream_head(
            &mut out,
            &headers::UpstreamRequest {
                method: &http::Method::GET,
                target: "/",
                fields: &lines,
                origin: &origin,
                host: host_value.as_ref().map(HeaderValue::as_bytes),
                host_from_target: false,
                upgrade,
                http2: false,
                has_body: false,
                request_id: None,
                rules: None,
            },
        );
        let mut fields = vec![httparse::EMPTY_HEADER; original.len() + 16];
        let mut req = httparse::Request::new(&mut fields);
        let len = match req.parse(&out) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("the written head does not parse: {other:?}"),
        };
        assert_eq!(len, out.len(), "one head, nothing after it");
        let mut m = HeaderMap::new();
        for f in req.headers.iter() {
            m.append(
                HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(f.value).unwrap(),
            );
        }
        m
    };
    let fwd = written(false);
    // What goes upstream: nothing hop-by-hop, nothing Connection named (fairway's own
    // fields aside), every other field as sent.
    let ours = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "forwarded",
        "host",
    ];
    for h in HOP_BY_HOP {
        assert!(!fwd.contains_key(h), "{h} went upstream");
    }
    for n in named.iter().filter(|n| !ours.contains(&n.as_str())) {
        assert!(!fwd.contains_key(n), "{n}, named in Connection, went upstream");
    }
    for (k, v) in &original {
        let underscore = k.as_str().contains('_')
            && ours.contains(&k.as_str().replace('_', "-").as_str());
        if HOP_BY_HOP.contains(&k.as_str())
            || named.contains(k)
            || ours.contains(&k.as_str())
            || underscore
        {
            continue;
        }
        let v = v.as_bytes().trim_ascii();
        assert!(
            fwd.get_all(k).iter().any(|x| x.as_bytes() == v),
            "{k} was lost on the way upstream"
        );
    }
    if upgrade {
        let up = written(true);
        let conn: Vec<_> = up.get_all(header::CONNECTION).iter().collect();
        assert_eq!(conn, [&HeaderValue::from_static("upgrade")]);
        assert_eq!(up.get_all(header::UPGRADE).iter().count(), 1);
    }
    let peer_text = canon.to_string();
    let xff: Vec<_> = fwd.get_all(&headers::X_FORWARDED_FOR).iter().collect();
    assert_eq!(xff.len(), 1, "exactly one X-Forwarded-For");
    // A trusted proxy's own X-Forwarded-Proto/-Host and X-Real-IP are kept as sent (even
    // repeated); an untrusted peer's are replaced by exactly one value.
    let proto: Vec<_> = fwd.get_all(&headers::X_FORWARDED_PROTO).iter().collect();
    assert!(!proto.is_empty(), "X-Forwarded-Proto is set");
    let real: Vec<_> = fwd.get_all(&headers::X_REAL_IP).iter().collect();
    assert!(!real.is_empty(), "X-Real-IP is set");
    if trusted {
        // Appended to what the trusted proxy sent.
        assert!(
            xff[0].as_bytes().ends_with(peer_text.as_bytes()),
            "XFF {:?} does not end with the peer {peer_text}",
            xff[0]
        );
    } else {
        assert_eq!(xff[0], peer_text.as_str(), "XFF from an untrusted peer");
        let fwd_7239: Vec<_> = fwd.get_all(header::FORWARDED).iter().collect();
        assert_eq!(fwd_7239.len(), 1, "exactly one Forwarded");
        assert_eq!(real.len(), 1, "exactly one X-Real-IP");
        assert_eq!(proto.len(), 1, "exactly one X-Forwarded-Proto");
        assert_eq!(real[0], peer_text.as_str(), "X-Real-IP from an untrusted peer");
        assert_eq!(proto[0], input.proto, "X-Forwarded-Proto from an untrusted peer");
        let fh: Vec<_> = fwd.get_all(&headers::X_FORWARDED_HOST).iter().collect();
        match &host_value {
            Some(h) => assert_eq!(
                fh[0].as_bytes(),
                h.as_bytes().trim_ascii(),
                "X-Forwarded-Host from an untrusted peer"
            ),
            None => assert!(fh.is_empty(), "a forged X-Forwarded-Host survived"),
        }
    }

    // Host and route.
    let host_text = std::str::from_utf8(input.host).unwrap_or("");
    let h = host_only(host_text);
    assert!(host_text.starts_with(h), "host_only returns a prefix");
    let path = std::str::from_utf8(input.path).unwrap_or("/");
    let (specific, with_default) = routes();
    if let Some(i) = specific.lookup(h, path) {
        assert!(i < 4);
    }
    let i = with_default
        .lookup(h, path)
        .expect("a catch-all route matches every request");
    assert!(i < 4);
    // Case of the host never changes the answer.
    assert_eq!(
        specific.lookup(&h.to_ascii_uppercase(), path),
        specific.lookup(&h.to_ascii_lowercase(), path)
    );
});
