//! Upstream response heads: arbitrary bytes to `h1::parse_response`, then `h1::body_length`
//! for a GET and a HEAD. Besides "no panic": a complete head is no longer than the input or
//! `MAX_RESPONSE_HEAD`, ends with an empty line (a bare LF may end a line), has a three-digit status, and no field
//! value carries CR, LF or NUL (nothing the head is re-serialized from can split it); the
//! framing and connection facts noted while parsing are those of the header map; a head
//! that parses whole parses the same when the bytes after it change.

#![no_main]

use fairway::h1::{self, BodyLength, MAX_RESPONSE_HEAD};
use fairway::headers;
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((head, len))) = h1::parse_response(data) else {
        return;
    };
    assert!(len <= data.len() && len <= MAX_RESPONSE_HEAD);
    // A bare LF may end a line (RFC 9112 §2.2); the head still ends with an empty line.
    assert!(data[..len].ends_with(b"\n\n") || data[..len].ends_with(b"\n\r\n"));
    assert!((100..=999).contains(&head.status.as_u16()));
    for v in head.headers.values() {
        assert!(!v.as_bytes().iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
    }
    assert_eq!(head.facts, headers::Facts::of(&head.headers));
    assert_eq!(
        headers::framing_of(&head.facts),
        headers::response_framing(&head.headers)
    );
    assert_eq!(h1::body_length(&Method::HEAD, &head), BodyLength::Empty);
    let get = h1::body_length(&Method::GET, &head);
    if let BodyLength::Known(n) = get {
        assert!(n > 0);
    }
    // Only the head decides: the same bytes followed by anything else parse the same.
    let mut other = data[..len].to_vec();
    other.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
    let (again, len2) = h1::parse_response(&other).unwrap().unwrap();
    assert_eq!(len2, len);
    assert_eq!(again.status, head.status);
    assert_eq!(again.headers, head.headers);
});
