//! The access log (`[log] access`): one line per request on stdout, formatted on the
//! request's task when its response ends and appended to a bounded buffer that a writer
//! task writes out every 50 ms. When the writer falls behind, lines are dropped and counted
//! in `fairway_access_log_dropped_total`; the request path never waits on stdout.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, Version};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::config::AccessFormat;
use crate::metrics::Metrics;

/// Bytes of lines held between two writes; past it, lines are dropped and counted.
pub const MAX_PENDING_BYTES: usize = 8 << 20;

/// How often queued lines are written out. Requests only append to a shared buffer; the
/// writer swaps it out on each tick and writes it in one go, so a busy proxy pays a few
/// writes per tick instead of a task wake-up and a write per request.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// The request side of the access log, held by the shared state. Dropping it lets the
/// writer write what is left and stop.
#[derive(Debug)]
pub struct AccessLog {
    inner: Arc<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    buf: Mutex<Vec<u8>>,
    closed: AtomicBool,
}

impl AccessLog {
    /// Starts the writer task on stdout.
    pub fn start() -> AccessLog {
        AccessLog::to(tokio::io::stdout())
    }

    fn to<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(out: W) -> AccessLog {
        let inner = Arc::new(Pending::default());
        tokio::spawn(write_lines(Arc::clone(&inner), out));
        AccessLog { inner }
    }

    /// Queues the line of `entry`, or drops and counts it when the writer is that far
    /// behind. Formats into a per-thread buffer: no allocation per line.
    pub fn send(&self, entry: &Entry, metrics: &Metrics) {
        thread_local! {
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            entry.write_line(&mut line);
            let mut buf = self.inner.buf.lock().unwrap_or_else(|e| e.into_inner());
            if buf.len() + line.len() > MAX_PENDING_BYTES {
                drop(buf);
                metrics.access_log_dropped.inc();
            } else {
                buf.extend_from_slice(line.as_bytes());
            }
        });
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Relaxed);
    }
}

async fn write_lines<W: tokio::io::AsyncWrite + Unpin>(pending: Arc<Pending>, mut out: W) {
    let mut tick = crate::timing::ticker(FLUSH_EVERY);
    let mut spare: Vec<u8> = Vec::new();
    loop {
        tick.tick().await;
        let closed = pending.closed.load(Ordering::Relaxed);
        {
            let mut buf = pending.buf.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *buf, &mut spare);
        }
        if !spare.is_empty() {
            // When stdout is gone the lines are dropped, so the buffer never fills for that
            // reason.
            if out.write_all(&spare).await.is_ok() {
                let _ = out.flush().await;
            }
            spare.clear();
        }
        if closed {
            return;
        }
    }
}

/// What is known of a request when its response ends.
#[derive(Debug)]
pub struct Entry {
    format: AccessFormat,
    time: SystemTime,
    start: Instant,
    method: Method,
    uri: http::Uri,
    version: Version,
    /// Status sent.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// Client IP.
    pub client: IpAddr,
    /// Upstream name, if routed.
    pub upstream: Option<std::sync::Arc<str>>,
    /// Server `addr` of the last try, if any.
    pub server: Option<std::sync::Arc<str>>,
    /// Tries made.
    pub attempts: u32,
    /// The request's `X-Request-Id`, with `request_id` on.
    pub request_id: Option<http::HeaderValue>,
    /// The head was refused unread: no method or target to log.
    refused: bool,
}

impl Entry {
    /// Notes the request head; the rest is filled in as the request proceeds.
    pub fn begin(
        format: AccessFormat,
        method: &Method,
        uri: &http::Uri,
        version: Version,
        peer: IpAddr,
    ) -> Entry {
        Entry {
            format,
            time: SystemTime::now(),
            start: Instant::now(),
            method: method.clone(),
            uri: uri.clone(),
            version,
            status: 0,
            bytes: 0,
            client: peer,
            upstream: None,
            server: None,
            attempts: 0,
            request_id: None,
            refused: false,
        }
    }

    /// The line to write, newline included.
    pub fn line(&self) -> String {
        let mut s = String::new();
        self.write_line(&mut s);
        s
    }

