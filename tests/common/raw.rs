//! A raw HTTP/1.1 connection driven byte by byte ([`RawConn`]) and the responses read off it
//! ([`RawResponse`]), for tests that need exact bytes on the wire.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{eventually, raw_status};

/// One HTTP/1.1 connection driven byte by byte.
pub struct RawConn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
    /// The proxy reset the connection instead of closing it cleanly.
    pub reset: bool,
}

/// A response read off a [`RawConn`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        RawConn {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
            reset: false,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes into the buffer; 0 at EOF.
    pub async fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp).await.expect("read failed");
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.fill().await > 0, "EOF in the middle of a response");
        }
    }

    pub async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await > 0, "EOF in the middle of a body");
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one whole response (Content-Length, chunked, or until EOF).
    pub async fn response(&mut self) -> RawResponse {
        tokio::time::timeout(Duration::from_secs(5), self.read_response())
            .await
            .expect("no response within 5 s")
    }

    pub async fn read_response(&mut self) -> RawResponse {
        let status_line = self.line().await;
        let status = raw_status(&status_line).unwrap_or_else(|| panic!("bad: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let l = self.line().await;
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header without a colon");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut r = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let size_line = self.line().await;
                let hex = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16).expect("bad chunk size");
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let chunk = self.exact(size).await;
                r.body.extend_from_slice(&chunk);
                self.line().await;
            }
        } else if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().expect("bad content-length");
            r.body = self.exact(len).await;
        } else if status >= 200 && status != 204 && status != 304 {
            while self.fill().await > 0 {}
            r.body = std::mem::take(&mut self.buf);
        }
        r
    }

    /// Reads a response head only (a HEAD answer) and returns its status.
    pub async fn read_head_only(&mut self) -> u16 {
        let status = raw_status(&self.line().await).expect("bad status line");
        while !self.line().await.is_empty() {}
        status
    }

    /// Waits up to `limit` for the proxy to close the connection (EOF or reset); returns how
    /// long that took, or `None` if it is still open.
    pub async fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut tmp = [0u8; 4096];
        let closed = tokio::time::timeout(limit, async {
            loop {
                match self.stream.read(&mut tmp).await {
                    Ok(0) => return,
                    Err(_) => {
                        self.reset = true;
                        return;
                    }
                    Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                }
            }
        })
        .await;
        closed.ok().map(|()| start.elapsed())
    }
}

/// A raw TCP upstream: each accepted connection is handed to `behaviour`. Returns its
/// address and the number of connections accepted.
pub async fn raw_upstream<F, Fut>(behaviour: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&accepted);
    let behaviour = Arc::new(behaviour);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(behaviour(stream));
        }
    });
    (addr, accepted)
}

/// Polls until `flag` is set, within `limit`.
pub async fn until_set(limit: Duration, what: &str, flag: &Arc<AtomicBool>) {
    eventually(limit, what, || {
        let f = Arc::clone(flag);
        async move { f.load(Ordering::SeqCst) }
    })
    .await;
}

/// Reads until the end of a request or response head; `None` at EOF.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(buf);
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Reads until the peer closes (EOF or reset) or `limit` passes; returns the bytes and
/// whether the peer closed.
pub async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&tmp[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}

/// The statuses of every response head found in raw bytes, in order.
pub fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text[i + 9..].get(..3)?.parse().ok())
        .collect()
}
