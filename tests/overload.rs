//! More than the proxy lets through (CONTRACT §2, §7 `max_connections`,
//! `max_connections_per_server`, `max_pending`): thousands of idle connections closed on
//! time, a flood of connections that close at once, connections past `max_connections`
//! closed without an answer, and circuit breaking that answers 503 at once. A well-behaved
//! client ([`Steady`]) keeps getting 200s beside every case.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::raw::*;
use common::steady::*;
use common::usage::{HEAVY, fd_limit, open_fds};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
