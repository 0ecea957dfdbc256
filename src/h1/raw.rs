//! A response head's field lines kept as they came: one copy of the head and where each
//! line's name and value lie in it, with the hop-by-hop ones marked while it is parsed. An
//! HTTP/1.1 client's response head is written from them line by line (names in lower case,
//! the marked lines left out); a header map is built only for what needs one (an HTTP/2
//! client, compression, a sticky cookie, the route's response rules, an upgrade).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::Spares;
use crate::headers::{Facts, Kind, Listed};

/// The field lines of a response head.
pub struct RawFields {
    /// The head (status line, fields, final CRLF): every range below is into it.
    head: Bytes,
    lines: Vec<Line>,
    /// A `Date` line is there.
    date: bool,
    /// A `Content-Length` line is there.
    length: bool,
}

#[derive(Debug, Clone, Copy)]
struct Line {
    name: (u32, u32),
    value: (u32, u32),
    /// Hop-by-hop: by definition, or named by `Connection`. Left out when relayed.
    hop: bool,
}

fn range((start, len): (u32, u32)) -> Range<usize> {
    start as usize..(start + len) as usize
}

impl RawFields {
    /// The fields `httparse` found in the head of `len` bytes at the start of `buf`, their
    /// framing and connection facts noted in `facts`. `httparse` has refused control
    /// characters in values (HTAB aside) and anything but a token in names, as a header
    /// map would. Names are put in lower case in the copy.
    pub(crate) fn parse(
        buf: &[u8],
        len: usize,
        found: &[httparse::Header<'_>],
        facts: &mut Facts,
    ) -> Result<RawFields, &'static str> {
        let base = buf.as_ptr() as usize;
        let at = |part: &[u8]| -> Option<(u32, u32)> {
            let start = (part.as_ptr() as usize).wrapping_sub(base);
            match start.checked_add(part.len()) {
                Some(end) if end <= len => Some((start as u32, part.len() as u32)),
                // An empty value may point anywhere.
                _ if part.is_empty() => Some((0, 0)),
                _ => None,
            }
        };
        let mut copy = BytesMut::from(&buf[..len]);
        let mut lines = take_lines(found.len());
        let (mut date, mut length) = (false, false);
        for f in found {
            let (Some(n), Some(v)) = (at(f.name.as_bytes()), at(f.value)) else {
                give_back_lines(lines);
                return Err("malformed head");
            };
            // Lowered first: the name is then told by exact comparisons.
            copy[range(n)].make_ascii_lowercase();
            let name = &copy[range(n)];
            let kind = facts.note_raw(name, f.value);
            length |= kind == Kind::ContentLength;
            date |= name == b"date";
            lines.push(Line {
                name: n,
                value: v,
                hop: matches!(kind, Kind::Hop(_)),
            });
        }
        let mut fields = RawFields {
            head: copy.freeze(),
            lines,
            date,
            length,
        };
        if facts.lists {
            fields.mark_listed();
        }
        Ok(fields)
    }

    /// Marks the lines whose names a `Connection` line lists (`close` among them; not
    /// `keep-alive` or `upgrade`, which are fields of their own).
    fn mark_listed(&mut self) {
        let head = &self.head;
        let mut listed: Vec<&[u8]> = Vec::new();
        for l in &self.lines {
            if head[range(l.name)] == *b"connection" {
                listed.extend(Listed::names_in(&head[range(l.value)]));
            }
        }
        for l in &mut self.lines {
            let name = &head[range(l.name)];
            if listed.iter().any(|t| t.eq_ignore_ascii_case(name)) {
                l.hop = true;
            }
        }
        // A `Date` or `Content-Length` named there is left out too: the head must not claim
        // one it does not write.
        let kept = |n: &[u8]| {
            self.lines
                .iter()
                .any(|l| !l.hop && head[range(l.name)] == *n)
        };
        self.date = kept(b"date");
        self.length = kept(b"content-length");
    }

    /// Whether a `Date` line is there.
    pub fn has_date(&self) -> bool {
        self.date
    }

    /// Whether a `Content-Length` line is there.
    pub fn has_length(&self) -> bool {
        self.length
    }

