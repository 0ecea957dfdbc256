//! Client request heads: arbitrary bytes to `h1::request::parse_request` with a 4 KiB limit.
//! Besides "no panic": a complete head is no longer than the input or the limit and ends
//! with an empty line; no field value carries CR, LF or NUL; a chunked body comes with
//! `Transfer-Encoding` in HTTP/1.1 only and without a `Content-Length`, a known length with
//! a `Content-Length`; an error is a 400, a 431 or a 501; and what follows the head never
//! changes how it parses.

#![no_main]

use fairway::h1::request::{RequestLength, parse_request};
use http::{Version, header};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let head = match parse_request(data, LIMIT) {
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
    for v in head.headers.values() {
        assert!(!v.as_bytes().iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
    }
    match head.length {
        RequestLength::Chunked => {
            assert!(head.headers.contains_key(header::TRANSFER_ENCODING));
            assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
            assert_eq!(head.version, Version::HTTP_11);
        }
        RequestLength::Known(n) => {
            assert!(n > 0);
            assert!(head.headers.contains_key(header::CONTENT_LENGTH));
            assert!(!head.headers.contains_key(header::TRANSFER_ENCODING));
        }
        RequestLength::Empty => {}
    }
    let mut other = raw.to_vec();
    other.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    let again = parse_request(&other, LIMIT).unwrap().unwrap();
    assert_eq!(again.len, head.len);
    assert_eq!(again.method, head.method);
    assert_eq!(again.uri, head.uri);
    assert_eq!(again.headers, head.headers);
    assert_eq!(again.length, head.length);
});
