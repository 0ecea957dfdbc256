//! Hostile clients (CONTRACT §2 `[server]` limits, §3; SECURITY.md): malformed requests,
//! `Content-Length` beside `chunked` and bytes past the declared length (never split into
//! two requests upstream), heads past `max_header_bytes`, a slow loris, a body that stops
//! moving, and a client that never reads a big download. Each is answered as the contract
//! says while a well-behaved client ([`Steady`]) keeps getting 200s beside it, on its own
//! upstream behind the same proxy.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::*;
use common::steady::*;
use common::usage::{HEAVY, MIB, rss_bytes};
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

// ---------------------------------------------------------------------------------------
// An upstream that records what it receives

/// What an upstream saw: `METHOD URI body=N te=.. cl=..` for each request.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// An upstream that records each request it gets and answers 200 `recorded`.
async fn recorder() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .map_or("-".to_owned(), |v| v.to_str().unwrap_or("?").to_owned())
                        };
                        let line = format!(
                            "{} {} te={} cl={}",
                            req.method(),
                            req.uri(),
                            h("transfer-encoding"),
                            h("content-length")
                        );
                        let body = match req.into_body().collect().await {
                            Ok(b) => b.to_bytes().len().to_string(),
                            Err(_) => "error".to_owned(),
                        };
                        s.0.lock().unwrap().push(format!("{line} body={body}"));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"recorded",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_reach_the_upstream() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("", &[app.addr], "").await;
    let cases: &[(&str, &[u8])] = &[
        ("malformed request line", b"THIS IS NOT HTTP\r\n\r\n"),
        (
            "control byte in the target",
            b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n",
        ),
        ("unknown version", b"GET / HTTP/7.3\r\nHost: h\r\n\r\n"),
        (
            "control byte in a header name",
            b"GET / HTTP/1.1\r\nHost: h\r\nX\x01Bad: v\r\n\r\n",
        ),
        (
            "space in a header name",
            b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: v\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad : v\r\n\r\n",
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Nul: a\x00b\r\n\r\n",
        ),
        (
            "obs-fold continuation line",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Fold: a\r\n folded\r\n\r\n",
        ),
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "Content-Length not a number",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5x\r\n\r\nhello",
        ),
        (
            "negative Content-Length",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
        ),
        (
            "Content-Length past u64",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let mut c = RawConn::connect(b.addr()).await;
        c.send(bytes).await;
        let r = c.response().await;
        // The proxy's short text body, also for heads hyper itself refuses to parse.
        // The request ID follows the text (CONTRACT §8).
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let text = body.split("request id: ").next().unwrap_or_default();
        assert_eq!((r.status, text), (400, "400 bad request\n"), "{what}");
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{what}"
        );
        // What follows a malformed request cannot be framed: the answer closes.
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        assert!(
            c.closed_within(Duration::from_secs(5)).await.is_some(),
            "{what}: the connection stays open after the 400"
        );
    }
    assert_eq!(app.hits(), 0, "a malformed request reached the upstream");
    // An upstream's own 400 passes through untouched.
    let r = get(&format!("http://{}/status/400", b.addr())).await;
    assert_eq!((r.status, r.upstream().as_str()), (400, "app"));
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_never_split_into_two_requests() {
    let (up, seen) = recorder().await;
    let mut b = bench("", &[up], "").await;
    // Each is one request under one framing and two under the other; hyper takes the
    // chunked framing (RFC 9112 §6.3) and closes the connection after answering, so the
    // bytes after the chunked body are never read as a request.
    let cases: &[(&str, &[u8], &[u16], &str)] = &[
        (
            "CL then TE, body empty under chunked",
            b"POST /smuggle-a HTTP/1.1\r\nHost: h\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled-a HTTP/1.1\r\nHost: h\r\n\r\n",
            &[200],
            "POST /smuggle-a te=chunked cl=- body=0",
        ),
        (
            "TE then CL, body empty under chunked",
            b"POST /smuggle-b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 44\r\n\r\n0\r\n\r\nGET /smuggled-b HTTP/1.1\r\nHost: h\r\n\r\n",
            &[200],
            "POST /smuggle-b te=chunked cl=- body=0",
        ),
        (
            "CL shorter than the chunked body",
            b"POST /smuggle-c HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled-c HTTP/1.1\r\nHost: h\r\n\r\n",
            &[200],
            "POST /smuggle-c te=chunked cl=- body=5",
        ),
        (
            "chunked hidden behind a second Transfer-Encoding",
            b"POST /smuggle-d HTTP/1.1\r\nHost: h\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /smuggled-d HTTP/1.1\r\nHost: h\r\n\r\n",
            &[400],
            "",
        ),
    ];
    for (what, bytes, want, forwarded) in cases {
        let before = seen.list().len();
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let (answer, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
        assert_eq!(
            statuses(&answer),
            *want,
            "{what}: {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert!(closed, "{what}: connection left open after the answer");
        let got: Vec<String> = seen.list()[before..].to_vec();
        let want_seen: Vec<String> = if forwarded.is_empty() {
            vec![]
        } else {
            vec![(*forwarded).to_owned()]
        };
        assert_eq!(got, want_seen, "{what}: what the upstream received");
    }
    assert!(
        seen.list().iter().all(|l| !l.contains("smuggled")),
        "a smuggled request reached the upstream: {:?}",
        seen.list()
    );
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_past_the_declared_length_are_framed_as_the_next_request() {
    let (up, seen) = recorder().await;
    let mut b = bench("", &[up], "").await;

    // Content-Length: 5 then 50 bytes: the upstream gets exactly 5; the other 45 are the
    // start of the next request on the connection, garbage here: 400 and closed, and the
    // request written after them never arrives.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    let mut req = b"POST /declared HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello".to_vec();
    req.extend_from_slice(&[b'@'; 45]);
    req.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let (answer, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(
        statuses(&answer),
        [200, 400],
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(closed, "connection left open after the 400");
    assert_eq!(
        seen.list(),
        ["POST /declared te=- cl=5 body=5"],
        "what the upstream received"
    );

    // When the extra bytes happen to be a well-formed request, they are one: the upstream
    // gets two properly framed requests, never a body longer than declared.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(
        b"POST /declared-2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /pipelined HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let (answer, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(statuses(&answer), [200, 200]);
    assert!(closed);
    assert_eq!(
        seen.list()[1..],
        [
            "POST /declared-2 te=- cl=5 body=5",
            "GET /pipelined te=- cl=- body=0"
        ]
    );
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_past_max_header_bytes_is_431() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("max_header_bytes = \"16KiB\"", &[app.addr], "").await;
    // One big header; past twice the limit hyper refuses the head before the proxy sees
    // it, and the answer is the same.
    for size in [40_000, 200_000] {
        let big = "a".repeat(size);
        let req = format!("GET /big HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\n\r\n");
        let answer = raw(b.addr(), req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(raw_status(&answer), Some(431), "{size}: {answer:?}");
        assert!(
            answer.contains("\r\n\r\n431 request header fields too large\nrequest id: "),
            "{size}: {answer:?}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{size}: {answer:?}"
        );
    }
    // Many small headers, each line short (a long request line is the same case).
    let many: String = (0..2_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /many HTTP/1.1\r\nHost: h\r\n{many}\r\n");
    let started = Instant::now();
    let answer = raw(b.addr(), req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(raw_status(&answer), Some(431), "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the connection stays open after the 431"
    );
    assert_eq!(app.hits(), 0);
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_is_closed_after_header_read_timeout() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("header_read_timeout = \"1s\"", &[app.addr], "").await;
    let start = Instant::now();
    let mut c = RawConn::connect(b.addr()).await;
    c.send(b"GET /loris HTTP/1.1\r\nHost: h\r\nX-Slow: ").await;
    let mut silent = RawConn::connect(b.addr()).await;
    // One byte every 200 ms, never finishing the head.
    let mut tmp = [0u8; 1024];
    let closed_after = loop {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "slow-loris connection still open after 5 s"
        );
        if c.stream.write_all(b"x").await.is_err() {
            break start.elapsed();
        }
        match tokio::time::timeout(Duration::from_millis(200), c.stream.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
            Ok(Ok(n)) => panic!(
                "the proxy answered a slow-loris: {:?}",
                String::from_utf8_lossy(&tmp[..n])
            ),
            Err(_) => {}
        }
    };
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_millis(2500),
        "closed too late: {closed_after:?}"
    );
    // A connection that never sends a byte is a slow-loris too.
    let silent_closed = silent.closed_within(Duration::from_secs(3)).await;
    assert!(silent_closed.is_some(), "a silent connection is kept open");
    assert!(silent.buf.is_empty(), "the proxy answered a silent client");
    assert_eq!(app.hits(), 0);
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_moving_gets_408_after_body_read_timeout() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("body_read_timeout = \"1s\"", &[app.addr], "").await;
    let mut c = RawConn::connect(b.addr()).await;
    let start = Instant::now();
    c.send(b"POST /slow-body HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    // The body keeps moving for 1.5 s (longer than body_read_timeout in total, never
    // pausing that long): no 408 yet.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.send(b"ab").await;
    }
    let last_byte = start.elapsed();
    // Then it stops.
    let r = c.response().await;
    let took = start.elapsed();
    assert_eq!(r.status, 408, "{:?}", String::from_utf8_lossy(&r.body));
    let pause = took - last_byte;
    assert!(
        pause >= Duration::from_millis(900),
        "408 only {pause:?} after the last byte"
    );
    assert!(
        pause < Duration::from_millis(2500),
        "408 {pause:?} after the last byte"
    );
    assert!(
        c.closed_within(Duration::from_secs(2)).await.is_some(),
        "connection left open after the 408"
    );
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_a_big_download_is_not_buffered() {
    let _heavy = HEAVY.lock().await;
    const TOTAL: u64 = 100_000_000;
    let sent = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let (s2, f2) = (Arc::clone(&sent), Arc::clone(&finished));
    // Counts what the proxy takes from it: memory the proxy would use to buffer.
    let (up, _) = raw_upstream(move |mut s| {
        let (sent, finished) = (Arc::clone(&s2), Arc::clone(&f2));
        async move {
            if read_head(&mut s).await.is_none() {
                return;
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {TOTAL}\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_ok() {
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = TOTAL;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                    sent.fetch_add(n as u64, Ordering::SeqCst);
                    left -= n as u64;
                }
            }
            finished.store(true, Ordering::SeqCst);
        }
    })
    .await;
    let mut b = bench("", &[up], "").await;
    let rss_before = rss_bytes();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = socket.connect(b.addr()).await.unwrap();
    s.write_all(b"GET /bytes/100000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    // Never read: wait until the upstream is held back (nothing more taken for 500 ms).
    let start = Instant::now();
    let mut last = 0;
    let mut still_since = Instant::now();
    let mut rss_max = rss_before;
    while start.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        rss_max = rss_max.max(rss_bytes());
        let now = sent.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if now > 0 && still_since.elapsed() >= Duration::from_millis(500) {
            break;
        }
    }
    let held = sent.load(Ordering::SeqCst);
    let grew = rss_max.saturating_sub(rss_before);
    println!(
        "unread download: upstream sent {:.1} MiB of 95 MiB; RSS grew {:.1} MiB",
        held as f64 / MIB as f64,
        grew as f64 / MIB as f64
    );
    assert!(held > 0, "the download never started");
    assert!(
        held < 48 * MIB,
        "the proxy read {held} bytes for a client that reads nothing"
    );
    assert!(
        grew < 48 * MIB,
        "RSS grew {grew} bytes while a client read nothing"
    );
    // Other clients are served meanwhile, and the upstream is released when the client
    // goes away.
    let r = get(&b.url("/steady/side")).await;
    assert_eq!(r.status, 200);
    drop(s);
    until_set(
        Duration::from_secs(5),
        "upstream released after the client left",
        &finished,
    )
    .await;
    assert!(sent.load(Ordering::SeqCst) < TOTAL);
    b.steady_ok().await;
}