    /// An entry for a request head refused before it could be read (400, 431): its method
    /// and target are logged as `-`, as Nginx logs a request line it could not parse.
    pub fn refused(format: AccessFormat, peer: IpAddr, status: u16) -> Entry {
        Entry {
            format,
            time: SystemTime::now(),
            start: Instant::now(),
            method: Method::from_bytes(b"-").unwrap_or_default(),
            uri: http::Uri::from_static("/"),
            version: Version::HTTP_11,
            refused: true,
            status,
            bytes: 0,
            client: peer,
            upstream: None,
            server: None,
            attempts: 0,
            request_id: None,
        }
    }

    /// The request target as received (path and query).
    fn path(&self) -> &str {
        if self.refused {
            return "-";
        }
        self.uri
            .path_and_query()
            .map_or_else(|| self.uri.path(), |p| p.as_str())
    }

    /// Appends the line, newline included.
    pub fn write_line(&self, s: &mut String) {
        use std::fmt::Write;
        let path = self.path();
        let duration = self.start.elapsed();
        let server = self.server.as_deref().unwrap_or("-");
        let upstream = self.upstream.as_deref().unwrap_or("-");
        // Visible ASCII only (the rule for keeping a sent ID): no space or line break.
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        match self.format {
            AccessFormat::Json => {
                // Written by hand: building a serde_json::Value per request cost more than
                // the rest of the line.
                let _ = write!(
                    s,
                    "{{\"time\":\"{}\",\"client\":\"{}\",\"method\":",
                    Rfc3339Millis(self.time),
                    self.client
                );
                push_json_str(s, self.method.as_str());
                s.push_str(",\"path\":");
                push_json_str(s, path);
                let _ = write!(
                    s,
                    ",\"protocol\":\"{}\",\"status\":{},\"bytes\":{},\"upstream\":",
                    version_str(self.version),
                    self.status,
                    self.bytes
                );
                push_json_str(s, upstream);
                s.push_str(",\"server\":");
                push_json_str(s, server);
                let _ = write!(
                    s,
                    ",\"duration\":{:.6},\"attempts\":{},\"request_id\":",
                    secs(duration),
                    self.attempts
                );
                push_json_str(s, request_id);
                s.push_str("}\n");
            }
            _ => {
                // The method and target come from the client: escaped, so that a `"` or a
                // line break in them cannot forge fields or lines.
                let _ = write!(s, "{} - - [{}] \"", self.client, ClfTime(self.time));
                push_escaped(s, self.method.as_str());
                s.push(' ');
                push_escaped(s, path);
                let _ = writeln!(
                    s,
                    " {}\" {} {} upstream={} server={} duration={:.6} attempts={} request_id={}",
                    version_str(self.version),
                    self.status,
                    self.bytes,
                    upstream,
                    server,
                    secs(duration),
                    self.attempts,
                    request_id
                );
            }
        }
    }
}

/// `2026-11-29T01:10:00.123Z`. The date and time of day are formatted once per second per
/// thread; most lines only add their milliseconds.
struct Rfc3339Millis(SystemTime);

impl std::fmt::Display for Rfc3339Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::cell::RefCell;
        thread_local! {
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        let since = self
            .0
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        SECOND.with(|cache| {
            let mut c = cache.borrow_mut();
            if c.0 != secs {
                let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
                // "YYYY-MM-DDTHH:MM:SS" of "…SSZ".
                let full = humantime::format_rfc3339_seconds(t).to_string();
                c.1 = full.trim_end_matches('Z').to_owned();
                c.0 = secs;
            }
            write!(f, "{}.{:03}Z", c.1, since.subsec_millis())
        })
    }
}

/// The Common Log Format time, `10/Oct/2000:13:55:36 +0000`, in UTC. Formatted once per
/// second per thread into a fixed buffer (no allocation); the other lines of that second
/// copy it.
struct ClfTime(SystemTime);

/// Length of `10/Oct/2000:13:55:36 +0000`.
const CLF_LEN: usize = 26;

