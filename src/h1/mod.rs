//! The HTTP/1.1 wire format (RFC 9112): towards upstream servers, request heads written
//! from a header map, response heads scanned ([`scan`]) straight from the connection's
//! buffer and the body length a response head implies; from clients, request heads and
//! their body length ([`request`]), and the response heads written to them ([`response`]);
//! the chunked coding both ways ([`chunked`]).

pub mod chunked;
pub mod request;
pub mod response;
pub mod scan;

use bytes::{BufMut, BytesMut};
use http::header::HeaderMap;

use crate::headers::{Facts, Lines, RawFields};
use http::{Method, StatusCode, Version};

/// The most header fields in a response head.
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// The largest response head (status line, fields, final CRLF).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status code.
    pub status: StatusCode,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: Version,
    /// The field lines, as they came.
    pub fields: RawFields,
    /// What its framing and connection fields say.
    pub facts: Facts,
}

/// Why a response head cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Over [`MAX_RESPONSE_HEAD`] bytes or [`MAX_RESPONSE_HEADERS`] fields.
    #[error("response head too large")]
    TooLarge,
    /// Not a valid HTTP/1.x response head.
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
}

/// Parses a response head at the start of `buf`: `Ok(None)` until it is complete, then
/// the head, taken off the front of `buf` (its names put in lower case where they lie),
/// and its length in bytes. Obs-fold, bare CR, a malformed status line or field are errors
/// (RFC 9112 §2.2, §4, §5).
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let ((code, minor), lines, facts, len) = match read_head(
        buf,
        scan::status_line,
        MAX_RESPONSE_HEADERS,
        MAX_RESPONSE_HEAD,
    ) {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(None),
        Err(None) => return Err(HeadError::TooLarge),
        Err(Some(why)) => return Err(HeadError::Malformed(why)),
    };
    let Ok(status) = StatusCode::from_u16(code) else {
        lines.discard();
        return Err(HeadError::Malformed("invalid status code"));
    };
    let version = match minor {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let fields = lines.into_fields(buf.split_to(len).freeze(), &facts);
    Ok(Some((
        ResponseHead {
            status,
            version,
            fields,
            facts,
        },
        len,
    )))
}

/// A head read by [`read_head`]: its start line's parts, its lines and facts, its length.
pub(crate) type Head<L> = (L, Lines, Facts, usize);

/// A head at the start of `buf`: its start line's parts (read by `start_line`), its lines
/// (names lowered in `buf`) and facts, and its length. `Ok(None)` while it may be incomplete,
/// `Err(None)` over `max_fields` lines or `max_len` bytes, `Err(Some(why))` when malformed.
/// The head is left in `buf` for the caller to take.
pub(crate) fn read_head<L>(
    buf: &mut [u8],
    start_line: fn(&[u8]) -> scan::Step<(L, usize)>,
    max_fields: usize,
    max_len: usize,
) -> Result<Option<Head<L>>, Option<&'static str>> {
    let mut facts = Facts::default();
    let mut lines = Lines::with_room(16);
    let scanned = match start_line(buf) {
        Ok(Some((line, at))) => scan::fields(buf, at, max_fields, &mut lines, &mut facts)
            .map(|end| end.map(|end| (line, end))),
        Ok(None) => Ok(None),
        Err(stop) => Err(stop),
    };
    let found = match scanned {
        Ok(Some((line, len))) if len <= max_len => return Ok(Some((line, lines, facts, len))),
        Ok(None) if buf.len() <= max_len => Ok(None),
        Ok(_) | Err(scan::Stop::TooMany) => Err(None),
        Err(scan::Stop::Bad(why)) => Err(Some(why)),
    };
    lines.discard();
    found
}

