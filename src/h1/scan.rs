//! One pass over an HTTP/1.x head (RFC 9112 §2–§5) where it lies in the connection's
//! buffer: the start line checked, each field name checked as a token and put in lower case
//! in place, each value checked and trimmed, and each line noted ([`Lines`]) with what it
//! says of framing and the connection ([`Facts`]). Names and values are read eight bytes at
//! a time while the bytes are the common ones; there is no second pass over the fields to
//! lower, classify or copy them (the caller takes the head off the buffer as it is).
//!
//! It accepts and refuses what `httparse` with its default settings does (a test runs the
//! two side by side on generated heads): bare CR, obs-fold, white space before a colon, a
//! control byte in a value or a raw space in a target are errors; a bare LF ends a line;
//! empty lines before the start line are skipped. An error is found as soon as its byte is
//! there, before the head is complete.

use std::ops::Range;

use crate::headers::{Facts, Lines, is_tchar};

/// Why a scan stopped short of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// More field lines than allowed.
    TooMany,
    /// Not a valid head: what is wrong.
    Bad(&'static str),
}

/// A scan's outcome: `Ok(None)` while the head may still be incomplete.
pub type Step<T> = Result<Option<T>, Stop>;

/// A token byte (RFC 9110 §5.6.2, [`is_tchar`]) in lower case; 0 for any other byte.
static TOKEN: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        if is_tchar(c) {
            t[i] = c.to_ascii_lowercase();
        }
        i += 1;
    }
    t
};

/// A byte of a field value or reason phrase: HTAB, SP, VCHAR, obs-text (RFC 9110 §5.5).
fn is_text(c: u8) -> bool {
    c == b'\t' || (c >= b' ' && c != 0x7f)
}

/// A byte of a request target as sent: VCHAR or obs-text, no space or control byte.
fn is_target(c: u8) -> bool {
    c > b' ' && c != 0x7f
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// The high bit set in each of the eight bytes of `w` that is below `low` or is DEL, and
/// perhaps in bytes above such a one (a borrow carries into them): the lowest byte marked
/// is always one of them, and no mark means there is none.
fn below_or_del(w: u64, low: u8) -> u64 {
    let below = w.wrapping_sub(ONES * u64::from(low)) & !w & HIGHS;
    let del = w ^ (ONES * 0x7f);
    let del = del.wrapping_sub(ONES) & !del & HIGHS;
    below | del
}

/// The end of the run of bytes from `i` that `ok` accepts (`ok` accepts every byte from
/// `low` up but DEL, and perhaps some below it): eight bytes at a time, each stop checked
/// one by one.
#[inline]
fn run(buf: &[u8], mut i: usize, low: u8, ok: fn(u8) -> bool) -> usize {
    while let Some(eight) = buf.get(i..i + 8) {
        let w = u64::from_le_bytes(eight.try_into().unwrap_or([0; 8]));
        let marks = below_or_del(w, low);
        if marks == 0 {
            i += 8;
            continue;
        }
        let at = i + (marks.trailing_zeros() / 8) as usize;
        if !buf.get(at).is_some_and(|&c| ok(c)) {
            return at;
        }
        i = at + 1;
    }
    while buf.get(i).is_some_and(|&c| ok(c)) {
        i += 1;
    }
    i
}

/// The high bit set in each of the eight bytes of `w` that is not a letter, a digit or
/// `-`: exactly those, since no sum below carries from one byte into the next.
fn not_alnum_or_dash(w: u64) -> u64 {
    let high = w & HIGHS;
    let w = w & !HIGHS;
    // A byte x below 0x80 is at least `lo` when x + (0x80 - lo) has its high bit, and at
    // most `hi` when x + (0x7f - hi) has not.
    let within = |x: u64, lo: u8, hi: u8| {
        (x + ONES * u64::from(0x80 - lo)) & !(x + ONES * u64::from(0x7f - hi)) & HIGHS
    };
    // With 0x20 set, exactly the letters of either case fall between `a` and `z`.
    let letter = within(w | (ONES * 0x20), b'a', b'z');
    let digit = within(w, b'0', b'9');
    let dash = within(w, b'-', b'-');
    (!(letter | digit | dash) & HIGHS) | high
}

/// Puts the token bytes from `i` in lower case; where they end. Eight at a time while they
/// are letters, digits and `-` (the bytes of nearly every field name), one by one after.
#[inline]
fn lower_token(buf: &mut [u8], mut i: usize) -> usize {
    while let Some(eight) = buf.get_mut(i..i + 8) {
        let w = u64::from_le_bytes(eight.try_into().unwrap_or([0; 8]));
        let marks = not_alnum_or_dash(w);
        // The bytes before the first mark: setting 0x20 lowers a letter and leaves a digit
        // or `-` as it is. The bytes from the mark on are written back as they were.
        let bits = marks.trailing_zeros() & !7;
        let lowered = u64::MAX.checked_shl(bits).map_or(u64::MAX, |keep| !keep) & (ONES * 0x20);
        eight.copy_from_slice(&(w | lowered).to_le_bytes());
        i += bits as usize / 8;
        if marks != 0 {
            break;
        }
    }
    while let Some(c) = buf.get_mut(i) {
        let lower = TOKEN[usize::from(*c)];
        if lower == 0 {
            break;
        }
        *c = lower;
        i += 1;
    }
    i
}

/// The end of the line ending (CRLF or a bare LF) at `i`: `Ok(None)` if it is not all
/// there yet, `Err(())` if the byte at `i` is not one.
fn line_end(buf: &[u8], i: usize) -> Result<Option<usize>, ()> {
    match buf.get(i) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(i + 1)),
        Some(b'\r') => match buf.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some(i + 2)),
            Some(_) => Err(()),
        },
        Some(_) => Err(()),
    }
}