impl std::fmt::Display for ClfTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::cell::Cell;
        thread_local! {
            static SECOND: Cell<(u64, [u8; CLF_LEN])> = const { Cell::new((u64::MAX, [0; CLF_LEN])) };
        }
        let secs = self
            .0
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        SECOND.with(|cache| {
            let (cached, mut text) = cache.get();
            if cached != secs {
                text = clf_time(secs);
                cache.set((secs, text));
            }
            // Always ASCII.
            f.write_str(std::str::from_utf8(&text).unwrap_or_default())
        })
    }
}

/// `secs` after the Unix epoch as `DD/Mon/YYYY:HH:MM:SS +0000` (years up to 9999).
fn clf_time(secs: u64) -> [u8; CLF_LEN] {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    // 9999-12-31T23:59:59Z: the last second with a four-digit year.
    let secs = secs.min(253_402_300_799);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's `civil_from_days`), in eras of
    // 400 years that start on 1 March.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);

    let mut out = *b"DD/Mon/YYYY:HH:MM:SS +0000";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 2, day);
    put(7, 4, year);
    put(12, 2, rem / 3600);
    put(15, 2, rem / 60 % 60);
    put(18, 2, rem % 60);
    // `month` is 1 to 12.
    out[3..6].copy_from_slice(MONTHS[(month as usize - 1) % 12]);
    out
}