/// Whether `buf` holds an empty line (the end of a head: LF, then LF or CRLF) ending at or
/// after `from`.
pub fn has_empty_line(buf: &[u8], from: usize) -> bool {
    let mut i = from;
    while let Some(at) = buf
        .get(i..)
        .and_then(|b| b.iter().position(|&c| c == b'\n'))
    {
        let lf = i + at;
        match buf.get(lf + 1..) {
            Some([b'\n', ..] | [b'\r', b'\n', ..]) => return true,
            _ => i = lf + 1,
        }
    }
    false
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body: a response to HEAD, 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Known(u64),
    /// The chunked coding.
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// The body length the response to a `method` request with this head has. An invalid or
/// conflicting framing is read until close here; the proxy refuses such a head before it
/// reads any body (`headers::response_framing`).
pub fn body_length(method: &Method, head: &ResponseHead) -> BodyLength {
    let s = head.status.as_u16();
    if *method == Method::HEAD || (100..200).contains(&s) || s == 204 || s == 304 {
        return BodyLength::Empty;
    }
    let f = &head.facts;
    if f.codings > 0 {
        return if f.codings == 1 && f.chunked_last {
            BodyLength::Chunked
        } else {
            BodyLength::UntilClose
        };
    }
    match (f.lengths, f.length) {
        (1, Some(0)) => BodyLength::Empty,
        (1, Some(n)) => BodyLength::Known(n),
        _ => BodyLength::UntilClose,
    }
}

/// Writes a request head: `METHOD target HTTP/1.1`, the fields as they are in `headers`
/// (names in lower case), `Transfer-Encoding: chunked` when `chunked`, and the final
/// CRLF.
pub fn write_request_head(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    chunked: bool,
) {
    let size = headers
        .iter()
        .fold(method.as_str().len() + target.len() + 16, |n, (k, v)| {
            n + k.as_str().len() + v.len() + 4
        })
        + if chunked { 28 } else { 0 };
    out.reserve(size);
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (k, v) in headers {
        out.put_slice(k.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
    if chunked {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{self, HeaderValue};

    fn parse(s: &str) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        parse_response(&mut BytesMut::from(s.as_bytes()))
    }

    #[test]
    fn parses_a_head_and_keeps_field_order() {
        let raw = "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Dup: one\r\nset-cookie: b=2\r\nContent-Length: 5\r\n\r\nhello";
        let (head, len) = parse(raw).unwrap().unwrap();
        assert_eq!(len, raw.len() - 5);
        assert_eq!(head.status, 200);
        assert_eq!(head.version, Version::HTTP_11);
        let map = head.fields.to_map().unwrap();
        let cookies: Vec<_> = map.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(body_length(&Method::GET, &head), BodyLength::Known(5));
        assert_eq!(body_length(&Method::HEAD, &head), BodyLength::Empty);
    }

    #[test]
    fn finds_the_empty_line_that_ends_a_head() {
        let head = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n";
        assert!(has_empty_line(head, 0));
        assert!(has_empty_line(head, head.len() - 4));
        assert!(!has_empty_line(head, head.len() - 2));
        assert!(has_empty_line(b"HTTP/1.1 200 OK\nA: b\n\n", 0));
        for partial in [
            &b"HTTP/1.1 200 OK\r\nA: b\r\n"[..],
            b"HTTP/1.1 200 OK\r\nA: b\r\n\r",
            b"",
        ] {
            assert!(!has_empty_line(partial, 0));
        }
        assert!(!has_empty_line(b"x", 5));
    }

    #[test]
    fn waits_for_a_complete_head_and_bounds_it() {
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let mut big = String::from("HTTP/1.1 200 OK\r\n");
        while big.len() <= MAX_RESPONSE_HEAD {
            big.push_str("X-Pad: 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(parse(&big).err(), Some(HeadError::TooLarge));
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_RESPONSE_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(&many).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn refuses_malformed_heads() {
        for bad in [
            "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn body_lengths_follow_rfc_9112() {
        let len = |status: &str, fields: &str| {
            let raw = format!("HTTP/1.1 {status} X\r\n{fields}\r\n");
            body_length(&Method::GET, &parse(&raw).unwrap().unwrap().0)
        };
        assert_eq!(len("204", "Content-Length: 5\r\n"), BodyLength::Empty);
        assert_eq!(len("304", "Content-Length: 5\r\n"), BodyLength::Empty);
        assert_eq!(len("200", "Content-Length: 0\r\n"), BodyLength::Empty);
        assert_eq!(
            len("200", "Transfer-Encoding: chunked\r\n"),
            BodyLength::Chunked
        );
        assert_eq!(
            len("200", "Transfer-Encoding: gzip, chunked\r\n"),
            BodyLength::Chunked
        );
        assert_eq!(
            len("200", "Transfer-Encoding: chunked, gzip\r\n"),
            BodyLength::UntilClose
        );
        assert_eq!(
            len("200", "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
            BodyLength::Chunked
        );
        assert_eq!(len("200", ""), BodyLength::UntilClose);
        assert_eq!(len("200", "Content-Length: +3\r\n"), BodyLength::UntilClose);
        assert_eq!(
            len("200", "Content-Length: 3\r\nContent-Length: 3\r\n"),
            BodyLength::UntilClose
        );
    }

    #[test]
    fn request_heads_are_written_in_order() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("example.com"));
        h.append("x-dup", HeaderValue::from_static("one"));
        h.append("x-dup", HeaderValue::from_static("two"));
        let mut out = BytesMut::new();
        write_request_head(&mut out, &Method::POST, "/a?b=1", &h, true);
        assert_eq!(
            &out[..],
            b"POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\nx-dup: one\r\nx-dup: two\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
