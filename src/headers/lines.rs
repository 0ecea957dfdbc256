//! A head's field lines kept as they came: the head's bytes (an HTTP/1 head as it was taken
//! off the read buffer, an HTTP/2 request's fields written out as lines) and where each
//! line's name and value lie in them, with the hop-by-hop ones marked while it is read. A
//! request goes upstream, and an HTTP/1.1 client's response head is written, from them line
//! by line (names in lower case, the marked lines left out); a header map is built only for
//! what needs one (an HTTP/2 client, compression, a sticky cookie, the route's response
//! rules, an upgrade). The emptied containers of heads already relayed are kept per thread
//! for the next head ([`Spares`]).

use std::cell::RefCell;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Facts, Kind, Listed};

/// The field lines of a head.
pub struct RawFields {
    /// The head (start line, fields, final empty line): every range below is into it.
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

/// One field line: its name in lower case, its value, and whether it is hop-by-hop (by
/// definition, or named by `Connection`).
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    /// The name, in lower case.
    pub name: &'a [u8],
    /// The value, without the white space around it.
    pub value: &'a [u8],
    /// Hop-by-hop.
    pub hop: bool,
}

fn range((start, len): (u32, u32)) -> Range<usize> {
    start as usize..(start + len) as usize
}

/// The lines of a head being read, and what they say of `Date` and `Content-Length`.
pub struct Lines {
    list: Vec<Line>,
    date: bool,
    length: bool,
}

impl Lines {
    /// Room for `n` lines, in a list of this thread's spares if there is one.
    pub fn with_room(n: usize) -> Lines {
        Lines {
            list: take_lines(n),
            date: false,
            length: false,
        }
    }

    /// Notes the line called `name` (in lower case) with `value`, found at `n` and `v` of
    /// the head.
    #[inline]
    fn push(&mut self, facts: &mut Facts, name: &[u8], value: &[u8], n: (u32, u32), v: (u32, u32)) {
        let kind = facts.note_raw(name, value);
        self.length |= kind == Kind::ContentLength;
        self.date |= name == b"date";
        self.list.push(Line {
            name: n,
            value: v,
            hop: matches!(kind, Kind::Hop(_)),
        });
    }

    /// How many lines there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Notes the line whose name (in lower case) and value lie at `name` and `value` of
    /// `head`.
    #[inline]
    pub fn push_at(
        &mut self,
        facts: &mut Facts,
        head: &[u8],
        name: Range<usize>,
        value: Range<usize>,
    ) {
        let n = (name.start as u32, name.len() as u32);
        let v = (value.start as u32, value.len() as u32);
        self.push(facts, &head[name], &head[value], n, v);
    }

    /// Gives the list back to this thread's spares: the head was not complete, or refused.
    pub fn discard(self) {
        give_back_lines(self.list);
    }

    /// The lines of `head` (the bytes they were noted in, now frozen), those that
    /// `Connection` lists marked.
    pub fn into_fields(self, head: Bytes, facts: &Facts) -> RawFields {
        let mut fields = RawFields {
            head,
            lines: self.list,
            date: self.date,
            length: self.length,
        };
        if facts.lists {
            fields.mark_listed();
        }
        fields
    }
}

impl RawFields {
    /// The fields of a header map (an HTTP/2 request's), as lines `name: value` CRLF in a
    /// copy of their own, their facts noted in `facts`.
    pub fn from_map(map: &HeaderMap, facts: &mut Facts) -> RawFields {
        let size = map
            .iter()
            .fold(0, |n, (k, v)| n + k.as_str().len() + v.len() + 4);
        let mut copy = BytesMut::with_capacity(size);
        let mut lines = Lines::with_room(map.len());
        for (name, value) in map {
            let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
            let at = copy.len() as u32;
            copy.put_slice(name);
            copy.put_slice(b": ");
            copy.put_slice(value);
            copy.put_slice(b"\r\n");
            let n = (at, name.len() as u32);
            let v = (at + name.len() as u32 + 2, value.len() as u32);
            lines.push(facts, name, value, n, v);
        }
        lines.into_fields(copy.freeze(), facts)
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

    /// The head's bytes that every name and value lies in.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// Every line, in order, hop-by-hop ones too.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Field<'_>> {
        self.lines.iter().map(|l| Field {
            name: &self.head[range(l.name)],
            value: &self.head[range(l.value)],
            hop: l.hop,
        })
    }