    /// Writes the lines that are not hop-by-hop and whose name `set` does not hold (a
    /// field the proxy sets replaces the response's), names in lower case. Lines written as
    /// `name: value` CRLF are copied in runs; others (an empty value, other white space, a
    /// bare LF) are written field by field.
    pub fn write(&self, out: &mut BytesMut, set: &HeaderMap, without_id: bool) {
        let head = &self.head[..];
        out.reserve(head.len() + 4 * self.lines.len());
        let mut run = 0..0;
        for l in &self.lines {
            let (name, value) = (range(l.name), range(l.value));
            if l.hop
                || (without_id && head[name.clone()] == *b"x-request-id")
                || (!set.is_empty()
                    && set
                        .keys()
                        .any(|k| k.as_str().as_bytes() == &head[name.clone()]))
            {
                continue;
            }
            let end = value.end + 2;
            let whole = !value.is_empty()
                && value.start == name.end + 2
                && head[name.end..value.start] == *b": "
                && head.get(value.end..end) == Some(b"\r\n");
            if whole && !run.is_empty() && run.end == name.start {
                run.end = end;
                continue;
            }
            out.put_slice(&head[run]);
            run = 0..0;
            if whole {
                run = name.start..end;
            } else {
                out.put_slice(&head[name]);
                out.put_slice(b": ");
                out.put_slice(&head[value]);
                out.put_slice(b"\r\n");
            }
        }
        out.put_slice(&head[run]);
    }

    /// All the lines, hop-by-hop ones too, as a header map whose values share the copy of
    /// the head.
    pub fn to_map(&self) -> Result<HeaderMap, &'static str> {
        let mut map = super::take_map(self.lines.len());
        for l in &self.lines {
            let Ok(name) = HeaderName::from_bytes(&self.head[range(l.name)]) else {
                super::give_back_map(map);
                return Err("invalid field name");
            };
            let value = if l.value.1 == 0 {
                HeaderValue::from_static("")
            } else {
                match HeaderValue::from_maybe_shared(self.head.slice(range(l.value))) {
                    Ok(v) => v,
                    Err(_) => {
                        super::give_back_map(map);
                        return Err("invalid field value");
                    }
                }
            };
            map.append(name, value);
        }
        Ok(map)
    }
}

impl Drop for RawFields {
    fn drop(&mut self) {
        give_back_lines(std::mem::take(&mut self.lines));
    }
}

impl std::fmt::Debug for RawFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for l in &self.lines {
            list.entry(&(
                String::from_utf8_lossy(&self.head[range(l.name)]),
                String::from_utf8_lossy(&self.head[range(l.value)]),
                l.hop,
            ));
        }
        list.finish()
    }
}

/// The most lines a kept line list may have room for.
const SPARE_LIST_LINES: usize = 64;

thread_local! {
    static LINES: Spares<Vec<Line>> = const { Spares::new() };
}

fn take_lines(n: usize) -> Vec<Line> {
    match LINES.with(Spares::take) {
        Some(mut v) => {
            v.reserve(n);
            v
        }
        None => Vec::with_capacity(n.max(16)),
    }
}

fn give_back_lines(mut v: Vec<Line>) {
    if v.capacity() == 0 || v.capacity() > SPARE_LIST_LINES {
        return;
    }
    v.clear();
    LINES.with(|l| l.keep(v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::parse_response;
    use crate::h1::response::{Framing, Persist, write_head};

    /// The head as the client gets it: from the lines, or from the header map the way it
    /// was always written (hop-by-hop fields stripped by the facts).
    fn both(raw: &str, set: &[(&str, &str)]) -> (String, String) {
        let (head, _) = parse_response(raw.as_bytes()).unwrap().unwrap();
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
        let (head, _) = parse_response(raw.as_bytes()).unwrap().unwrap();
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
        let (head, _) = parse_response(raw.as_bytes()).unwrap().unwrap();
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
        let (head, _) = parse_response(b"HTTP/1.1 204 No Content\r\nDATE: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.fields.has_date() && !head.fields.has_length());
        let (head, _) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.fields.has_date() && head.fields.has_length());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n").is_err());
    }

    #[test]
    fn line_lists_are_reused() {
        let (first, _) = parse_response(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        let ptr = first.fields.lines.as_ptr();
        drop(first);
        let (second, _) = parse_response(b"HTTP/1.1 200 OK\r\nB: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(second.fields.lines.as_ptr(), ptr);
        assert_eq!(second.fields.to_map().unwrap()["b"], "2");
    }
}
