//! Client request heads (RFC 9112 §3, §5, §6.3), scanned (`scan`) straight from the
//! connection's buffer, with every framing rule of HTTP1-RULES "reading a request from a
//! client" checked: the request line and fields, the head size and field count, and how
//! long the body is (`Transfer-Encoding` against `Content-Length`, folded lengths, HTTP/1.0).

use bytes::{Bytes, BytesMut};
use http::{Method, Uri, Version};

use super::scan;
use crate::headers::{Facts, RawFields, parse_length};

/// The most fields in a request head.
pub const MAX_REQUEST_FIELDS: usize = 128;

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The request target, as sent (origin, absolute, authority or asterisk form).
    pub uri: Uri,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: Version,
    /// The field lines, in order.
    pub fields: RawFields,
    /// How long the body is.
    pub length: RequestLength,
    /// The connection closes after the response: the client asked (`Connection: close`, or
    /// HTTP/1.0 without `keep-alive`), or the head framed its body by `Transfer-Encoding`
    /// beside a `Content-Length` (RFC 9112 §6.3).
    pub close: bool,
    /// The head's length in bytes.
    pub len: usize,
}

/// How a request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestLength {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Known(u64),
    /// The chunked coding.
    Chunked,
}

/// Why a request head is refused, and with which status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Over the head size limit or [`MAX_REQUEST_FIELDS`] fields: 431.
    #[error("request head too large")]
    TooLarge,
    /// Not a valid HTTP/1.x request head, or a body whose length cannot be known: 400.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A body in a transfer coding other than chunked (before the final chunked): 501, as
    /// RFC 9112 §6.1 asks of a coding the server does not understand. Decoding the chunks
    /// and forwarding the rest as it is would hand the upstream coded bytes as plain.
    #[error("unsupported request: {0}")]
    Unsupported(&'static str),
}

impl RequestError {
    /// The status of the answer.
    pub fn status(self) -> u16 {
        match self {
            RequestError::TooLarge => 431,
            RequestError::Malformed(_) => 400,
            RequestError::Unsupported(_) => 501,
        }
    }
}

/// Parses a request head at the start of `buf`, at most `max_len` bytes long: `Ok(None)`
/// until it is complete, then the head, taken off the front of `buf` (its names put in
/// lower case where they lie). Bare CR, obs-fold, whitespace before a colon, a control byte
/// or raw space in the target, and versions other than 1.0 and 1.1 are errors; a bare LF
/// may end a line (RFC 9112 §2.2).
pub fn parse_request(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<RequestHead>, RequestError> {
    let bad = RequestError::Malformed;
    let ((method, target, minor), lines, facts, len) =
        match super::read_head(buf, scan::request_line, MAX_REQUEST_FIELDS, max_len) {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(None),
            Err(None) => return Err(RequestError::TooLarge),
            Err(Some(why)) => return Err(bad(why)),
        };
    let Ok(method) = Method::from_bytes(&buf[method]) else {
        lines.discard();
        return Err(bad("invalid method"));
    };
    let version = match minor {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut fields = lines.into_fields(buf.split_to(len).freeze(), &facts);
    // The target shares the head's bytes, a part of the connection's read buffer, for as
    // long as the request lasts. A tunnel may last for hours: an upgrade's target is copied,
    // so that the buffer is not held by it.
    let head = fields.head();
    let target = if facts.upgrade {
        Bytes::copy_from_slice(&head[target])
    } else {
        head.slice(target)
    };
    let uri = Uri::from_maybe_shared(target).map_err(|_| bad("invalid request target"))?;
    let (length, by_coding) = request_length(&fields, &facts, version)?;
    if by_coding {
        // RFC 9112 §6.3: the chunked coding frames the body, and the length goes.
        fields.remove(b"content-length");
    }
    let close = by_coding || facts.close || (version == Version::HTTP_10 && !facts.keep_alive);
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        fields,
        length,
        close,
        len,
    }))
}