/// `i` past any empty lines.
fn skip_empty_lines(buf: &[u8], mut i: usize) -> Step<usize> {
    loop {
        match buf.get(i) {
            None => return Ok(None),
            Some(b'\r' | b'\n') => match line_end(buf, i) {
                Ok(Some(next)) => i = next,
                Ok(None) => return Ok(None),
                Err(()) => return Err(Stop::Bad("invalid line ending")),
            },
            Some(_) => return Ok(Some(i)),
        }
    }
}

/// `HTTP/1.0` or `HTTP/1.1` at `i`: its minor version. A prefix of it is incomplete.
fn version(buf: &[u8], i: usize) -> Step<u8> {
    const V: &[u8] = b"HTTP/1.";
    let have = buf.get(i..).unwrap_or_default();
    let n = have.len().min(V.len());
    if have[..n] != V[..n] {
        return Err(Stop::Bad("invalid HTTP version"));
    }
    match have.get(V.len()) {
        None => Ok(None),
        Some(&minor @ (b'0' | b'1')) => Ok(Some(minor - b'0')),
        Some(_) => Err(Stop::Bad("invalid HTTP version")),
    }
}

/// A response's status line, from the start of `buf`: the status code and the minor
/// version, and where the fields begin.
pub fn status_line(buf: &[u8]) -> Step<((u16, u8), usize)> {
    let bad = |why| Err(Stop::Bad(why));
    let Some(i) = skip_empty_lines(buf, 0)? else {
        return Ok(None);
    };
    let Some(minor) = version(buf, i)? else {
        return Ok(None);
    };
    let mut i = i + 8;
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') => i += 1,
        Some(_) => return bad("invalid HTTP version"),
    }
    let mut code = 0u16;
    for _ in 0..3 {
        match buf.get(i) {
            None => return Ok(None),
            Some(&d @ b'0'..=b'9') => code = code * 10 + u16::from(d - b'0'),
            Some(_) => return bad("invalid status line"),
        }
        i += 1;
    }
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') => i = run(buf, i + 1, b' ', is_text),
        Some(b'\r' | b'\n') => {}
        Some(_) => return bad("invalid status line"),
    }
    match line_end(buf, i) {
        Ok(Some(next)) => Ok(Some(((code, minor), next))),
        Ok(None) => Ok(None),
        Err(()) => bad("invalid status line"),
    }
}

/// The parts of a request line: where the method and the target lie, and the minor version.
pub type RequestLine = (Range<usize>, Range<usize>, u8);

/// A request line, from the start of `buf`: its parts, and where the fields begin.
pub fn request_line(buf: &[u8]) -> Step<(RequestLine, usize)> {
    let bad = |why| Err(Stop::Bad(why));
    let Some(start) = skip_empty_lines(buf, 0)? else {
        return Ok(None);
    };
    let mut i = start;
    while buf.get(i).is_some_and(|&c| TOKEN[usize::from(c)] != 0) {
        i += 1;
    }
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') if i > start => {}
        Some(_) => return bad("invalid method"),
    }
    let method = start..i;
    let at = i + 1;
    let i = run(buf, at, b'!', is_target);
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') if i > at => {}
        Some(_) => return bad("invalid request target"),
    }
    let target = at..i;
    if std::str::from_utf8(&buf[target.clone()]).is_err() {
        return bad("invalid request target");
    }
    let Some(minor) = version(buf, i + 1)? else {
        return Ok(None);
    };
    match line_end(buf, i + 9) {
        Ok(Some(next)) => Ok(Some(((method, target, minor), next))),
        Ok(None) => Ok(None),
        Err(()) => bad("invalid line ending"),
    }
}

