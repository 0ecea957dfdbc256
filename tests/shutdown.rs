//! Graceful shutdown (CONTRACT §1 signals, §2 `shutdown_timeout`): stop accepting, let
//! in-flight requests finish within the limit, never wait for idle keep-alive connections,
//! and end WebSockets with a close frame 1001 (going away) once a message under way is
//! through.
mod common;

use std::time::Duration;

use common::steady::*;
use common::usage::MIB;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

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