/// Appends `v` as a JSON string.
fn push_json_str(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `v` for the common format as Nginx escapes its log variables: `"`, `\\`, and
/// bytes below 0x20 or from 0x7f up are written as `\xHH`; the line stays one line of
/// printable ASCII whatever the client sent.
fn push_escaped(out: &mut String, v: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut clean = 0;
    for (i, b) in v.bytes().enumerate() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            // `clean..i` holds printable ASCII only; `get` is `None` just for the empty
            // range between two bytes of one multi-byte character.
            if let Some(run) = v.get(clean..i) {
                out.push_str(run);
            }
            out.push_str("\\x");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
            clean = i + 1;
        }
    }
    out.push_str(&v[clean..]);
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn entry(format: AccessFormat) -> Entry {
        let req = Request::get("/a?b=1").body(()).unwrap();
        let mut e = Entry::begin(
            format,
            req.method(),
            req.uri(),
            req.version(),
            "10.0.0.9".parse().unwrap(),
        );
        e.status = 200;
        e.bytes = 12;
        e.server = Some("127.0.0.1:13000".into());
        e.upstream = Some("app".into());
        e.attempts = 1;
        e
    }

    #[test]
    fn the_request_id_is_logged_in_both_formats() {
        let mut e = entry(AccessFormat::Json);
        e.request_id = Some(http::HeaderValue::from_static("0123abcd"));
        let v: serde_json::Value = serde_json::from_str(e.line().trim()).unwrap();
        assert_eq!(v["request_id"], "0123abcd");
        e.format = AccessFormat::Common;
        assert!(e.line().trim_end().ends_with(" request_id=0123abcd"));
    }

    #[test]
    fn json_line_has_every_field() {
        let line = entry(AccessFormat::Json).line();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["client"], "10.0.0.9");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 12);
        assert_eq!(v["server"], "127.0.0.1:13000");
        assert_eq!(v["upstream"], "app");
        assert_eq!(v["attempts"], 1);
        assert!(v["duration"].as_f64().unwrap() >= 0.0);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn timestamps_match_rfc3339() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(
            Rfc3339Millis(t).to_string(),
            humantime::format_rfc3339_millis(t).to_string()
        );
        let t2 = t + Duration::from_millis(1_500);
        assert_eq!(
            Rfc3339Millis(t2).to_string(),
            humantime::format_rfc3339_millis(t2).to_string()
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        let req = Request::get("/q?x=%22y%22&z=\\").body(()).unwrap();
        let e = Entry::begin(
            AccessFormat::Json,
            req.method(),
            req.uri(),
            req.version(),
            "10.0.0.9".parse().unwrap(),
        );
        let v: serde_json::Value = serde_json::from_str(e.line().trim()).unwrap();
        assert_eq!(v["path"], "/q?x=%22y%22&z=\\");
        let mut out = String::new();
        push_json_str(&mut out, "a\"b\\c\u{1}\n");
        assert_eq!(out, "\"a\\\"b\\\\c\\u0001\\n\"");
        assert_eq!(v["server"], "-");
    }

    #[test]
    fn common_times_are_clf_in_utc() {
        let at = |s: u64| ClfTime(std::time::UNIX_EPOCH + Duration::from_secs(s)).to_string();
        assert_eq!(at(971_186_136), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(1_709_251_199), "29/Feb/2024:23:59:59 +0000");
        assert_eq!(at(1_709_251_200), "01/Mar/2024:00:00:00 +0000");
        assert_eq!(at(u64::MAX / 2), "31/Dec/9999:23:59:59 +0000");
        // Every day from 1970 to 2130 (an hour and a second later each day), against
        // humantime's RFC 3339: the same date and time of day.
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        for day in 0..58_440 {
            let s = day * 86_400 + (day * 3_601) % 86_400;
            let t = std::time::UNIX_EPOCH + Duration::from_secs(s);
            let r = humantime::format_rfc3339_seconds(t).to_string();
            let month: usize = r[5..7].parse().unwrap();
            let want = format!(
                "{}/{}/{}:{} +0000",
                &r[8..10],
                MONTHS[month - 1],
                &r[0..4],
                &r[11..19]
            );
            assert_eq!(ClfTime(t).to_string(), want, "{s}");
        }
    }

    #[test]
    fn common_line() {
        let line = entry(AccessFormat::Common).line();
        assert!(line.starts_with("10.0.0.9 - - ["), "{line}");
        let time = &line["10.0.0.9 - - [".len()..][..CLF_LEN];
        assert!(
            time.ends_with(" +0000") && line.contains(" +0000] \"GET "),
            "{line}"
        );
        assert!(
            line.contains(
                "\"GET /a?b=1 HTTP/1.1\" 200 12 upstream=app server=127.0.0.1:13000 duration="
            ),
            "{line}"
        );
        assert!(
            line.trim_end().ends_with("attempts=1 request_id=-"),
            "{line}"
        );
    }

    #[test]
    fn common_fields_from_the_client_are_escaped() {
        let mut out = String::new();
        push_escaped(&mut out, "/a\"b\\c\r\n\x01\x7fé?q=1 2");
        assert_eq!(out, "/a\\x22b\\x5Cc\\x0D\\x0A\\x01\\x7F\\xC3\\xA9?q=1 2");
        let mut out = String::new();
        push_escaped(&mut out, "éé\u{1F600}");
        assert_eq!(out, "\\xC3\\xA9\\xC3\\xA9\\xF0\\x9F\\x98\\x80");

        // A target as hyper hands it over: `"` (in the path), `\\` and UTF-8 pass its
        // parser; control bytes do not.
        let req = Request::get("/x\"y/é\\z?q=\\1").body(()).unwrap();
        let mut e = Entry::begin(
            AccessFormat::Common,
            req.method(),
            req.uri(),
            req.version(),
            "10.0.0.9".parse().unwrap(),
        );
        e.status = 200;
        let line = e.line();
        assert!(
            line.contains("\"GET /x\\x22y/\\xC3\\xA9\\x5Cz?q=\\x5C1 HTTP/1.1\" 200 0 "),
            "{line}"
        );
        assert!(line.is_ascii() && line.lines().count() == 1, "{line}");
    }

    #[tokio::test]
    async fn queued_lines_are_written_and_the_rest_is_dropped_and_counted() {
        let (w, mut r) = tokio::io::duplex(1 << 20);
        let log = AccessLog::to(w);
        let metrics = Metrics::new();
        let a = entry(AccessFormat::Common);
        log.send(&a, &metrics);
        log.send(&a, &metrics);
        // Pretend the writer is far behind.
        log.inner
            .buf
            .lock()
            .unwrap()
            .resize(MAX_PENDING_BYTES, b'-');
        log.send(&a, &metrics);
        assert_eq!(metrics.access_log_dropped.get(), 1);
        log.inner.buf.lock().unwrap().truncate(2 * a.line().len());
        drop(log);
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut r, &mut out)
            .await
            .unwrap();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(
            out.lines()
                .all(|l| l.contains("\"GET /a?b=1 HTTP/1.1\" 200 12"))
        );
    }
}