/// The field lines from `i` to the empty line that ends the head, at most `max` of them,
/// noted in `lines` and `facts`, their names put in lower case in `buf`: the head's length.
pub fn fields(
    buf: &mut [u8],
    mut i: usize,
    max: usize,
    lines: &mut Lines,
    facts: &mut Facts,
) -> Step<usize> {
    loop {
        // The empty line, or a name.
        match buf.get(i) {
            None => return Ok(None),
            Some(b'\r' | b'\n') => {
                return match line_end(buf, i) {
                    Ok(end) => Ok(end),
                    Err(()) => Err(Stop::Bad("invalid line ending")),
                };
            }
            Some(_) => {}
        }
        let name = i;
        i = lower_token(buf, i);
        match buf.get(i) {
            None => return Ok(None),
            Some(b':') if i > name => {}
            Some(_) => return Err(Stop::Bad("invalid field name")),
        }
        let name = name..i;
        i += 1;
        while matches!(buf.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        let start = i;
        i = run(buf, i, b' ', is_text);
        let mut end = i;
        i = match line_end(buf, i) {
            Ok(Some(next)) => next,
            Ok(None) => return Ok(None),
            Err(()) => return Err(Stop::Bad("invalid field value")),
        };
        while end > start && matches!(buf[end - 1], b' ' | b'\t') {
            end -= 1;
        }
        if lines.len() == max {
            return Err(Stop::TooMany);
        }
        lines.push_at(facts, buf, name, start..end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bytes_at_a_time_find_what_one_at_a_time_finds() {
        for low in [b' ', b'!'] {
            for c in 0..=255u8 {
                for d in [b'a', 0, b'\t', 0x7f, 0xff, low - 1, low] {
                    for at in 0..8 {
                        for after in at + 1..9 {
                            let mut w = [b'a'; 8];
                            w[at] = c;
                            if after < 8 {
                                w[after] = d;
                            }
                            let marks = below_or_del(u64::from_le_bytes(w), low);
                            let first = w.iter().position(|&b| b < low || b == 0x7f);
                            let found = (marks != 0).then(|| marks.trailing_zeros() as usize / 8);
                            assert_eq!(found, first, "{w:?}, low {low}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn names_are_lowered_eight_bytes_at_a_time_as_one_at_a_time() {
        for c in 0..=255u8 {
            for at in 0..8 {
                let mut w = *b"Ab-9zZ0a";
                w[at] = c;
                let marks = not_alnum_or_dash(u64::from_le_bytes(w));
                let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-';
                let first = w.iter().position(|&b| !plain(b));
                let found = (marks != 0).then(|| marks.trailing_zeros() as usize / 8);
                assert_eq!(found, first, "{w:?}");
                let mut buf = [&w[..], b"_X:"].concat();
                let mut want = buf.clone();
                let end = lower_token(&mut buf, 0);
                let token = want
                    .iter()
                    .position(|&b| TOKEN[usize::from(b)] == 0)
                    .unwrap();
                want[..token].make_ascii_lowercase();
                assert_eq!((end, &buf), (token, &want), "{w:?}");
            }
        }
    }

    #[test]
    fn runs_stop_at_the_first_byte_refused() {
        let text = b"a value\twith obs-text \xff\xfe and more, then\r\n";
        assert_eq!(run(text, 0, b' ', is_text), text.len() - 2);
        let target = b"/a/b?c=d&e=%20f HTTP/1.1";
        assert_eq!(run(target, 0, b'!', is_target), 15);
        assert_eq!(run(b"abc\x7fdefghijkl", 0, b' ', is_text), 3);
        assert_eq!(run(b"abcdefghijk\x00", 0, b' ', is_text), 11);
        assert_eq!(run(b"a\tb\tc\td\te\tf\tg\th\r\n", 0, b' ', is_text), 15);
        assert_eq!(run(b"abc\x01\tdefgh\tij\r\n", 0, b' ', is_text), 3);
    }

    #[test]
    fn a_status_line_with_or_without_a_reason() {
        assert_eq!(
            status_line(b"HTTP/1.1 200 OK\r\n"),
            Ok(Some(((200, 1), 17)))
        );
        assert_eq!(
            status_line(b"\r\n\nHTTP/1.0 404\n"),
            Ok(Some(((404, 0), 16)))
        );
        assert_eq!(status_line(b"HTTP/1.1 200 OK\r"), Ok(None));
        assert_eq!(status_line(b"HTTP/1."), Ok(None));
        for bad in [
            &b"HTTP/1.2 200 OK\r\n"[..],
            b"HTTP/1.1  200 OK\r\n",
            b"HTTP/1.1 20x OK\r\n",
            b"HTTP/1.1 200OK\r\n",
            b"HTTP/1.1 200 O\x01K\r\n",
            b"HTTP/1.1 200 OK\rX",
            b"HTTX",
        ] {
            assert!(matches!(status_line(bad), Err(Stop::Bad(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_request_line_and_where_its_parts_lie() {
        let line = b"GET /a?b HTTP/1.1\r\nHost: x\r\n";
        assert_eq!(request_line(line), Ok(Some(((0..3, 4..8, 1), 19))));
        assert_eq!(request_line(b"GET /a HTTP/1"), Ok(None));
        for bad in [
            &b" GET / HTTP/1.1\r\n"[..],
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET /\x01 HTTP/1.1\r\n",
            b"GET /\xff HTTP/1.1\r\n",
            b"G(T / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
        ] {
            assert!(matches!(request_line(bad), Err(Stop::Bad(_))), "{bad:?}");
        }
    }

    /// A head as `httparse` (default settings, 128 fields) reads it: `Ok(None)` while
    /// incomplete, `Err(())` refused, else the start line's parts, the fields (names in
    /// lower case) and the head's length.
    type Reference = Result<Option<(Vec<u8>, u16, Vec<(Vec<u8>, Vec<u8>)>, usize)>, ()>;

    fn reference(buf: &[u8], request: bool) -> Reference {
        let mut found = [httparse::EMPTY_HEADER; 128];
        let fields = |h: &[httparse::Header<'_>]| -> Vec<(Vec<u8>, Vec<u8>)> {
            h.iter()
                .map(|f| (f.name.to_ascii_lowercase().into_bytes(), f.value.to_vec()))
                .collect()
        };
        if request {
            let mut req = httparse::Request::new(&mut found);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let line = [req.method.unwrap(), " ", req.path.unwrap()].concat();
                    let minor = u16::from(req.version.unwrap());
                    Ok(Some((line.into_bytes(), minor, fields(req.headers), len)))
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(()),
            }
        } else {
            let mut resp = httparse::Response::new(&mut found);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap();
                    let line = format!("{} {code}", resp.version.unwrap());
                    Ok(Some((line.into_bytes(), code, fields(resp.headers), len)))
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(()),
            }
        }
    }

    /// The same head as this module reads it.
    fn scanned(buf: &[u8], request: bool) -> Reference {
        let mut copy = buf.to_vec();
        let mut facts = Facts::default();
        let mut lines = Lines::with_room(16);
        let line = if request {
            request_line(buf).map(|l| {
                l.map(|((m, t, minor), at)| {
                    let line = [&buf[m], b" ", &buf[t]].concat();
                    (line, u16::from(minor), at)
                })
            })
        } else {
            status_line(buf).map(|l| {
                l.map(|((code, minor), at)| (format!("{minor} {code}").into_bytes(), code, at))
            })
        };
        let (line, n, at) = match line {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            Err(_) => return Err(()),
        };
        match fields(&mut copy, at, 128, &mut lines, &mut facts) {
            Ok(Some(len)) => {
                let fields = lines.into_fields(bytes::Bytes::from(copy[..len].to_vec()), &facts);
                let list = fields
                    .iter()
                    .map(|f| (f.name.to_vec(), f.value.to_vec()))
                    .collect();
                Ok(Some((line, n, list, len)))
            }
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    /// A small generator of its own, seeded: the same heads on every run.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a [u8]]) -> &'a [u8] {
            from[self.below(from.len())]
        }
    }

    /// A head of well-formed parts with, now and then, one that is not (the first `good` of
    /// each list are well formed), then perhaps changed in a byte or cut short.
    fn generated(g: &mut Gen, request: bool) -> Vec<u8> {
        const REQUEST_LINES: (usize, &[&[u8]]) = (
            5,
            &[
                b"GET / HTTP/1.1",
                b"POST /a?b=%20c HTTP/1.0",
                b"OPTIONS * HTTP/1.1",
                b"get http://x.example:80/p HTTP/1.1",
                b"GET /\xc3\xa9 HTTP/1.1",
                b"GET /\xff HTTP/1.1",
                b"GET  / HTTP/1.1",
                b"GET / HTTP/1.2",
                b"G@T / HTTP/1.1",
                b"GET /a b HTTP/1.1",
                b"GET / http/1.1",
                b"",
            ],
        );
        const STATUS_LINES: (usize, &[&[u8]]) = (
            6,
            &[
                b"HTTP/1.1 200 OK",
                b"HTTP/1.0 404 Not Found",
                b"HTTP/1.1 204",
                b"HTTP/1.1 200 ",
                b"HTTP/1.1 200 \xe9t\xe9\tok",
                b"HTTP/1.1 099 Low",
                b"HTTP/1.1  200 OK",
                b"HTTP/1.1 2000 OK",
                b"HTTP/2 200 OK",
                b"HTTP/1.1 200 O\x7fK",
                b"",
            ],
        );
        const NAMES: (usize, &[&[u8]]) = (
            9,
            &[
                b"Host",
                b"Content-Length",
                b"content-length",
                b"Transfer-Encoding",
                b"Connection",
                b"X-Forwarded-For",
                b"x_forwarded_for",
                b"Set-Cookie",
                b"X-A!#$%&'*+-.^_`|~09",
                b"",
                b"X Y",
                b"X\"Y",
                b"\xe9",
                b" Folded",
                b"\tX",
            ],
        );
        const SEPARATORS: (usize, &[&[u8]]) = (4, &[b": ", b":", b":\t ", b":  ", b" : ", b"\t:"]);
        const VALUES: (usize, &[&[u8]]) = (
            9,
            &[
                b"3",
                b"chunked",
                b"close, x-gone",
                b"a value long enough to be read eight bytes at a time, or more",
                b"",
                b"  padded \t ",
                b"obs-text \x80\xff here",
                b"tab\there",
                b"Sun, 06 Nov 1994 08:49:37 GMT",
                b"ctl\x01",
                b"del\x7fhere",
                b"nul\0here",
                b"cr\rhere",
            ],
        );
        const ENDINGS: (usize, &[&[u8]]) = (2, &[b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r"]);
        const NOISE: &[u8] = b"\r\n\t \0\x01\x7f\x80\xff:aZ09/ \"(";
        let part = |g: &mut Gen, (good, all): (usize, &[&'static [u8]])| {
            if g.below(16) == 0 {
                g.pick(all)
            } else {
                g.pick(&all[..good])
            }
        };

        let mut out = Vec::new();
        for _ in 0..g.below(4).saturating_sub(2) {
            out.extend_from_slice(g.pick(&[b"\r\n", b"\n"]));
        }
        out.extend_from_slice(part(g, if request { REQUEST_LINES } else { STATUS_LINES }));
        out.extend_from_slice(part(g, ENDINGS));
        for _ in 0..g.below(8) {
            out.extend_from_slice(part(g, NAMES));
            out.extend_from_slice(part(g, SEPARATORS));
            out.extend_from_slice(part(g, VALUES));
            out.extend_from_slice(part(g, ENDINGS));
        }
        out.extend_from_slice(part(g, ENDINGS));
        if g.below(4) == 0 && !out.is_empty() {
            let at = g.below(out.len());
            out[at] = NOISE[g.below(NOISE.len())];
        }
        if g.below(3) == 0 {
            out.push(b'x');
        }
        if g.below(4) == 0 {
            let cut = g.below(out.len() + 1);
            out.truncate(cut);
        }
        out
    }

    #[test]
    fn heads_are_read_as_httparse_reads_them() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let mut seen = [0usize; 3];
        for i in 0..60_000 {
            let request = i % 2 == 0;
            let head = generated(&mut g, request);
            let want = reference(&head, request);
            assert_eq!(
                scanned(&head, request),
                want,
                "{:?}",
                head.escape_ascii().to_string()
            );
            seen[match want {
                Ok(Some(_)) => 0,
                Ok(None) => 1,
                Err(()) => 2,
            }] += 1;
        }
        // The heads generated reach every outcome, often.
        assert!(seen.iter().all(|&n| n > 6_000), "{seen:?}");
    }

    #[test]
    fn more_fields_than_allowed_are_refused_only_once_the_extra_one_is_whole() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..4 {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let mut lines = Lines::with_room(4);
        let mut facts = Facts::default();
        let at = 17;
        assert_eq!(
            fields(&mut head.clone(), at, 4, &mut lines, &mut facts),
            Ok(None)
        );
        head.extend_from_slice(b"X-4: v");
        let mut lines = Lines::with_room(4);
        assert_eq!(
            fields(&mut head.clone(), at, 4, &mut lines, &mut facts),
            Ok(None)
        );
        head.extend_from_slice(b"\r\n");
        let mut lines = Lines::with_room(4);
        assert_eq!(
            fields(&mut head, at, 4, &mut lines, &mut facts),
            Err(Stop::TooMany)
        );
    }
}
