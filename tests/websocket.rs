//! WebSockets through the proxy (CONTRACT §3: `Upgrade` requests are tunnelled both ways
//! after the upstream's `101`), and `tunnel_idle_timeout` (CONTRACT §2).
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The next data message (pings and pongs skipped), within 5 s.
async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no message within 5 s")
            .expect("stream ended")
            .expect("websocket error");
        if msg.is_text() || msg.is_binary() || msg.is_close() {
            return msg;
        }
    }
}

async fn expect_text(ws: &mut Ws, want: &str) {
    match next_data(ws).await {
        Message::Text(t) => assert_eq!(t.as_str(), want),
        other => panic!("expected text {want:?}, got {other:?}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Whether the stream ends (close frame, EOF or a connection error) within `limit`.
async fn ends_within(ws: &mut Ws, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn echo_text_and_binary_through_the_proxy() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut ws = open_websocket(&p).await;

    ws.send(Message::text("hi")).await.unwrap();
    expect_text(&mut ws, "a: hi").await;

    let big = pattern(256 * 1024, 0x5a);
    ws.send(Message::binary(big.clone())).await.unwrap();
    match next_data(&mut ws).await {
        Message::Binary(b) => assert!(b[..] == big[..], "256 KiB came back altered"),
        other => panic!("expected binary, got {other:?}"),
    }

    // Several messages in flight in both directions before any answer is read.
    for i in 0..20 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        ws.send(Message::binary(pattern(1000 + i, i as u8)))
            .await
            .unwrap();
    }
    for i in 0..20 {
        expect_text(&mut ws, &format!("a: m{i}")).await;
        match next_data(&mut ws).await {
            Message::Binary(b) => assert!(b[..] == pattern(1000 + i, i as u8)[..]),
            other => panic!("expected binary {i}, got {other:?}"),
        }
    }

    ws.close(None).await.unwrap();
    // The close reaches the upstream, whose echo answers it; the answer comes back through
    // the proxy and the stream then ends cleanly (no reset without a closing handshake).
    match next_data(&mut ws).await {
        Message::Close(_) => {}
        other => panic!("expected the upstream's close frame, got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the tunnel stayed open after the closing handshake")
    {
        None | Some(Err(WsError::ConnectionClosed)) => {}
        other => panic!("unclean end after the closing handshake: {other:?}"),
    }
    assert_eq!(a.hits(), 1, "one upgrade request reached the upstream");
}

/// A WebSocket echo server that completes the closing handshake (tungstenite answers the
/// client's close frame while the server keeps reading). Returns its address.
async fn start_clean_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn closing_handshake_passes_both_ways() {
    let echo = start_clean_echo().await;
    let cfg =
        format!("[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.app]\nservers = [\"{echo}\"]\n");
    let p = TestProxy::start(&cfg).await;
    let mut ws = open_websocket(&p).await;
    ws.send(Message::text("ping")).await.unwrap();
    expect_text(&mut ws, "ping").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    // The server's close frame comes back through the proxy, then the stream ends cleanly.
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the server's close frame, got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the stream did not end after the closing handshake")
    {
        None | Some(Err(WsError::ConnectionClosed)) => {}
        other => panic!("unclean end after the closing handshake: {other:?}"),
    }
}

#[tokio::test]
async fn upgrade_headers_are_forwarded_on_an_upgrade_request() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    // The echo answers 200 (not 101) on a non-ws path: the JSON shows what it received.
    let req = Request::get(p.url("/chat"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.seen_header("upgrade").unwrap(), ["websocket"]);
    let conn = r.seen_header("connection").unwrap();
    assert_eq!(conn.len(), 1, "{conn:?}");
    assert!(conn[0].eq_ignore_ascii_case("upgrade"), "{conn:?}");
    assert_eq!(
        r.seen_header("sec-websocket-key").unwrap(),
        ["dGhlIHNhbXBsZSBub25jZQ=="]
    );

    // Without `Connection: upgrade` the Upgrade header is hop-by-hop and dropped.
    let req = Request::get(p.url("/chat"))
        .header("upgrade", "websocket")
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("upgrade"), None);
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_tunnel_idle_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("tunnel_idle_timeout = \"500ms\"", &[&a])).await;
    let mut ws = open_websocket(&p).await;
    ws.send(Message::text("hi")).await.unwrap();
    expect_text(&mut ws, "a: hi").await;
    let quiet_since = tokio::time::Instant::now();
    assert!(
        ends_within(&mut ws, Duration::from_secs(3)).await,
        "an idle tunnel was still open after 3 s"
    );
    // It is the idle timer that closed it, not something immediate.
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(400),
        "closed after {:?}",
        quiet_since.elapsed()
    );
}