    /// The values of every line called `name` (in lower case), in order.
    pub fn all<'a>(&'a self, name: &[u8]) -> impl DoubleEndedIterator<Item = &'a [u8]> {
        self.iter().filter(move |f| f.name == name).map(|f| f.value)
    }

    /// The value of the first line called `name` (in lower case).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.all(name).next()
    }

    /// The value of the one line called `name` (in lower case), sharing the head's bytes;
    /// `None` when there is none or more than one.
    pub fn only(&self, name: &[u8]) -> Option<Bytes> {
        let mut found = self
            .lines
            .iter()
            .filter(|l| self.head[range(l.name)] == *name);
        match (found.next(), found.next()) {
            (Some(l), None) => Some(self.head.slice(range(l.value))),
            _ => None,
        }
    }

    /// Drops every line called `name` (in lower case).
    pub fn remove(&mut self, name: &[u8]) {
        let head = &self.head;
        self.lines.retain(|l| head[range(l.name)] != *name);
        match name {
            b"date" => self.date = false,
            b"content-length" => self.length = false,
            _ => {}
        }
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
    /// field the proxy sets replaces the response's), names in lower case.
    pub fn write(&self, out: &mut BytesMut, set: &HeaderMap, without_id: bool) {
        self.write_where(out, |f| {
            !(f.hop
                || (without_id && f.name == b"x-request-id")
                || (!set.is_empty() && set.keys().any(|k| k.as_str().as_bytes() == f.name)))
        });
    }

    /// Writes the lines `keep` keeps, names in lower case. Lines written as `name: value`
    /// CRLF are copied in runs; others (an empty value, other white space, a bare LF) are
    /// written field by field.
    pub fn write_where(&self, out: &mut BytesMut, mut keep: impl FnMut(&Field<'_>) -> bool) {
        let head = &self.head[..];
        out.reserve(head.len() + 4 * self.lines.len());
        let mut run = 0..0;
        for l in &self.lines {
            let (name, value) = (range(l.name), range(l.value));
            let field = Field {
                name: &head[name.clone()],
                value: &head[value.clone()],
                hop: l.hop,
            };
            if !keep(&field) {
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
                out.put_slice(field.name);
                out.put_slice(b": ");
                out.put_slice(field.value);
                out.put_slice(b"\r\n");
            }
        }
        out.put_slice(&head[run]);
    }

    /// All the lines, hop-by-hop ones too, as a header map whose values share the bytes of
    /// the head.
    pub fn to_map(&self) -> Result<HeaderMap, &'static str> {
        let mut map = take_map(self.lines.len());
        for l in &self.lines {
            let Ok(name) = HeaderName::from_bytes(&self.head[range(l.name)]) else {
                give_back_map(map);
                return Err("invalid field name");
            };
            let value = if l.value.1 == 0 {
                HeaderValue::from_static("")
            } else {
                match HeaderValue::from_maybe_shared(self.head.slice(range(l.value))) {
                    Ok(v) => v,
                    Err(_) => {
                        give_back_map(map);
                        return Err("invalid field value");
                    }
                }
            };
            map.append(name, value);
        }
        Ok(map)
    }
}

/// No lines at all (and nothing allocated).
impl Default for RawFields {
    fn default() -> RawFields {
        RawFields {
            head: Bytes::new(),
            lines: Vec::new(),
            date: false,
            length: false,
        }
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
        for l in self.iter() {
            list.entry(&(
                String::from_utf8_lossy(l.name),
                String::from_utf8_lossy(l.value),
                l.hop,
            ));
        }
        list.finish()
    }
}

/// Emptied containers of heads already relayed, kept per thread for the next head parsed
/// there: a keep-alive exchange does not allocate and free them each time.
struct Spares<T> {
    list: RefCell<Vec<T>>,
}

/// The most spares of one kind a thread keeps.
const SPARES: usize = 32;

impl<T> Spares<T> {
    const fn new() -> Spares<T> {
        Spares {
            list: RefCell::new(Vec::new()),
        }
    }

    /// A spare, if there is one.
    fn take(&self) -> Option<T> {
        self.list.borrow_mut().pop()
    }

    /// Keeps `item` (emptied by the caller), unless [`SPARES`] are kept already.
    fn keep(&self, item: T) {
        let mut list = self.list.borrow_mut();
        if list.len() < SPARES {
            list.push(item);
        }
    }
}

/// The most fields a kept header map may have room for.
const SPARE_MAP_FIELDS: usize = 64;

/// The most lines a kept line list may have room for.
const SPARE_LIST_LINES: usize = 64;

thread_local! {
    static MAPS: Spares<HeaderMap> = const { Spares::new() };
    static LINES: Spares<Vec<Line>> = const { Spares::new() };
}

