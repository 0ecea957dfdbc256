//! Graceful shutdown (CONTRACT §1 signals, §2 `shutdown_timeout`): stop accepting, let
//! in-flight requests finish within the limit, never wait for idle keep-alive connections.
mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Starts a GET to `url` on its own task, and waits until `upstream` has received it.
async fn in_flight(url: String, upstream: &TestUpstream) -> tokio::task::JoinHandle<Reply> {
    let before = upstream.hits();
    let task = tokio::spawn(async move { get(&url).await });
    eventually(
        Duration::from_secs(5),
        "the upstream received the request",
        || {
            let n = upstream.hits();
            async move { n > before }
        },
    )
    .await;
    task
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let addr = p.addr;
    a.set_delay(Duration::from_millis(800));
    let request = in_flight(p.url("/slow"), &a).await;

    let started = Instant::now();
    let drained = tokio::time::timeout(Duration::from_secs(10), p.shutdown())
        .await
        .expect("shutdown hung");
    assert!(drained, "shutdown reported connections left over");
    let reply = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .expect("the in-flight request never finished")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.upstream(), "a");
    // It waited for the request, and no longer than it needed.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");

    let refused = TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "the proxy still accepts connections after shutdown"
    );
}

#[tokio::test]
async fn shutdown_timeout_bounds_the_drain() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("shutdown_timeout = \"300ms\"", &[&a])).await;
    a.set_delay(Duration::from_secs(5));
    let request = in_flight(p.url("/stuck"), &a).await;

    let started = Instant::now();
    let drained = tokio::time::timeout(Duration::from_secs(4), p.shutdown())
        .await
        .expect("shutdown ignored shutdown_timeout");
    let took = started.elapsed();
    assert!(!drained, "a 5 s request cannot drain in 300 ms");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "shutdown took {took:?} with shutdown_timeout = 300ms"
    );
    request.abort();
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let addr = p.addr;

    // A connection that never sends anything. Opened first: connections are accepted in
    // order, so once the later ones have been answered, this one has been accepted too.
    let mut silent = TcpStream::connect(addr).await.unwrap();

    // A pooled keep-alive connection, idle after its request.
    let http = client();
    let r = send(
        &http,
        http::Request::get(p.url("/"))
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);

    // A raw keep-alive connection, idle after a complete exchange.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("no response on the raw connection")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let started = Instant::now();
    let drained = tokio::time::timeout(Duration::from_secs(5), p.shutdown())
        .await
        .expect("idle connections held up shutdown");
    assert!(drained);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");

    // Both idle connections were closed by the proxy.
    for (what, s) in [("keep-alive", &mut idle), ("silent", &mut silent)] {
        let end = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {what} connection was left open"));
        assert!(
            matches!(end, Ok(0) | Err(_)),
            "{what}: unexpected bytes {end:?}"
        );
    }
    // The listener closes on the accept task, which may run just after the drain ended.
    eventually(
        Duration::from_secs(1),
        "the listener is closed",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
}
