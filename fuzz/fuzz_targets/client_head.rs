//! Client request heads: arbitrary bytes to `h1::request::parse_request` with a 4 KiB limit.
//! Besides "no panic": a complete head is no longer than the input or the limit and ends
//! with an empty line; every name is a token in lower case, no field value carries CR, LF or
//! NUL; a chunked body comes with
//! `Transfer-Encoding` in HTTP/1.1 only and without a `Content-Length`, a known length with
//! a `Content-Length`; an error is a 400, a 431 or a 501; and what follows the head never
//! changes how it parses.

#![no_main]

use fairway::h1::request::{RequestLength, parse_request};
use fairway::headers::is_tchar;
use http::Version;
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
    let again = parse_request(&other, LIMIT).unwrap().unwrap();
    assert_eq!(again.len, head.len);
    assert_eq!(again.method, head.method);
    assert_eq!(again.uri, head.uri);
    let lines = |h: &fairway::h1::request::RequestHead| -> Vec<(Vec<u8>, Vec<u8>, bool)> {
        h.fields
            .iter()
            .map(|f| (f.name.to_vec(), f.value.to_vec(), f.hop))
            .collect()
    };
    assert_eq!(lines(&again), lines(&head));
    assert_eq!(again.length, head.length);
});
