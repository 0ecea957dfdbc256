//! Hardening: hostile clients, misbehaving upstreams, circuit breaking, HTTP/2 abuse and
//! the graceful end of WebSockets at shutdown (CONTRACT §2, §3, §7). Every case is answered
//! as the contract says while a well-behaved client ([`Steady`]) keeps getting 200s beside
//! it, on its own upstream behind the same proxy.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::*;
use common::steady::*;
use common::usage::{HEAVY, MIB, fd_limit, open_fds, rss_bytes};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

// ---------------------------------------------------------------------------------------
// Small upstreams

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

// ---------------------------------------------------------------------------------------
// Hostile clients

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
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(
            (r.status, body.as_str()),
            (400, "400 bad request\n"),
            "{what}"
        );
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
            answer.ends_with("\r\n\r\n431 request header fields too large\n"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_are_closed_and_the_proxy_still_serves() {
    let _heavy = HEAVY.lock().await;
    let limit = fd_limit();
    // Each connection costs two descriptors in this process (client and proxy side).
    let n: usize = if limit >= 6_000 {
        2_000
    } else {
        ((limit as usize).saturating_sub(500)) / 3
    };
    if n < 2_000 {
        println!("fd limit {limit}: opening {n} connections instead of 2000");
    }
    let app = TestUpstream::start("app").await;
    // A connection that has not sent a head is under header_read_timeout, one that has
    // been answered under idle_timeout.
    let mut b = bench(
        "idle_timeout = \"1s\"\nheader_read_timeout = \"2s\"",
        &[app.addr],
        "",
    )
    .await;
    let addr = b.addr();
    let fds_before = open_fds();

    // 2000 connections at once that never send a byte: all open together, then all
    // closed (a connection that has not sent a head is under header_read_timeout).
    let start = Instant::now();
    let mut silent: Vec<RawConn> = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(250) {
        let tasks: Vec<_> = (batch * 250..((batch + 1) * 250).min(n))
            .map(|_| tokio::spawn(RawConn::connect(addr)))
            .collect();
        for t in tasks {
            silent.push(t.await.unwrap());
        }
    }
    let opened = start.elapsed();
    // Accepted once the accept loop has caught up with the backlog.
    let mut active = 0.0;
    while start.elapsed() < Duration::from_millis(1500) {
        active = b.metric("fairway_client_connections_active").await;
        if active >= n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{n} silent connections opened in {opened:?}; {active} counted by the proxy; {} fds \
         in this process (was {fds_before})",
        open_fds()
    );
    assert!(
        active >= n as f64,
        "only {active} of {n} connections open at once"
    );
    let waits: Vec<_> = silent
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.closed_within(Duration::from_secs(8)).await }))
        .collect();
    for w in waits {
        w.await
            .unwrap()
            .expect("a silent connection was not closed within 8 s");
    }
    let all_closed = start.elapsed();
    println!("all {n} silent connections closed {all_closed:?} after the first was opened");
    assert!(all_closed < Duration::from_secs(7), "{all_closed:?}");

    // Connections that made one request and then sit idle: each closed about
    // idle_timeout after its answer.
    let idle: Vec<_> = (0..500)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = RawConn::connect(addr).await;
                c.send(format!("GET /idle/{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
                    .await;
                let r = c.response().await;
                assert_eq!(r.status, 200);
                c.closed_within(Duration::from_secs(8)).await
            })
        })
        .collect();
    let (mut fastest, mut slowest) = (Duration::MAX, Duration::ZERO);
    for t in idle {
        let after = t
            .await
            .unwrap()
            .expect("an idle keep-alive connection was not closed within 8 s");
        fastest = fastest.min(after);
        slowest = slowest.max(after);
    }
    println!("500 idle keep-alive connections closed {fastest:?}..{slowest:?} after their answer");
    assert!(
        fastest >= Duration::from_millis(800),
        "closed only {fastest:?} after the answer"
    );
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
    assert_eq!(app.hits(), 500);

    // The proxy still serves, and only the well-behaved client's connection is left.
    assert_eq!(get(&b.url("/after-idle")).await.status, 200);
    let mut active = 0.0;
    for _ in 0..100 {
        active = b.metric("fairway_client_connections_active").await;
        if active <= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(active <= 2.0, "{active} client connections still counted");
    b.steady_ok().await;
}

