//! Response heads written to clients (RFC 9112 §4, §6): the status line, the fields as the
//! response holds them, a `date` unless it has one, and the framing and connection fields
//! the client connection needs.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};

use crate::headers::RawFields;
use crate::headers::X_REQUEST_ID;

/// How the body of a response is delimited on the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body may follow (a response to HEAD; 1xx, 204, 304): the fields go as they are.
    NoBody,
    /// The response's own `Content-Length` frames it.
    Declared,
    /// A `content-length` of this value is added.
    Length(u64),
    /// `transfer-encoding: chunked` is added, and the body is sent in chunks.
    Chunked,
    /// The body ends when the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// What the `connection` field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Nothing: an HTTP/1.1 connection stays open.
    Default,
    /// `connection: keep-alive` (to an HTTP/1.0 client that asked for it).
    KeepAlive,
    /// `connection: close`.
    Close,
    /// `connection: upgrade` (a `101`; the response's own `upgrade` field goes with it).
    Upgrade,
}

/// Writes a response head for a client: the upstream's field lines as they came (`raw`,
/// less the hop-by-hop ones and those `headers` replaces), then `headers`, then the
/// request's `x-request-id` when given (it replaces any other). The response's `connection`
/// field is replaced by `persist`; `framing` adds the field that delimits the body.
#[allow(clippy::too_many_arguments)]
pub fn write_head(
    out: &mut BytesMut,
    status: StatusCode,
    raw: Option<&RawFields>,
    headers: &HeaderMap,
    request_id: Option<&HeaderValue>,
    framing: Framing,
    persist: Persist,
) {
    out.reserve(256);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    if let Some(raw) = raw {
        raw.write(out, headers, request_id.is_some());
    }
    for (name, value) in headers {
        if name == header::CONNECTION || (request_id.is_some() && name == X_REQUEST_ID) {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if let Some(id) = request_id {
        out.put_slice(b"x-request-id: ");
        out.put_slice(id.as_bytes());
        out.put_slice(b"\r\n");
    }
    // The upstream's own `Date` first: it is nearly always there, and the lookup is not.
    if !raw.is_some_and(RawFields::has_date) && !headers.contains_key(header::DATE) {
        put_date(out);
    }
    match framing {
        Framing::Length(n) => {
            out.put_slice(b"content-length: ");
            let mut digits = [0u8; 20];
            out.put_slice(decimal(&mut digits, n));
            out.put_slice(b"\r\n");
        }
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::NoBody | Framing::Declared | Framing::Close => {}
    }
    match persist {
        Persist::Default => {}
        Persist::KeepAlive => out.put_slice(b"connection: keep-alive\r\n"),
        Persist::Close => out.put_slice(b"connection: close\r\n"),
        Persist::Upgrade => out.put_slice(b"connection: upgrade\r\n"),
    }
    out.put_slice(b"\r\n");
}

/// The decimal digits of `n`, in `out`.
fn decimal(out: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &out[i..]
}

/// The size line of a chunk of `len` bytes (`len` in hex, CRLF), into `out`.
pub fn chunk_size_line(out: &mut [u8; 18], len: usize) -> &[u8] {
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        out[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out[16] = b'\r';
    out[17] = b'\n';
    &out[i..]
}

thread_local! {
    /// The `date` line of the current second, formatted once per second per thread.
    static DATE: RefCell<(u64, [u8; 37])> = const { RefCell::new((u64::MAX, [0; 37])) };
}

/// Puts a `date: <IMF-fixdate>` line.
fn put_date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            let line = format!("date: {text}\r\n");
            if line.len() == d.1.len() {
                d.1.copy_from_slice(line.as_bytes());
                d.0 = secs;
            } else {
                out.put_slice(line.as_bytes());
                return;
            }
        }
        out.put_slice(&d.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(status: u16, fields: &[(&str, &str)], framing: Framing, persist: Persist) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = BytesMut::new();
        write_head(
            &mut out,
            StatusCode::from_u16(status).unwrap(),
            None,
            &h,
            None,
            framing,
            persist,
        );
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn writes_status_fields_date_framing_and_connection() {
        let s = head(
            200,
            &[("x-a", "1"), ("connection", "keep-alive"), ("x-a", "2")],
            Framing::Length(1234),
            Persist::Close,
        );
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\nx-a: 2\r\ndate: "),
            "{s}"
        );
        assert!(
            s.ends_with(" GMT\r\ncontent-length: 1234\r\nconnection: close\r\n\r\n"),
            "{s}"
        );
        let s = head(
            299,
            &[("date", "Thu, 01 Jan 1970 00:00:00 GMT")],
            Framing::Chunked,
            Persist::Default,
        );
        assert_eq!(
            s,
            "HTTP/1.1 299 \r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        let s = head(
            101,
            &[("upgrade", "websocket")],
            Framing::NoBody,
            Persist::Upgrade,
        );
        assert!(s.ends_with("\r\nconnection: upgrade\r\n\r\n"), "{s}");
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let mut out = BytesMut::new();
        put_date(&mut out);
        put_date(&mut out);
        let s = String::from_utf8(out.to_vec()).unwrap();
        let lines: Vec<&str> = s.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 2);
        assert!(
            httpdate::parse_http_date(&lines[1]["date: ".len()..]).is_ok(),
            "{s}"
        );
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size_line(&mut b, 0), b"0\r\n");
        assert_eq!(chunk_size_line(&mut b, 255), b"ff\r\n");
        assert_eq!(chunk_size_line(&mut b, 0x10000), b"10000\r\n");
    }
}