/// An empty header map with room for `fields`: a spare one of this thread's, or a new one.
pub fn take_map(fields: usize) -> HeaderMap {
    match MAPS.with(Spares::take) {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Gives the header map of a head that has been relayed back to this thread's spares (its
/// values, slices of the head, are dropped now). A map grown large is freed, and one that
/// never had room is not kept.
pub fn give_back_map(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_FIELDS {
        return;
    }
    map.clear();
    MAPS.with(|m| m.keep(map));
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

    /// The fields of a well-formed head written with CRLF and names in any case, noted as
    /// the HTTP/1 reader notes them (its own tests hold what it refuses).
    pub(crate) fn fields_of(raw: &str) -> (RawFields, Facts) {
        let mut head = raw.as_bytes().to_vec();
        let mut facts = Facts::default();
        let mut lines = Lines::with_room(8);
        let mut at = raw.find("\r\n").unwrap() + 2;
        while !raw[at..].starts_with("\r\n") {
            let end = at + raw[at..].find("\r\n").unwrap();
            let colon = at + raw[at..end].find(':').unwrap();
            head[at..colon].make_ascii_lowercase();
            let value = raw[colon + 1..end].trim_matches([' ', '\t']);
            let start = colon + 1 + raw[colon + 1..end].find(value).unwrap();
            let value = start..start + value.len();
            lines.push_at(&mut facts, &head, at..colon, value);
            at = end + 2;
        }
        head.truncate(at + 2);
        (lines.into_fields(Bytes::from(head), &facts), facts)
    }

    #[test]
    fn lines_are_found_by_name_in_order() {
        let (f, facts) = fields_of(
            "HTTP/1.1 200 OK\r\nX-Dup: 1\r\nHost: h\r\nx-dup: 2\r\nConnection: x-gone, close\r\n\
             X-Gone: g\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(facts.close && facts.lists);
        assert_eq!(f.all(b"x-dup").collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(f.get(b"host"), Some(&b"h"[..]));
        assert_eq!(f.get(b"Host"), None, "names are asked for in lower case");
        assert_eq!(f.only(b"host").as_deref(), Some(&b"h"[..]));
        assert_eq!(f.only(b"x-dup"), None);
        assert_eq!(f.only(b"missing"), None);
        let hop: Vec<_> = f.iter().filter(|l| l.hop).map(|l| l.name).collect();
        assert_eq!(hop, [&b"connection"[..], b"x-gone"]);
        assert!(f.has_length());
    }

    #[test]
    fn lines_removed_are_gone_and_the_rest_written_as_they_came() {
        let (mut f, _) =
            fields_of("HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 3\r\nB:  2\r\nC: 3\r\n\r\n");
        f.remove(b"content-length");
        assert!(!f.has_length() && f.get(b"content-length").is_none());
        let mut out = BytesMut::new();
        f.write_where(&mut out, |l| l.name != b"c");
        assert_eq!(&out[..], b"a: 1\r\nb: 2\r\n");
    }

    #[test]
    fn a_header_map_becomes_lines_with_its_facts() {
        let mut map = HeaderMap::new();
        map.append("cookie", HeaderValue::from_static("a=1"));
        map.append("te", HeaderValue::from_static("trailers"));
        map.append("cookie", HeaderValue::from_static("b=2"));
        map.append("x-empty", HeaderValue::from_static(""));
        let mut facts = Facts::default();
        let f = RawFields::from_map(&map, &mut facts);
        assert_eq!(f.all(b"cookie").collect::<Vec<_>>(), [b"a=1", b"b=2"]);
        assert_eq!(f.get(b"x-empty"), Some(&b""[..]));
        assert!(f.iter().any(|l| l.name == b"te" && l.hop));
        assert_eq!(facts.hop, 1 << 3);
        assert_eq!(f.to_map().unwrap(), map);
    }

    #[test]
    fn a_map_given_back_is_reused_empty() {
        let (f, _) = fields_of("HTTP/1.1 200 OK\r\nX-A: 1\r\nX-B: 2\r\n\r\n");
        let first = f.to_map().unwrap();
        let table = first.capacity();
        give_back_map(first);
        let (f, _) = fields_of("HTTP/1.1 204 No Content\r\nX-C: 3\r\n\r\n");
        let second = f.to_map().unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second["x-c"], "3");
        assert!(second.capacity() >= table);
        // A map grown past the bound is not kept.
        let mut big = HeaderMap::with_capacity(4 * SPARE_MAP_FIELDS);
        big.insert("x-d", HeaderValue::from_static("4"));
        give_back_map(big);
        assert!(take_map(1).capacity() <= SPARE_MAP_FIELDS);
    }

    #[test]
    fn line_lists_are_reused() {
        let (first, _) = fields_of("HTTP/1.1 200 OK\r\nA: 1\r\n\r\n");
        let ptr = first.lines.as_ptr();
        drop(first);
        let (second, _) = fields_of("HTTP/1.1 200 OK\r\nB: 2\r\n\r\n");
        assert_eq!(second.lines.as_ptr(), ptr);
        assert_eq!(second.to_map().unwrap()["b"], "2");
    }
}
