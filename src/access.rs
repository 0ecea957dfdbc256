//! The access log (`[log] access`): one line per request on stdout, formatted on the
//! request's task when its response ends and handed to a writer task over a bounded channel.
//! When the writer falls behind, lines are dropped and counted in
//! `fairway_access_log_dropped_total`; the request path never waits on stdout.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Version};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::AccessFormat;
use crate::metrics::Metrics;

/// Lines buffered between the request path and the writer.
pub const CHANNEL_LINES: usize = 16 * 1024;

/// The sending side, held by the shared state.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
}

impl AccessLog {
    /// Starts the writer task on stdout; it ends when every sender is gone.
    pub fn start() -> AccessLog {
        let (tx, rx) = mpsc::channel(CHANNEL_LINES);
        tokio::spawn(write_lines(rx, tokio::io::stdout()));
        AccessLog { tx }
    }

    /// Queues a line, or drops and counts it when the queue is full.
    pub fn send(&self, line: String, metrics: &Metrics) {
        if self.tx.try_send(line).is_err() {
            metrics.access_log_dropped.inc();
        }
    }
}

/// How often queued lines are written out. Senders never wake the writer: it collects
/// what piled up on each tick and writes it in one go, so a busy proxy pays a few writes per
/// tick instead of a task wake-up and a write per request.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

async fn write_lines<W: tokio::io::AsyncWrite + Unpin>(mut rx: mpsc::Receiver<String>, out: W) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, out);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open {
        tick.tick().await;
        let mut ok = true;
        loop {
            match rx.try_recv() {
                Ok(line) => ok &= out.write_all(line.as_bytes()).await.is_ok(),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // When stdout is gone, lines are still drained so that senders never see a full
        // queue for that reason.
        if ok {
            let _ = out.flush().await;
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
    path: String,
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
}

impl Entry {
    /// Notes the request head; the rest is filled in as the request proceeds.
    pub fn begin<B>(format: AccessFormat, req: &Request<B>, peer: IpAddr) -> Entry {
        Entry {
            format,
            time: SystemTime::now(),
            start: Instant::now(),
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
            version: req.version(),
            status: 0,
            bytes: 0,
            client: peer,
            upstream: None,
            server: None,
            attempts: 0,
        }
    }

    /// The line to write, newline included.
    pub fn line(&self) -> String {
        let duration = self.start.elapsed();
        let time = Rfc3339Millis(self.time);
        let server = self.server.as_deref().unwrap_or("-");
        let upstream = self.upstream.as_deref().unwrap_or("-");
        match self.format {
            AccessFormat::Json => {
                // Written by hand: building a serde_json::Value per request cost more than
                // the rest of the line.
                use std::fmt::Write;
                let mut s = String::with_capacity(256 + self.path.len());
                s.push_str("{\"time\":\"");
                let _ = write!(s, "{time}");
                let _ = write!(s, "\",\"client\":\"{}\",\"method\":", self.client);
                push_json_str(&mut s, self.method.as_str());
                s.push_str(",\"path\":");
                push_json_str(&mut s, &self.path);
                let _ = write!(
                    s,
                    ",\"protocol\":\"{}\",\"status\":{},\"bytes\":{},\"upstream\":",
                    version_str(self.version),
                    self.status,
                    self.bytes
                );
                push_json_str(&mut s, upstream);
                s.push_str(",\"server\":");
                push_json_str(&mut s, server);
                let _ = writeln!(
                    s,
                    ",\"duration\":{:.6},\"attempts\":{}}}",
                    secs(duration),
                    self.attempts
                );
                s
            }
            _ => format!(
                "{} - - [{}] \"{} {} {}\" {} {} upstream={} server={} duration={:.6} attempts={}\n",
                self.client,
                time,
                self.method,
                self.path,
                version_str(self.version),
                self.status,
                self.bytes,
                upstream,
                server,
                secs(duration),
                self.attempts
            ),
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

    fn entry(format: AccessFormat) -> Entry {
        let req = Request::get("/a?b=1").body(()).unwrap();
        let mut e = Entry::begin(format, &req, "10.0.0.9".parse().unwrap());
        e.status = 200;
        e.bytes = 12;
        e.server = Some("127.0.0.1:13000".into());
        e.upstream = Some("app".into());
        e.attempts = 1;
        e
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
        let req = Request::get("/a").body(()).unwrap();
        let mut e = Entry::begin(AccessFormat::Json, &req, "10.0.0.9".parse().unwrap());
        e.path = "/q?x=\"y\"\\z\u{1}".into();
        let v: serde_json::Value = serde_json::from_str(e.line().trim()).unwrap();
        assert_eq!(v["path"], "/q?x=\"y\"\\z\u{1}");
        assert_eq!(v["server"], "-");
    }

    #[test]
    fn common_line() {
        let line = entry(AccessFormat::Common).line();
        assert!(line.starts_with("10.0.0.9 - - ["), "{line}");
        assert!(
            line.contains(
                "\"GET /a?b=1 HTTP/1.1\" 200 12 upstream=app server=127.0.0.1:13000 duration="
            ),
            "{line}"
        );
        assert!(line.trim_end().ends_with("attempts=1"), "{line}");
    }

    #[tokio::test]
    async fn writer_writes_queued_lines() {
        let (tx, rx) = mpsc::channel(4);
        let (w, mut r) = tokio::io::duplex(1024);
        let task = tokio::spawn(write_lines(rx, w));
        tx.send("a\n".into()).await.unwrap();
        tx.send("b\n".into()).await.unwrap();
        drop(tx);
        task.await.unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut r, &mut out)
            .await
            .unwrap();
        assert_eq!(out, "a\nb\n");
    }
}