/// A response head written from the upstream's lines, against the same head written from a
/// header map.
#[cfg(test)]
mod from_lines {
    use super::*;
    use crate::h1::parse_response;
    use http::HeaderName;

    /// The head as the client gets it: from the lines, or from the header map the way it
    /// was always written (hop-by-hop fields stripped by the facts).
    fn both(raw: &str, set: &[(&str, &str)]) -> (String, String) {
        let (head, _) = parse_response(&mut BytesMut::from(raw.as_bytes()))
            .unwrap()
            .unwrap();
        let mut extra = HeaderMap::new();
        for (k, v) in set {
            extra.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut from_lines = BytesMut::new();
        write_head(
            &mut from_lines,
            head.status,
            Some(&head.fields),
            &extra,
            None,
            Framing::Declared,
            Persist::Default,
        );
        let mut map = head.fields.to_map().unwrap();
        crate::headers::strip_known(&mut map, &head.facts, false);
        for (k, v) in &extra {
            map.insert(k.clone(), v.clone());
        }
        let mut from_map = BytesMut::new();
        write_head(
            &mut from_map,
            head.status,
            None,
            &map,
            None,
            Framing::Declared,
            Persist::Default,
        );
        (
            String::from_utf8(from_lines.to_vec()).unwrap(),
            String::from_utf8(from_map.to_vec()).unwrap(),
        )
    }

    #[test]
    fn lines_are_written_as_the_header_map_was() {
        // The same lines, in the order the response gave them; a header map keeps only
        // the order of each name's values. The `date` line the proxy adds may differ.
        let lines = |s: &str| {
            let mut l: Vec<String> = s
                .split("\r\n")
                .map(|l| {
                    if l.starts_with("date: ") {
                        "date".into()
                    } else {
                        l.into()
                    }
                })
                .collect();
            l.sort_by(|a, b| a.split(':').next().cmp(&b.split(':').next()));
            l
        };
        for raw in [
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\
             X-Upstream: b1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\n\
             Keep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            // Every hop-by-hop field, and the names `Connection` lists (in any case).
            "HTTP/1.1 200 OK\r\nConnection: close, X-Secret, Upgrade\r\nx-secret: 1\r\n\
             X-SECRET: 2\r\nClose: c\r\nProxy-Connection: x\r\nTE: trailers\r\n\
             Trailer: x\r\nUpgrade: h2c\r\nX-Kept: k\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: a\r\nConnection: b\r\nA: 1\r\nB: 2\r\nC: 3\r\n\
             Content-Length: 1\r\n\r\n",
            // Lines not written as `name: value` CRLF: other white space, a bare LF.
            "HTTP/1.1 200 OK\nX-A:   spaced\t\nX-B:b\r\nX-C: c\r\nContent-Length: 1\n\n",
        ] {
            let (from_lines, from_map) = both(raw, &[]);
            assert_eq!(lines(&from_lines), lines(&from_map), "{raw}");
            assert!(
                !from_lines.contains("eep-alive") && !from_lines.contains("secret"),
                "{from_lines}"
            );
            assert!(
                !from_lines.replace("\r\n", "").contains('\n'),
                "bare LF: {from_lines:?}"
            );
            // As the response ordered them.
            let kept: Vec<&str> = raw
                .split('\n')
                .filter_map(|l| l.split(':').next())
                .map(str::trim)
                .filter(|n| from_lines.contains(&format!("\r\n{}:", n.to_ascii_lowercase())))
                .collect();
            let written: Vec<&str> = from_lines
                .split("\r\n")
                .skip(1)
                .filter_map(|l| l.split(':').next())
                .filter(|n| !n.is_empty() && (*n != "date" || raw.contains("Date:")))
                .collect();
            assert_eq!(
                kept.iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect::<Vec<_>>(),
                written,
                "{from_lines}"
            );
        }
    }

    #[test]
    fn a_date_or_length_that_connection_lists_is_not_claimed() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: Date, content-length\r\n\
                   Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Length: 2\r\n\r\n";
        let (head, _) = parse_response(&mut BytesMut::from(raw.as_bytes()))
            .unwrap()
            .unwrap();
        assert!(!head.fields.has_date() && !head.fields.has_length());
        let (from_lines, _) = both(raw, &[]);
        assert!(!from_lines.contains("1970") && !from_lines.contains("content-length"));
        // The proxy's own date stands in, as for a head without one.
        assert!(from_lines.contains("\r\ndate: "), "{from_lines}");
    }