/// A keep-alive connection idle for `idle_timeout` is closed, whatever
/// `header_read_timeout` is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_shorter_than_header_read_timeout_is_honoured() {
    let app = TestUpstream::start("app").await;
    // header_read_timeout stays at its default, 10 s.
    let mut b = bench("idle_timeout = \"1s\"", &[app.addr], "").await;
    let mut c = RawConn::connect(b.addr()).await;
    c.send(b"GET /once HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    let closed = c.closed_within(Duration::from_secs(12)).await;
    let took = closed.expect("idle connection still open after 12 s");
    assert!(
        took < Duration::from_millis(2500),
        "idle connection closed {took:?} after its answer, idle_timeout is 1 s"
    );
    assert!(took >= Duration::from_millis(800), "{took:?}");
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_that_close_at_once_leaves_nothing_behind() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("", &[app.addr], "").await;
    let addr = b.addr();
    for _ in 0..5 {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    match i % 3 {
                        // Half a request head, then gone.
                        1 => {
                            let _ = s.write_all(b"GET /flood HTTP/1.1\r\nHo").await;
                        }
                        // Closed with a reset rather than a FIN.
                        2 => {
                            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        }
                        _ => {}
                    }
                    drop(s);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let mut active = 0.0;
    for _ in 0..100 {
        active = b.metric("fairway_client_connections_active").await;
        if active <= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(active <= 1.0, "{active} client connections still counted");
    assert_eq!(app.hits(), 0);
    assert_eq!(get(&b.url("/after-flood")).await.status, 200);
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_connection_is_closed_without_an_answer() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("max_connections = 50", &[app.addr], "").await;
    // The well-behaved client holds one connection; 49 more idle ones fill the limit.
    let mut idle = Vec::new();
    for _ in 0..49 {
        idle.push(RawConn::connect(b.addr()).await);
    }
    let mut active = 0.0;
    for _ in 0..100 {
        active = b.metric("fairway_client_connections_active").await;
        if active >= 50.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active, 50.0);
    // The 51st is accepted and closed at once, with no byte of answer.
    let mut over = RawConn::connect(b.addr()).await;
    let _ = over
        .stream
        .write_all(b"GET /over HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    let closed = over.closed_within(Duration::from_secs(1)).await;
    assert!(closed.is_some(), "the 51st connection was kept open");
    assert!(
        over.buf.is_empty(),
        "the 51st connection got an answer: {:?}",
        String::from_utf8_lossy(&over.buf)
    );
    assert!(b.metric("fairway_client_connections_rejected_total").await >= 1.0);
    assert_eq!(app.hits(), 0);
    // Once some close, new connections are served again.
    idle.truncate(39);
    let mut served = None;
    for _ in 0..100 {
        let mut c = RawConn::connect(b.addr()).await;
        let _ = c
            .stream
            .write_all(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let (bytes, _) = read_to_close(&mut c.stream, Duration::from_millis(500)).await;
        if let Some(s) = statuses(&bytes).first() {
            served = Some(*s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served, Some(200));
    drop(idle);
    b.steady_ok().await;
}

// ---------------------------------------------------------------------------------------
// Circuit breaking

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_per_server_a_request_gets_503_at_once() {
    let app = TestUpstream::start("app").await;
    app.set_delay(Duration::from_millis(500));
    let mut b = bench("", &[app.addr], "max_connections_per_server = 2").await;
    let in_flight: Vec<_> = (0..2)
        .map(|i| {
            let url = b.url(&format!("/slow/{i}"));
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    eventually(Duration::from_secs(3), "two requests in flight", || async {
        app.knobs.in_flight.load(Ordering::SeqCst) == 2
    })
    .await;
    let start = Instant::now();
    let third = get(&b.url("/slow/third")).await;
    let took = start.elapsed();
    assert_eq!(third.status, 503, "{}", third.text());
    assert!(took < Duration::from_millis(250), "503 after {took:?}");
    for t in in_flight {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(app.hits(), 2);
    assert_eq!(app.knobs.most_in_flight.load(Ordering::SeqCst), 2);
    // With room again, requests pass.
    assert_eq!(get(&b.url("/slow/after")).await.status, 200);
    b.steady_ok().await;
}

/// `max_pending` counts requests waiting for a new upstream connection. A connection that
/// never completes is made reliably with `tls = true` towards a server that accepts TCP
/// and never answers the TLS handshake: the dial waits until `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_pending_a_request_gets_503_at_once() {
    let (up, accepted) = raw_upstream(|mut s| async move {
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let mut b = bench(
        "connect_timeout = \"1s\"",
        &[up],
        "tls = true\ninsecure_skip_verify = true\nretries = 0\nmax_pending = 1",
    )
    .await;
    let url = b.url("/pending/1");
    let start = Instant::now();
    let first = tokio::spawn(async move { get(&url).await.status });
    eventually(Duration::from_secs(3), "first dial under way", || {
        let a = Arc::clone(&accepted);
        async move { a.load(Ordering::SeqCst) >= 1 }
    })
    .await;
    let t = Instant::now();
    let second = get(&b.url("/pending/2")).await;
    let took = t.elapsed();
    assert_eq!(second.status, 503, "{}", second.text());
    assert!(took < Duration::from_millis(250), "503 after {took:?}");
    // The first one waits out connect_timeout: 502.
    assert_eq!(first.await.unwrap(), 502);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    // Its place is free again: the next request waits for its own dial (502, not 503).
    assert_eq!(get(&b.url("/pending/3")).await.status, 502);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    b.steady_ok().await;
}

// ---------------------------------------------------------------------------------------
// HTTP/2

async fn h2_status(send: h2::client::SendRequest<Bytes>, uri: String) -> Result<u16, h2::Error> {
    let mut send = send.ready().await?;
    let (resp, _) = send.send_request(Request::get(uri).body(()).unwrap(), true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame on the wire.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for `GET http://authority/path` (literals, no Huffman, no
/// dynamic table).
fn h2_get(authority: &str, path: &str) -> Vec<u8> {
    // :method GET and :scheme http from the static table.
    let mut block = vec![0x82, 0x86];
    // :authority (index 1) and :path (index 4), literal without indexing.
    for (index, value) in [(0x01u8, authority), (0x04, path)] {
        assert!(value.len() < 127);
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

#[derive(Debug)]
struct H2Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl H2Frame {
    /// The error code of an RST_STREAM or GOAWAY frame.
    fn error_code(&self) -> u32 {
        let at = if self.kind == FRAME_GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// Reads frames off a raw HTTP/2 connection.
#[derive(Default)]
struct H2Frames {
    buf: Vec<u8>,
}

impl H2Frames {
    /// The next frame; `None` once the peer has closed (EOF or reset).
    async fn next(&mut self, s: &mut TcpStream) -> Option<H2Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = H2Frame {
                        kind: self.buf[3],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut tmp = [0u8; 16 * 1024];
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_past_max_concurrent_streams_wait_or_are_refused() {
    let _heavy = HEAVY.lock().await;
    let app = TestUpstream::start("app").await;
    app.set_delay(Duration::from_millis(1500));
    let mut b = bench("", &[app.addr], "").await;
    let addr = b.addr();

    // A client that follows the SETTINGS: 300 at once, the last 44 wait for a free slot.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut advertised = send.current_max_send_streams();
    for _ in 0..250 {
        if advertised != usize::MAX {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        advertised = send.current_max_send_streams();
    }
    assert_eq!(advertised, 256, "SETTINGS_MAX_CONCURRENT_STREAMS");
    let tasks: Vec<_> = (0..300)
        .map(|i| tokio::spawn(h2_status(send.clone(), format!("http://{addr}/h2/{i}"))))
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(200) => ok += 1,
            other => panic!("stream answered {other:?}"),
        }
    }
    assert_eq!(ok, 300);
    let peak = app.knobs.most_in_flight.load(Ordering::SeqCst);
    println!("polite h2 client: 300 served, at most {peak} at once upstream");
    assert!(peak <= 256, "{peak} streams in flight at once");
    assert!(peak >= 200, "only {peak} streams in flight at once");
    drop(send);
    let _ = driver.await;

    // A client that sends 300 requests before it has read the SETTINGS (raw frames): the
    // server refuses what is past its limit (RST_STREAM REFUSED_STREAM), serving the rest.
    app.knobs.most_in_flight.store(0, Ordering::SeqCst);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    for i in 0..300u32 {
        let headers = h2_get(&addr.to_string(), &format!("/h2raw/{i}"));
        out.extend(h2_frame(
            FRAME_HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &headers,
        ));
    }
    s.write_all(&out).await.unwrap();
    let (mut answered, mut refused) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let mut frames = H2Frames::default();
    while answered.len() + refused.len() < 300 {
        let f = tokio::time::timeout(Duration::from_secs(10), frames.next(&mut s))
            .await
            .expect("no frame within 10 s")
            .expect("connection closed before every stream was answered");
        match f.kind {
            FRAME_HEADERS => {
                answered.insert(f.stream);
            }
            FRAME_RST_STREAM => {
                assert_eq!(f.error_code(), REFUSED_STREAM, "stream {} reset", f.stream);
                refused.insert(f.stream);
            }
            FRAME_GOAWAY => panic!("GOAWAY {:#x}", f.error_code()),
            _ => {}
        }
    }
    println!(
        "300 streams sent before the SETTINGS were read: {} served, {} refused",
        answered.len(),
        refused.len()
    );
    assert_eq!(answered.len(), 256);
    assert_eq!(refused.len(), 44);
    // The refused ones are the last opened.
    assert_eq!(refused.iter().next().copied(), Some(2 * 256 + 1));
    let peak = app.knobs.most_in_flight.load(Ordering::SeqCst);
    assert!(peak <= 256, "{peak} streams in flight at once");
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_gets_the_connection_closed() {
    let app = TestUpstream::start("app").await;
    app.set_delay(Duration::from_millis(100));
    let mut b = bench("", &[app.addr], "").await;
    let addr = b.addr();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let start = Instant::now();
    let mut opened = 0;
    let mut refused: Option<h2::Error> = None;
    let mut ready = Some(send);
    for i in 0..10_000 {
        let mut send = match ready.take().unwrap().ready().await {
            Ok(s) => s,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        let req = Request::get(format!("http://{addr}/reset/{i}"))
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Ok((resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                drop(resp);
                opened += 1;
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        ready = Some(send);
        if i % 64 == 63 {
            // Let the connection task write what is queued.
            tokio::task::yield_now().await;
        }
    }
    drop(ready);
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the connection is still open 10 s after the resets")
        .unwrap();
    let took = start.elapsed();
    println!(
        "rapid reset: {opened} streams opened and reset; client stopped by {refused:?}; \
         connection ended {ended:?} after {took:?}; {} reached the upstream",
        app.hits()
    );
    let err = refused
        .or(ended.err())
        .expect("the proxy let 10,000 reset streams through without closing the connection");
    assert!(
        err.is_go_away() || err.is_io(),
        "the connection ended with {err:?}, not a GOAWAY"
    );
    assert!(opened < 10_000, "all 10,000 streams were accepted");
    assert!(
        app.hits() < 1_000,
        "{} reset streams still went upstream",
        app.hits()
    );

    // The same on raw frames, to see what the proxy says: HEADERS then RST_STREAM (CANCEL)
    // for 1,000 streams in one burst; the proxy answers GOAWAY (ENHANCE_YOUR_CALM) and
    // closes the connection.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    for i in 0..1_000u32 {
        let headers = h2_get(&addr.to_string(), &format!("/raw-reset/{i}"));
        out.extend(h2_frame(FRAME_HEADERS, END_HEADERS, 2 * i + 1, &headers));
        out.extend(h2_frame(
            FRAME_RST_STREAM,
            0,
            2 * i + 1,
            &CANCEL.to_be_bytes(),
        ));
    }
    let _ = s.write_all(&out).await;
    let mut frames = H2Frames::default();
    let mut goaway = None;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(f) = frames.next(&mut s).await {
            if f.kind == FRAME_GOAWAY {
                goaway = Some(f.error_code());
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection still open 5 s after 1,000 resets"
    );
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "GOAWAY error code");

    assert_eq!(get(&b.url("/after-reset")).await.status, 200);
    b.steady_ok().await;
}

// ---------------------------------------------------------------------------------------
// Misbehaving upstreams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_connections_is_502() {
    let mut b = bench("", &[dead_addr().await], "").await;
    let start = Instant::now();
    let r = get(&b.url("/refused")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(start.elapsed() < Duration::from_secs(2));
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_504_after_request_timeout() {
    let (up, _) = raw_upstream(|mut s| async move {
        let _ = read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let mut b = bench("request_timeout = \"1s\"", &[up], "").await;
    let start = Instant::now();
    let r = get(&b.url("/silent")).await;
    let took = start.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took >= Duration::from_millis(900), "504 after {took:?}");
    assert!(took < Duration::from_secs(3), "504 after {took:?}");
    b.steady_ok().await;
}

/// An upstream that reads the request head, writes `answer` and then stays silent; the
/// client must get 502 while the proxy keeps serving everyone else.
async fn answering_is_502(answer: Vec<u8>, path: &str) {
    let answer = Arc::new(answer);
    let (up, _) = raw_upstream(move |mut s| {
        let answer = Arc::clone(&answer);
        async move {
            let _ = read_head(&mut s).await;
            let _ = s.write_all(&answer).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let mut b = bench("", &[up], "").await;
    let r = get(&b.url(path)).await;
    assert_eq!(r.status, 502, "{path}: {}", r.text());
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_garbage_is_502() {
    answering_is_502(b"NOT HTTP\r\n\r\n".to_vec(), "/garbage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_a_huge_response_head_is_502() {
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    let value = "h".repeat(1000);
    for i in 0..1_000 {
        head.extend_from_slice(format!("X-Huge-{i}: {value}\r\n").as_bytes());
    }
    head.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
    answering_is_502(head, "/huge-head").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_101_to_a_plain_get_is_502() {
    let answer =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    answering_is_502(answer.to_vec(), "/not-an-upgrade").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_mid_body_cuts_the_client_response_off() {
    let (up, _) = raw_upstream(|mut s| async move {
        let Some(head) = read_head(&mut s).await else {
            return;
        };
        let chunked = head.starts_with(b"GET /chunked");
        let answer: Vec<u8> = if chunked {
            let mut a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n".to_vec();
            a.extend_from_slice(&[b'c'; 100]);
            a.extend_from_slice(b"\r\n");
            a
        } else {
            let mut a = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
            a.extend_from_slice(&[b'l'; 100]);
            a
        };
        let _ = s.write_all(&answer).await;
        // Closed here, 900 bytes (or the rest of the chunks) short.
    })
    .await;
    let mut b = bench("", &[up], "").await;

    // On the wire: the promised length, 100 bytes of it, then the connection ends.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /length HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(
        closed,
        "the client connection stayed open after the cut-off"
    );
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no response head")
        + 4;
    let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 1000"), "{head}");
    assert_eq!(bytes.len() - split, 100, "body bytes before the cut-off");

    // Through an HTTP client: an error, never a complete body.
    for path in ["/length", "/chunked"] {
        let resp = client()
            .request(Request::get(b.url(path)).body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(3), resp.into_body().collect())
            .await
            .expect("body neither finished nor failed");
        assert!(
            body.is_err(),
            "{path}: a cut-off body looked complete ({} bytes)",
            body.map(|b| b.to_bytes().len()).unwrap_or(0)
        );
    }
    b.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stops_is_cut_off_after_response_body_idle_timeout() {
    let (up, _) = raw_upstream(|mut s| async move {
        if read_head(&mut s).await.is_none() {
            return;
        }
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        // One byte every 200 ms for 2 s, then nothing, the connection left open.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(b"t").await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let mut b = bench("response_body_idle_timeout = \"500ms\"", &[up], "").await;
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET /trickle HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut last_byte = Duration::ZERO;
    let mut tmp = [0u8; 4096];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await {
            Err(_) => panic!("response neither moving nor cut off after 5 s"),
            Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
            Ok(Ok(n)) => {
                got.extend_from_slice(&tmp[..n]);
                last_byte = start.elapsed();
            }
        }
    };
    let split = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no response head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let body = got.len() - split;
    // Served all along while it trickled faster than the timeout…
    assert_eq!(body, 10, "body bytes received");
    assert!(last_byte >= Duration::from_millis(1800), "{last_byte:?}");
    // …and cut off once it stopped.
    let gap = ended - last_byte;
    assert!(
        gap >= Duration::from_millis(400),
        "cut off {gap:?} after the last byte"
    );
    assert!(
        gap < Duration::from_millis(1500),
        "cut off {gap:?} after the last byte"
    );
    b.steady_ok().await;
}

/// An upload to a deaf upstream.
struct DeafUpload {
    bench: Bench,
    /// The client's read half.
    rd: tokio::net::tcp::OwnedReadHalf,
    /// The client's writer, still blocked writing the body.
    writer: tokio::task::JoinHandle<()>,
    /// The status of the answer, and when it came.
    status: u16,
    took: Duration,
    /// Set to make the upstream start reading again (to see whether the proxy is still
    /// connected to it).
    listen_again: Arc<AtomicBool>,
    /// Whether the upstream, once reading again, found its connection closed.
    upstream_closed: Arc<AtomicBool>,
}

/// An upload to an upstream that reads the request head and never the body (until told
/// to).
async fn upload_to_a_deaf_upstream() -> DeafUpload {
    let listen_again = Arc::new(AtomicBool::new(false));
    let upstream_closed = Arc::new(AtomicBool::new(false));
    let (l2, c2) = (Arc::clone(&listen_again), Arc::clone(&upstream_closed));
    let (up, _) = raw_upstream(move |mut s| {
        let (listen_again, closed) = (Arc::clone(&l2), Arc::clone(&c2));
        async move {
            let _ = read_head(&mut s).await;
            let deaf_until = Instant::now() + Duration::from_secs(30);
            while !listen_again.load(Ordering::SeqCst) && Instant::now() < deaf_until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut sink = vec![0u8; 64 * 1024];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            closed.store(true, Ordering::SeqCst);
        }
    })
    .await;
    let b = bench("request_timeout = \"1s\"", &[up], "").await;
    let s = TcpStream::connect(b.addr()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Loopback socket buffers here take about 10 MiB between client, proxy and upstream
    // before anything stalls; 32 MiB makes sure the body is still being sent.
    let total = 32 * MIB as usize;
    let start = Instant::now();
    let written = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&written);
    let writer = tokio::spawn(async move {
        let head = format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {total}\r\n\r\n");
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'u'; 64 * 1024];
        while w.load(Ordering::SeqCst) < total {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            w.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    });
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut tmp))
            .await
            .expect("no answer within 10 s: the upload hangs")
            .unwrap_or(0);
        assert!(n > 0, "connection closed without an answer");
        got.extend_from_slice(&tmp[..n]);
    }
    let took = start.elapsed();
    let status = statuses(&got).first().copied().unwrap_or(0);
    let sent = written.load(Ordering::SeqCst);
    assert!(sent < total, "the whole upload was taken before the answer");
    DeafUpload {
        bench: b,
        rd,
        writer,
        status,
        took,
        listen_again,
        upstream_closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_reads_the_upload_is_504_not_a_hang() {
    let mut u = upload_to_a_deaf_upstream().await;
    assert_eq!(u.status, 504);
    assert!(u.took < Duration::from_secs(5), "504 after {:?}", u.took);
    // The client gives up.
    u.writer.abort();
    drop(u.rd);
    u.bench.steady_ok().await;
}

/// After answering 504 to an upload it could not finish, the proxy closes the client's
/// connection (it cannot be reused with the rest of the body unread) and lets go of the
/// upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_504_for_a_stalled_upload_the_connections_are_released() {
    let mut u = upload_to_a_deaf_upstream().await;
    assert_eq!(u.status, 504);
    // The client stays, still blocked writing its body: the proxy must close.
    let mut tmp = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match u.rd.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "client connection still open 3 s after the 504"
    );
    // The upstream, reading again, finds the proxy gone rather than the rest of a body.
    u.listen_again.store(true, Ordering::SeqCst);
    until_set(
        Duration::from_secs(3),
        "the upstream connection closed by the proxy",
        &u.upstream_closed,
    )
    .await;
    u.writer.abort();
    u.bench.steady_ok().await;
}

// ---------------------------------------------------------------------------------------
// WebSockets at shutdown

/// The next message that is not a ping or pong, within 5 s.
async fn next_message<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no message within 5 s")
            .expect("the WebSocket ended without a close frame")
            .expect("WebSocket error");
        if !msg.is_ping() && !msg.is_pong() {
            return msg;
        }
    }
}

fn expect_going_away(msg: Message) {
    match msg {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away, "{frame:?}"),
        other => panic!("expected a close frame 1001, got {other:?}"),
    }
}

/// Shuts the proxy down on its own task; returns whether it drained and how long it took.
fn shutdown_in_background(p: TestProxy) -> tokio::task::JoinHandle<(bool, Duration)> {
    tokio::spawn(async move {
        let start = Instant::now();
        let drained = p.shutdown().await;
        (drained, start.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_websocket_clients_going_away() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("shutdown_timeout = \"10s\"", &[app.addr], "").await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", b.addr()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    match next_message(&mut ws).await {
        Message::Text(t) => assert_eq!(t.as_str(), "app: hello"),
        other => panic!("{other:?}"),
    }
    // The well-behaved client stops before shutdown, which ends its service too.
    b.steady_ok().await;
    let Bench { proxy, .. } = b;
    let shutdown = shutdown_in_background(proxy);
    expect_going_away(next_message(&mut ws).await);
    // The client answers the close; the connection then ends.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let (drained, took) = shutdown.await.unwrap();
    assert!(drained, "shutdown did not drain");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_a_big_websocket_message_before_going_away() {
    let app = TestUpstream::start("app").await;
    let mut b = bench("shutdown_timeout = \"10s\"", &[app.addr], "").await;
    // A small receive window, so that the echo of 1 MiB is still on its way through the
    // proxy when shutdown begins.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(b.addr()).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/ws", b.addr()), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let big: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    b.steady_ok().await;
    // Not reading: let the echo get under way, then shut down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Bench { proxy, .. } = b;
    let shutdown = shutdown_in_background(proxy);
    tokio::time::sleep(Duration::from_millis(100)).await;
    match next_message(&mut ws).await {
        Message::Binary(got) => {
            assert_eq!(got.len(), big.len(), "echo length");
            assert!(got[..] == big[..], "the echo arrived corrupted");
        }
        other => panic!("expected the 1 MiB echo first, got {other:?}"),
    }
    expect_going_away(next_message(&mut ws).await);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let (drained, took) = shutdown.await.unwrap();
    assert!(drained, "shutdown did not drain");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}