#[tokio::test]
async fn a_busy_tunnel_outlives_tunnel_idle_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("tunnel_idle_timeout = \"500ms\"", &[&a])).await;
    let mut ws = open_websocket(&p).await;
    // Traffic every 100 ms for 1.5 s: three times the idle limit in total, never idle.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..15 {
        tick.tick().await;
        ws.send(Message::text(format!("t{i}"))).await.unwrap();
        expect_text(&mut ws, &format!("a: t{i}")).await;
    }
}

#[tokio::test]
async fn two_websockets_at_once() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&proxy_config("", &[&a, &b])).await;
    let mut one = open_websocket(&p).await;
    let mut two = open_websocket(&p).await;
    // Round robin: the first goes to a, the second to b; both stay open side by side.
    for i in 0..5 {
        two.send(Message::text(format!("x{i}"))).await.unwrap();
        one.send(Message::text(format!("y{i}"))).await.unwrap();
    }
    for i in 0..5 {
        expect_text(&mut one, &format!("a: y{i}")).await;
        expect_text(&mut two, &format!("b: x{i}")).await;
    }
    let blob = pattern(64 * 1024, 7);
    one.send(Message::binary(blob.clone())).await.unwrap();
    two.send(Message::binary(blob.clone())).await.unwrap();
    for ws in [&mut one, &mut two] {
        match next_data(ws).await {
            Message::Binary(b) => assert!(b[..] == blob[..]),
            other => panic!("expected binary, got {other:?}"),
        }
    }
    one.close(None).await.unwrap();
    // Closing one leaves the other working.
    two.send(Message::text("still here")).await.unwrap();
    expect_text(&mut two, "b: still here").await;
}

/// An upstream that switches to `proto` whatever it is asked (as a careless or hostile
/// application might), then echoes bytes; it records the `Upgrade` lines it received.
async fn always_switching_upstream(
    proto: &'static str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use common::raw::{raw_upstream, read_head};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = std::sync::Arc::clone(&seen);
    let (addr, _) = raw_upstream(move |mut s: TcpStream| {
        let seen = std::sync::Arc::clone(&s2);
        async move {
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            let upgrades: Vec<String> = String::from_utf8_lossy(&head)
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("upgrade:"))
                .map(|l| l.to_owned())
                .collect();
            seen.lock().unwrap().push(upgrades.join(" | "));
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {proto}\r\nConnection: Upgrade\r\n\r\n"
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// Sends `head` and returns the status the proxy answered with.
async fn upgrade_status(p: &TestProxy, head: &str) -> u16 {
    let answer = raw(p.addr, head.as_bytes(), Duration::from_millis(500)).await;
    raw_status(&answer).unwrap_or_else(|| panic!("no answer: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_single_websocket_upgrade_opens_a_tunnel() {
    let (up, seen) = always_switching_upstream("websocket").await;
    let p = proxy_to(up, "retries = 0").await;
    for (offer, what) in [
        (
            "Upgrade: websocket, h2c\r\nConnection: Upgrade",
            "h2c listed beside websocket",
        ),
        (
            "Upgrade: h2c, websocket\r\nConnection: Upgrade",
            "h2c listed first",
        ),
        (
            "Upgrade: websocket\r\nUpgrade: h2c\r\nConnection: Upgrade",
            "two Upgrade lines",
        ),
        (
            "Upgrade: websocket\r\nUpgrade: websocket\r\nConnection: Upgrade",
            "the same protocol twice",
        ),
        (
            "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            "h2c",
        ),
    ] {
        let head = format!("GET /ws HTTP/1.1\r\nHost: app\r\n{offer}\r\n\r\n");
        // No tunnel: the offer is stripped, and a 101 the upstream sends anyway is refused.
        assert_eq!(upgrade_status(&p, &head).await, 502, "{what}");
        let last = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last, "", "{what}: the upstream was offered {last:?}");
    }
    let head = "GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n";
    assert_eq!(upgrade_status(&p, head).await, 101);
    assert_eq!(seen.lock().unwrap().last().unwrap(), "upgrade: WebSocket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_to_another_protocol_than_websocket_is_502() {
    let (up, _) = always_switching_upstream("h2c").await;
    let p = proxy_to(up, "retries = 0").await;
    let head = "GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    assert_eq!(upgrade_status(&p, head).await, 502);
}