/// The body length of a request (RFC 9112 §6.3), and whether it was framed by
/// `Transfer-Encoding` beside a `Content-Length`.
fn request_length(
    h: &RawFields,
    facts: &Facts,
    version: Version,
) -> Result<(RequestLength, bool), RequestError> {
    let bad = RequestError::Malformed;
    if facts.codings == 0 && facts.lengths == 0 {
        return Ok((RequestLength::Empty, false));
    }
    if facts.codings > 0 {
        if version == Version::HTTP_10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        // The codings of every line, in order: chunked must be the last, and only once.
        let mut codings = h
            .all(b"transfer-encoding")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii);
        let last = codings.next_back();
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        if !last.is_some_and(chunked) {
            return Err(bad("a request body whose last coding is not chunked"));
        }
        let mut others = false;
        for c in codings {
            if chunked(c) || c.is_empty() {
                return Err(bad("invalid Transfer-Encoding"));
            }
            others = true;
        }
        if others {
            return Err(RequestError::Unsupported(
                "a transfer coding other than chunked",
            ));
        }
        return Ok((RequestLength::Chunked, facts.lengths > 0));
    }
    // Content-Length: one decimal value; a list (or lines) of identical values folds to one.
    let mut length: Option<u64> = None;
    for v in h.all(b"content-length") {
        for member in v.split(|&b| b == b',') {
            let n = parse_length(member.trim_ascii()).ok_or(bad("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        None | Some(0) => (RequestLength::Empty, false),
        Some(n) => (RequestLength::Known(n), false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_request(&mut BytesMut::from(s.as_bytes()), 64 * 1024)
    }

    fn head(s: &str) -> RequestHead {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn a_head_is_taken_off_the_buffer_and_only_an_upgrade_lets_go_of_it_at_once() {
        let read = |raw: &[u8]| {
            let mut buf = BytesMut::with_capacity(256);
            buf.extend_from_slice(raw);
            buf.extend_from_slice(b"next");
            let h = parse_request(&mut buf, 1024).unwrap().unwrap();
            assert_eq!(&buf[..], b"next");
            assert_eq!(h.fields.get(b"host"), Some(&b"h"[..]));
            let RequestHead { uri, fields, .. } = h;
            drop(fields);
            buf.clear();
            // The room before the head's end comes back only when nothing else holds it.
            let more = buf.capacity() + 1;
            (uri, buf.try_reclaim(more))
        };
        let (uri, reclaimed) = read(b"GET /a/b?c HTTP/1.1\r\nHOST: h\r\n\r\n");
        assert_eq!((uri.path(), reclaimed), ("/a/b", false));
        let (uri, reclaimed) = read(
            b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert_eq!((uri.path(), reclaimed), ("/chat", true));
    }

    #[test]
    fn parses_a_head_and_waits_for_a_complete_one() {
        let raw = "POST /a?b=1 HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\nContent-Length: 3\r\n\r\nabc";
        let h = head(raw);
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri, "/a?b=1");
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.len, raw.len() - 3);
        assert_eq!(h.length, RequestLength::Known(3));
        assert_eq!(h.fields.all(b"x-dup").count(), 2);
        assert!(!h.close);
        assert!(parse("GET / HTTP/1.1\r\nHost: h\r\n").unwrap().is_none());
        assert_eq!(
            head("GET http://h/x HTTP/1.1\r\nHost: h\r\n\r\n").uri,
            "http://h/x"
        );
    }

    #[test]
    fn refuses_what_rfc_9112_refuses() {
        for bad in [
            "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\rX: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
            "G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad)
                    .map(|h| h.is_some())
                    .map_err(RequestError::status),
                Err(400),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bounds_the_head() {
        let mut big = String::from("GET / HTTP/1.1\r\n");
        while big.len() < 2000 {
            big.push_str("X-Pad: 0123456789\r\n");
        }
        assert_eq!(
            parse_request(&mut BytesMut::from(big.as_bytes()), 1000).err(),
            Some(RequestError::TooLarge)
        );
        big.push_str("\r\n");
        assert_eq!(
            parse_request(&mut BytesMut::from(big.as_bytes()), 1000).err(),
            Some(RequestError::TooLarge)
        );
        assert!(parse_request(&mut BytesMut::from(big.as_bytes()), 4000).is_ok());
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_REQUEST_FIELDS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(&many).err().map(RequestError::status), Some(431));
    }

    #[test]
    fn body_lengths_follow_rfc_9112() {
        let len = |fields: &str| {
            parse(&format!("POST / HTTP/1.1\r\nHost: h\r\n{fields}\r\n"))
                .map(|h| h.map(|h| (h.length, h.close)))
        };
        assert_eq!(len(""), Ok(Some((RequestLength::Empty, false))));
        assert_eq!(
            len("Content-Length: 0\r\n"),
            Ok(Some((RequestLength::Empty, false)))
        );
        assert_eq!(
            len("Content-Length: 5, 5\r\nContent-Length: 5\r\n"),
            Ok(Some((RequestLength::Known(5), false)))
        );
        assert_eq!(
            len("Transfer-Encoding: gzip, chunked\r\n").map_err(RequestError::status),
            Err(501)
        );
        // Both: chunked wins, and the connection closes after the response.
        assert_eq!(
            len("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
            Ok(Some((RequestLength::Chunked, true)))
        );
        let both = head(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(both.fields.get(b"content-length").is_none());
        for bad in [
            "Content-Length: 5, 6\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length:\r\n",
            "Content-Length: 99999999999999999999\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: ,chunked\r\n",
        ] {
            assert_eq!(len(bad).map_err(RequestError::status), Err(400), "{bad:?}");
        }
        assert_eq!(
            parse("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")
                .map_err(RequestError::status)
                .map(|_| ()),
            Err(400)
        );
    }

    #[test]
    fn close_follows_the_version_and_connection() {
        assert!(head("GET / HTTP/1.0\r\n\r\n").close);
        assert!(!head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").close);
        assert!(head("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Close\r\n\r\n").close);
        assert!(!head("GET / HTTP/1.1\r\nHost: h\r\n\r\n").close);
    }

    /// The head written upstream from a client's head as parsed: the lines that go on keep
    /// their order and values (names lowered, white space normalized), and the ones that must
    /// not go are gone.
    #[test]
    fn a_parsed_head_goes_upstream_from_its_lines() {
        let raw = "POST /up HTTP/1.1\r\nHost: app\r\nX-A:   spaced\t\r\nConnection: keep-alive, X-Gone\r\n\
                   x-gone: 1\r\nX_Forwarded_For: 6.6.6.6\nTE: trailers\r\nX-Forwarded-For: 5.5.5.5\r\n\
                   Transfer-Encoding: chunked\r\nContent-Length: 3\r\nCookie: a=1\r\nX-B:b\r\n\r\n";
        let h = head(raw);
        assert_eq!(h.length, RequestLength::Chunked);
        let origin = crate::headers::Origin {
            peer: "10.0.0.1".parse().unwrap(),
            client: "10.0.0.1".parse().unwrap(),
            trusted: false,
            proto: "http",
        };
        let mut out = bytes::BytesMut::new();
        let chunked = crate::headers::write_upstream_head(
            &mut out,
            &crate::headers::UpstreamRequest {
                method: &h.method,
                target: "/up",
                fields: &h.fields,
                origin: &origin,
                host: h.fields.get(b"host"),
                host_from_target: false,
                upgrade: false,
                http2: false,
                has_body: true,
                request_id: None,
                rules: None,
            },
        );
        assert!(chunked, "the length went with Transfer-Encoding beside it");
        let text = String::from_utf8(out.to_vec()).unwrap();
        let client_lines: Vec<&str> = text
            .split("\r\n")
            .skip(1)
            .take_while(|l| !l.starts_with("x-forwarded-for: "))
            .collect();
        assert_eq!(
            client_lines,
            ["host: app", "x-a: spaced", "cookie: a=1", "x-b: b"],
            "{text}"
        );
        assert!(text.contains("\r\nx-forwarded-for: 10.0.0.1\r\n"), "{text}");
        assert!(
            text.ends_with("\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        for gone in [
            "gone",
            "6.6.6.6",
            "5.5.5.5",
            "trailers",
            "content-length",
            "keep-alive",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "a bare LF in {text:?}"
        );
    }
}
