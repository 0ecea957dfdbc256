//! The response side of compression (CONTRACT §8): which responses are compressed, and how
//! a compressed response's head differs from the upstream's.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};

use super::Algorithm;

/// Whether the media type of a `Content-Type` value (its parameters ignored, in any case) is
/// one of `types`, whose entries may be `"type/*"` (any subtype) or `"*/*"`.
pub fn media_type_matches(content_type: &[u8], types: &[String]) -> bool {
    let Some((media, main)) = media_type(content_type) else {
        return false;
    };
    types.iter().any(|t| {
        let t = t.trim().as_bytes();
        t == b"*/*"
            || t.eq_ignore_ascii_case(media)
            || t.strip_suffix(b"/*")
                .is_some_and(|m| m.eq_ignore_ascii_case(main))
    })
}

/// The media type of a `Content-Type` value (`type/subtype`, trimmed) and its type, when both
/// parts are there.
fn media_type(content_type: &[u8]) -> Option<(&[u8], &[u8])> {
    let media = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let slash = media.iter().position(|&b| b == b'/')?;
    let main = &media[..slash];
    if main.is_empty() || slash + 1 == media.len() {
        return None;
    }
    Some((media, main))
}

/// Whether a response may be compressed (CONTRACT §8), before looking at the request's
/// `Accept-Encoding`. Never: a status 1xx (an upgrade among them), 204, 206 or 304; the answer
/// to a HEAD request; a body already in a coding other than `identity`; `Cache-Control:
/// no-transform`; `text/event-stream` (each event must reach the client as it is sent); no
/// `Content-Type`, or one not in `types`; a known `Content-Length` below `min_length`. A
/// response of unknown length is eligible.
pub fn is_compressible(
    status: u16,
    is_head: bool,
    headers: &HeaderMap,
    types: &[String],
    min_length: u64,
) -> bool {
    if matches!(status, 100..=199 | 204 | 206 | 304) || is_head {
        return false;
    }
    let encoded = list(headers, &header::CONTENT_ENCODING)
        .any(|coding| !coding.eq_ignore_ascii_case(b"identity"));
    let no_transform = list(headers, &header::CACHE_CONTROL).any(|directive| {
        let name = directive.split(|&b| b == b'=').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(b"no-transform")
    });
    if encoded || no_transform {
        return false;
    }
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let ct = content_type.as_bytes();
    let event_stream =
        media_type(ct).is_some_and(|(m, _)| m.eq_ignore_ascii_case(b"text/event-stream"));
    if event_stream || !media_type_matches(ct, types) {
        return false;
    }
    // A malformed length never gets this far (`headers::response_framing`); were it to, it
    // counts as unknown.
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    length.is_none_or(|n| n >= min_length)
}

/// The members of every line of a comma-separated list field, trimmed, empty ones left out.
fn list<'a>(
    headers: &'a HeaderMap,
    name: &header::HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|m| !m.is_empty())
}

/// Turns the head of a response to be compressed with `alg` into the compressed one's
/// (CONTRACT §8): no `Content-Length` (the length is known only at the end), `Content-Encoding:
/// alg`, `Accept-Encoding` added to `Vary` (merged with the members already there, once, and
/// not at all under `Vary: *`), and a strong `ETag` made weak, since the compressed bytes
/// differ from the ones the tag was made for. `Accept-Ranges` goes too, as with Nginx's gzip:
/// the upstream's ranges are of the uncompressed bytes, so a client must not resume a
/// compressed download with one.
pub fn rewrite_headers(headers: &mut HeaderMap, alg: Algorithm) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(alg.as_str()),
    );
    add_vary_accept_encoding(headers);
    if let header::Entry::Occupied(mut etags) = headers.entry(header::ETAG) {
        for v in etags.iter_mut() {
            if v.as_bytes().starts_with(b"\"") {
                let mut weak = BytesMut::with_capacity(v.len() + 2);
                weak.extend_from_slice(b"W/");
                weak.extend_from_slice(v.as_bytes());
                // `W/` before a valid value is a valid value.
                if let Ok(w) = HeaderValue::from_maybe_shared(weak.freeze()) {
                    *v = w;
                }
            }
        }
    }
}

fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let mut merged = BytesMut::new();
    for m in list(headers, &header::VARY) {
        if m == b"*" || m.eq_ignore_ascii_case(b"accept-encoding") {
            return;
        }
        merged.extend_from_slice(m);
        merged.extend_from_slice(b", ");
    }
    let accept_encoding = HeaderValue::from_static("Accept-Encoding");
    if merged.is_empty() {
        headers.insert(header::VARY, accept_encoding);
        return;
    }
    merged.extend_from_slice(accept_encoding.as_bytes());
    // Members of valid values joined by ", " make a valid value; were they not to, a line
    // of its own says the same.
    match HeaderValue::from_maybe_shared(merged.freeze()) {
        Ok(v) => {
            headers.insert(header::VARY, v);
        }
        Err(_) => {
            headers.append(header::VARY, accept_encoding);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::{Br, Gzip, Zstd};

    fn types(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn media_types() {
        let t = types(&["text/html", "application/json", "image/svg+xml"]);
        assert!(media_type_matches(b"text/html", &t));
        assert!(media_type_matches(b"text/html; charset=utf-8", &t));
        assert!(media_type_matches(b"  Text/HTML ;charset=utf-8", &t));
        assert!(media_type_matches(b"APPLICATION/JSON", &t));
        assert!(media_type_matches(b"image/svg+xml", &t));
        assert!(!media_type_matches(b"text/plain", &t));
        assert!(!media_type_matches(b"text/htmlx", &t));
        assert!(!media_type_matches(b"application/json+x", &t));
        assert!(!media_type_matches(b"", &t));
        assert!(!media_type_matches(b"text", &t));
        assert!(!media_type_matches(b"text/", &types(&["text/*"])));
        assert!(!media_type_matches(b"/html", &types(&["*/*"])));
    }

    #[test]
    fn media_type_wildcards() {
        let t = types(&["text/*"]);
        assert!(media_type_matches(b"text/css", &t));
        assert!(media_type_matches(b"TEXT/Plain; charset=x", &t));
        assert!(!media_type_matches(b"textual/css", &t));
        assert!(!media_type_matches(b"application/text", &t));
        let any = types(&["*/*"]);
        assert!(media_type_matches(b"application/octet-stream", &any));
        assert!(!media_type_matches(b"nonsense", &any));
        assert!(!media_type_matches(b"text/css", &[]));
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn values(h: &HeaderMap, name: header::HeaderName) -> Vec<&str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn rewrite_sets_coding_and_drops_length() {
        let mut h = head(&[
            ("content-length", "5000"),
            ("content-type", "text/html"),
            ("content-encoding", "identity"),
            ("accept-ranges", "bytes"),
        ]);
        rewrite_headers(&mut h, Br);
        assert!(h.get(header::CONTENT_LENGTH).is_none());
        assert!(h.get(header::ACCEPT_RANGES).is_none());
        assert_eq!(values(&h, header::CONTENT_ENCODING), ["br"]);
        assert_eq!(values(&h, header::CONTENT_TYPE), ["text/html"]);
        for alg in [Zstd, Gzip] {
            rewrite_headers(&mut h, alg);
            assert_eq!(values(&h, header::CONTENT_ENCODING), [alg.as_str()]);
        }
    }

    #[test]
    fn rewrite_vary() {
        let mut h = head(&[]);
        rewrite_headers(&mut h, Gzip);
        assert_eq!(values(&h, header::VARY), ["Accept-Encoding"]);
        // Once only, however often.
        rewrite_headers(&mut h, Gzip);
        assert_eq!(values(&h, header::VARY), ["Accept-Encoding"]);

        let mut h = head(&[("vary", "Accept-Language")]);
        rewrite_headers(&mut h, Gzip);
        assert_eq!(
            values(&h, header::VARY),
            ["Accept-Language, Accept-Encoding"]
        );

        let mut h = head(&[("vary", "Origin, Cookie,"), ("vary", " Accept-Language")]);
        rewrite_headers(&mut h, Gzip);
        assert_eq!(
            values(&h, header::VARY),
            ["Origin, Cookie, Accept-Language, Accept-Encoding"]
        );

        for already in [
            "accept-encoding",
            "Origin, ACCEPT-ENCODING",
            "*",
            "Origin, *",
        ] {
            let mut h = head(&[("vary", already)]);
            rewrite_headers(&mut h, Gzip);
            assert_eq!(values(&h, header::VARY), [already]);
        }
        let mut h = head(&[("vary", "Origin"), ("vary", "accept-encoding")]);
        rewrite_headers(&mut h, Gzip);
        assert_eq!(values(&h, header::VARY), ["Origin", "accept-encoding"]);
    }

    #[test]
    fn rewrite_etag() {
        let mut h = head(&[("etag", "\"abc\"")]);
        rewrite_headers(&mut h, Zstd);
        assert_eq!(values(&h, header::ETAG), ["W/\"abc\""]);
        // Already weak: stays, and a second rewrite changes nothing.
        rewrite_headers(&mut h, Zstd);
        assert_eq!(values(&h, header::ETAG), ["W/\"abc\""]);
        let mut h = head(&[("etag", "\"\"")]);
        rewrite_headers(&mut h, Zstd);
        assert_eq!(values(&h, header::ETAG), ["W/\"\""]);
        let mut h = head(&[]);
        rewrite_headers(&mut h, Zstd);
        assert!(h.get(header::ETAG).is_none());
    }

    fn eligible(status: u16, is_head: bool, pairs: &[(&str, &str)]) -> bool {
        let t = types(&["text/html", "text/*", "application/json"]);
        is_compressible(status, is_head, &head(pairs), &t, 1024)
    }

    const HTML: (&str, &str) = ("content-type", "text/html; charset=utf-8");

    #[test]
    fn eligible_responses() {
        assert!(eligible(200, false, &[HTML]));
        assert!(eligible(200, false, &[HTML, ("content-length", "1024")]));
        assert!(eligible(404, false, &[HTML, ("content-length", "99999")]));
        assert!(eligible(
            500,
            false,
            &[("content-type", "application/json")]
        ));
        assert!(eligible(200, false, &[("content-type", "text/css")]));
        assert!(eligible(
            200,
            false,
            &[HTML, ("content-encoding", "identity")]
        ));
        assert!(eligible(
            200,
            false,
            &[HTML, ("cache-control", "public, max-age=60")]
        ));
    }

    #[test]
    fn statuses_never_compressed() {
        for status in [100, 101, 103, 199, 204, 206, 304] {
            assert!(!eligible(status, false, &[HTML]), "{status}");
        }
        for status in [201, 203, 205, 301, 302, 400, 503] {
            assert!(eligible(status, false, &[HTML]), "{status}");
        }
    }

    #[test]
    fn head_requests_not_compressed() {
        assert!(!eligible(200, true, &[HTML]));
    }

    #[test]
    fn already_encoded() {
        for coding in ["gzip", "br", "x-custom", "identity, gzip", "GZIP"] {
            assert!(
                !eligible(200, false, &[HTML, ("content-encoding", coding)]),
                "{coding}"
            );
        }
        assert!(!eligible(
            200,
            false,
            &[
                HTML,
                ("content-encoding", "identity"),
                ("content-encoding", "zstd")
            ]
        ));
    }

    #[test]
    fn no_transform() {
        for cc in [
            "no-transform",
            "No-Transform",
            "public, no-transform, max-age=60",
            "max-age=0 ,  no-transform",
        ] {
            assert!(
                !eligible(200, false, &[HTML, ("cache-control", cc)]),
                "{cc}"
            );
        }
        assert!(!eligible(
            200,
            false,
            &[
                HTML,
                ("cache-control", "public"),
                ("cache-control", "no-transform")
            ]
        ));
        assert!(eligible(
            200,
            false,
            &[HTML, ("cache-control", "no-transformation, no-store")]
        ));
    }

    #[test]
    fn event_streams_not_compressed() {
        assert!(!eligible(
            200,
            false,
            &[("content-type", "text/event-stream")]
        ));
        assert!(!eligible(
            200,
            false,
            &[("content-type", "Text/Event-Stream; charset=utf-8")]
        ));
        let any = types(&["*/*"]);
        let h = head(&[("content-type", "text/event-stream")]);
        assert!(!is_compressible(200, false, &h, &any, 0));
    }

    #[test]
    fn types_decide() {
        assert!(!eligible(200, false, &[]));
        assert!(!eligible(200, false, &[("content-type", "image/png")]));
        assert!(!eligible(
            200,
            false,
            &[("content-type", "application/javascript")]
        ));
        assert!(!eligible(200, false, &[("content-type", "")]));
    }

    #[test]
    fn short_bodies_not_compressed() {
        assert!(!eligible(200, false, &[HTML, ("content-length", "1023")]));
        assert!(!eligible(200, false, &[HTML, ("content-length", "0")]));
        // Unknown length: eligible.
        assert!(eligible(200, false, &[HTML]));
        let h = head(&[HTML, ("content-length", "0")]);
        assert!(is_compressible(200, false, &h, &types(&["text/html"]), 0));
    }
}
