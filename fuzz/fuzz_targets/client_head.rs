//! Client request heads: arbitrary bytes to `h1::request::parse_request` with a 4 KiB limit.
//! Besides "no panic": a complete head is no longer than the input or the limit and ends
//! with an empty line; every name is a token in lower case, no field value carries CR, LF or
//! NUL; a chunked body comes with
//! `Transfer-Encoding` in HTTP/1.1 only and without a `Content-Length`, a known length with
//! a `Content-Length`; an error is a 400, a 431 or a 501; and what follows the head never
//! changes how it parses. And it reads heads as `httparse` (default settings, 128 fields)
//! does: what that refuses is refused, what it finds incomplete is incomplete, and a head it
//! reads whole has the same length and lines, or is refused by a later rule.

#![no_main]

use bytes::BytesMut;
use fairway::h1::request::{RequestLength, RequestHead, parse_request};
use fairway::headers::is_tchar;
use http::Version;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

/// A head's lines: lower-case name, value, hop-by-hop.
fn lines(h: &RequestHead) -> Vec<(Vec<u8>, Vec<u8>, bool)> {
    h.fields
        .iter()
        .map(|f| (f.name.to_vec(), f.value.to_vec(), f.hop))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_request(&mut BytesMut::from(data), LIMIT);
    let mut found = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut found);
    match req.parse(data) {
        Err(_) => assert!(parsed.is_err(), "httparse refuses it"),
        Ok(httparse::Status::Partial) if data.len() <= LIMIT => {
            assert!(matches!(parsed, Ok(None)), "httparse waits for more")
        }
        Ok(httparse::Status::Complete(len)) if len <= LIMIT => {
            if let Ok(Some(h)) = &parsed {
                assert_eq!(h.len, len);
                // `Content-Length` goes when `Transfer-Encoding` frames the body.
                let chunked = h.length == RequestLength::Chunked;
                let want: Vec<_> = req
                    .headers
                    .iter()
                    .map(|f| (f.name.to_ascii_lowercase().into_bytes(), f.value.to_vec()))
                    .filter(|(n, _)| !(chunked && n == b"content-length"))
                    .collect();
                let got: Vec<_> = lines(h).into_iter().map(|l| (l.0, l.1)).collect();
                assert_eq!(got, want);
            } else {
                assert!(parsed.is_err(), "httparse reads it whole");
            }
        }
        Ok(_) => assert!(parsed.is_err(), "over the limit"),
    }
    let head = match parsed {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            assert!(matches!(e.status(), 400 | 431 | 501));
            return;
        }
    };
    assert!(head.len <= data.len() && head.len <= LIMIT);
    let raw = &data[..head.len];
    assert!(raw.ends_with(b"\n\n") || raw.ends_with(b"\n\r\n"));
    for f in head.fields.iter() {
        assert!(!f.name.is_empty() && f.name.iter().all(|&b| is_tchar(b)));
        assert!(!f.name.iter().any(u8::is_ascii_uppercase));
        assert!(!f.value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
    }
    let has = |name: &[u8]| head.fields.get(name).is_some();
    match head.length {
        RequestLength::Chunked => {
            assert!(has(b"transfer-encoding"));
            assert!(!has(b"content-length"));
            assert_eq!(head.version, Version::HTTP_11);
        }
        RequestLength::Known(n) => {
            assert!(n > 0);
            assert!(has(b"content-length"));
            assert!(!has(b"transfer-encoding"));
        }
        RequestLength::Empty => {}
    }
    let mut other = raw.to_vec();
    other.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    let again = parse_request(&mut BytesMut::from(&other[..]), LIMIT)
        .unwrap()
        .unwrap();
    assert_eq!(again.len, head.len);
    assert_eq!(again.method, head.method);
    assert_eq!(again.uri, head.uri);
    assert_eq!(lines(&again), lines(&head));
    assert_eq!(again.length, head.length);
});