    #[test]
    fn a_field_the_proxy_sets_replaces_the_responses() {
        let raw = "HTTP/1.1 200 OK\r\nX-Request-Id: theirs\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n";
        let (lines, _) = both(raw, &[("x-request-id", "ours")]);
        assert!(lines.contains("x-a: 1\r\n"), "{lines}");
        assert!(lines.contains("x-request-id: ours\r\n"), "{lines}");
        assert!(!lines.contains("theirs"), "{lines}");
    }

    #[test]
    fn the_requests_id_as_a_line_replaces_the_responses_from_lines_and_from_a_map() {
        let raw = "HTTP/1.1 200 OK\r\nX-Request-Id: upstream\r\nA: 1\r\nContent-Length: 0\r\n\r\n";
        let (head, _) = parse_response(&mut BytesMut::from(raw.as_bytes()))
            .unwrap()
            .unwrap();
        let id = http::HeaderValue::from_static("ours");
        let mut from_lines = BytesMut::new();
        write_head(
            &mut from_lines,
            head.status,
            Some(&head.fields),
            &HeaderMap::new(),
            Some(&id),
            Framing::Declared,
            Persist::Default,
        );
        let mut from_map = BytesMut::new();
        write_head(
            &mut from_map,
            head.status,
            None,
            &head.fields.to_map().unwrap(),
            Some(&id),
            Framing::Declared,
            Persist::Default,
        );
        for out in [from_lines, from_map] {
            let text = String::from_utf8(out.to_vec()).unwrap();
            assert_eq!(text.matches("x-request-id: ").count(), 1, "{text}");
            assert!(text.contains("x-request-id: ours\r\n"), "{text}");
            assert!(text.contains("a: 1\r\n"), "{text}");
        }
    }

    #[test]
    fn notes_date_and_length_and_refuses_control_characters() {
        let (head, _) = parse_response(&mut BytesMut::from(
            &b"HTTP/1.1 204 No Content\r\nDATE: x\r\n\r\n"[..],
        ))
        .unwrap()
        .unwrap();
        assert!(head.fields.has_date() && !head.fields.has_length());
        let (head, _) = parse_response(&mut BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"[..],
        ))
        .unwrap()
        .unwrap();
        assert!(!head.fields.has_date() && head.fields.has_length());
        assert!(
            parse_response(&mut BytesMut::from(
                &b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n"[..]
            ))
            .is_err()
        );
    }
}
