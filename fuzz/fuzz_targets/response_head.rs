//! Upstream response heads: arbitrary bytes to `h1::parse_response`, then `h1::body_length`
//! for a GET and a HEAD. Besides "no panic": a complete head is no longer than the input or
//! `MAX_RESPONSE_HEAD`, ends with an empty line (a bare LF may end a line), has a three-digit status, and no field
//! value carries CR, LF or NUL (nothing the head is re-serialized from can split it); the
//! framing and connection facts noted while parsing are those of the header map; the head
//! written to a client from the field lines as they came has the lines of the one written
//! from the header map with its hop-by-hop fields stripped; a head that parses whole
//! parses the same when the bytes after it change. And it reads heads as `httparse`
//! (default settings, 128 fields) does: refused, incomplete, or whole with the same length,
//! status and lines.

#![no_main]

use bytes::BytesMut;
use fairway::h1::response::{Framing, Persist, write_head};
use fairway::h1::{self, BodyLength, MAX_RESPONSE_HEAD};
use fairway::headers;
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = h1::parse_response(&mut BytesMut::from(data));
    let mut found = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut found);
    match resp.parse(data) {
        Err(_) => assert!(parsed.is_err(), "httparse refuses it"),
        Ok(httparse::Status::Partial) if data.len() <= MAX_RESPONSE_HEAD => {
            assert!(matches!(parsed, Ok(None)), "httparse waits for more")
        }
        Ok(httparse::Status::Complete(len)) if len <= MAX_RESPONSE_HEAD => {
            if let Ok(Some((h, n))) = &parsed {
                assert_eq!(*n, len);
                assert_eq!(Some(h.status.as_u16()), resp.code);
                let want: Vec<_> = resp
                    .headers
                    .iter()
                    .map(|f| (f.name.to_ascii_lowercase().into_bytes(), f.value.to_vec()))
                    .collect();
                let got: Vec<_> = h
                    .fields
                    .iter()
                    .map(|f| (f.name.to_vec(), f.value.to_vec()))
                    .collect();
                assert_eq!(got, want);
            } else {
                // Only a status code under 100 is refused past httparse.
                assert!(resp.code.is_some_and(|c| c < 100), "httparse reads it whole");
            }
        }
        Ok(_) => assert!(parsed.is_err(), "over the limit"),
    }
    let Ok(Some((head, len))) = parsed else {
        return;
    };
    assert!(len <= data.len() && len <= MAX_RESPONSE_HEAD);
    // A bare LF may end a line (RFC 9112 §2.2); the head still ends with an empty line.
    assert!(data[..len].ends_with(b"\n\n") || data[..len].ends_with(b"\n\r\n"));
    assert!((100..=999).contains(&head.status.as_u16()));
    let Ok(map) = head.fields.to_map() else {
        return;
    };
    for v in map.values() {
        assert!(
            !v.as_bytes()
                .iter()
                .any(|&b| b == b'\r' || b == b'\n' || b == 0)
        );
    }
    assert_eq!(head.facts, headers::Facts::of(&map));
    assert_eq!(
        headers::framing_of(&head.facts),
        headers::response_framing(&map)
    );
    assert_eq!(h1::body_length(&Method::HEAD, &head), BodyLength::Empty);
    let get = h1::body_length(&Method::GET, &head);
    if let BodyLength::Known(n) = get {
        assert!(n > 0);
    }
    // Written from the lines, or from the map stripped: the same lines (a map keeps only
    // the order of each name's values), and no line broken.
    let mut stripped = map.clone();
    headers::strip_known(&mut stripped, &head.facts, false);
    let none = http::HeaderMap::new();
    let (mut a, mut b) = (bytes::BytesMut::new(), bytes::BytesMut::new());
    let (framing, persist) = (Framing::Declared, Persist::Default);
    write_head(
        &mut a,
        head.status,
        Some(&head.fields),
        &none,
        None,
        framing,
        persist,
    );
    write_head(&mut b, head.status, None, &stripped, None, framing, persist);
    // The `date` the proxy adds when there is none is left out: a second may pass between.
    let lines = |w: &[u8]| {
        let mut l: Vec<Vec<u8>> = w
            .split(|&c| c == b'\n')
            .map(|l| {
                if l.starts_with(b"date: ") {
                    b"date".to_vec()
                } else {
                    l.to_vec()
                }
            })
            .collect();
        l.sort_by(|x, y| {
            x.split(|&c| c == b':')
                .next()
                .cmp(&y.split(|&c| c == b':').next())
        });
        l
    };
    assert_eq!(lines(&a), lines(&b));
    assert!(a.windows(2).all(|w| w[1] != b'\n' || w[0] == b'\r'));
    // Only the head decides: the same bytes followed by anything else parse the same.
    let mut other = data[..len].to_vec();
    other.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
    let (again, len2) = h1::parse_response(&mut BytesMut::from(&other[..]))
        .unwrap()
        .unwrap();
    assert_eq!(len2, len);
    assert_eq!(again.status, head.status);
    assert_eq!(again.fields.to_map().unwrap(), map);
});
