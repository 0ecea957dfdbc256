//! Fault attribution (SECURITY.md): every way a client can break its own request (malformed
//! chunked framing, an abandoned or reset upload, an `Expect: 100-continue` it walks away
//! from, a stalled or oversized body, a reset HTTP/2 stream) gets a 4xx where an answer is
//! still possible, is counted as the client's, and leaves every server healthy, while a
//! well-behaved client is served throughout. With `max_fails = 1` a single misattributed
//! request would take a server out.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::h2raw::*;
use common::raw::*;
use common::steady::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Two servers that one misattributed failure would take out for a minute, a short
/// `body_read_timeout` and a body limit.
async fn setup() -> (Bench, TestUpstream, TestUpstream) {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let bench = bench(
        "body_read_timeout = \"400ms\"\nmax_body_bytes = \"64KiB\"",
        &[a.addr, b.addr],
        "[upstreams.app.passive]\nmax_fails = 1\nfail_timeout = \"60s\"",
    )
    .await;
    (bench, a, b)
}

fn hits(a: &TestUpstream, b: &TestUpstream) -> usize {
    a.hits() + b.hits()
}

/// Sends `head` and `body` on a new connection, then waits until one of the servers has
/// the request (the proxy is forwarding it when the client misbehaves next).
async fn forwarding(
    proxy: SocketAddr,
    a: &TestUpstream,
    b: &TestUpstream,
    head: &str,
    body: &[u8],
) -> TcpStream {
    let before = hits(a, b);
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    reached(a, b, before).await;
    s
}

/// Waits until the servers have seen more requests than `before` (a request reached one).
async fn reached(a: &TestUpstream, b: &TestUpstream, before: usize) {
    eventually(
        Duration::from_secs(5),
        "the request reaches a server",
        || {
            let n = hits(a, b);
            async move { n > before }
        },
    )
    .await;
}

/// Every server of `app` is healthy in `/status`.
async fn all_healthy(bench: &Bench) {
    let status = admin::status(&bench.proxy).await;
    let servers = admin::servers(&status, "app");
    assert_eq!(servers.len(), 2);
    for s in servers {
        assert_eq!(
            s["healthy"], true,
            "a client's fault took a server out: {s}"
        );
    }
}

/// The client's answer: the status, whether it asks to close, and whether the proxy then
/// closed the connection.
async fn answer(s: &mut TcpStream) -> (u16, bool, bool) {
    let (bytes, closed) = read_to_close(s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    let status = statuses(&bytes).last().copied().unwrap_or(0);
    (status, text.contains("\r\nconnection: close\r\n"), closed)
}

const UPLOAD: &str = "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10000\r\n\r\n";
const CHUNKED: &str = "POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_400_and_no_servers_fault() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let mut s = forwarding(bench.addr(), &a, &b, CHUNKED, b"5\r\nhello\r\n").await;
        s.write_all(b"zz\r\nhello\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(answer(&mut s).await, (400, true, true));
    }
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_extensions_over_the_limit_are_400_and_no_servers_fault() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let mut s = forwarding(bench.addr(), &a, &b, CHUNKED, b"5\r\nhello\r\n").await;
        let ext = format!("1;{}\r\nx\r\n", "e".repeat(20_000));
        let _ = s.write_all(ext.as_bytes()).await;
        let (status, close, closed) = answer(&mut s).await;
        assert_eq!((status, close, closed), (400, true, true));
    }
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_is_the_clients_and_counted_499() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let s = forwarding(bench.addr(), &a, &b, UPLOAD, &[b'x'; 100]).await;
        drop(s);
    }
    for _ in 0..4 {
        let mut s = forwarding(bench.addr(), &a, &b, UPLOAD, &[b'x'; 100]).await;
        // Half-closed: the client says it is done, 9,900 bytes short.
        s.shutdown().await.unwrap();
        let (status, _, closed) = answer(&mut s).await;
        assert!(closed, "the proxy keeps a half-closed short upload open");
        assert!(status == 0 || status == 499, "answered {status}");
    }
    let bench_ref = &bench;
    eventually(
        Duration::from_secs(5),
        "eight requests counted 499",
        || async move {
            bench_ref
                .metric_where("fairway_requests_total", &[("code", "499")])
                .await
                >= 8.0
        },
    )
    .await;
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_reset_mid_body_is_the_clients() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let s = forwarding(bench.addr(), &a, &b, UPLOAD, &[b'x'; 100]).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    let bench_ref = &bench;
    eventually(
        Duration::from_secs(5),
        "four requests counted 499",
        || async move {
            bench_ref
                .metric_where("fairway_requests_total", &[("code", "499")])
                .await
                >= 4.0
        },
    )
    .await;
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_100_continue_and_goes_away_is_the_clients() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let head = "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10000\r\n\
                    Expect: 100-continue\r\n\r\n";
        let mut s = forwarding(bench.addr(), &a, &b, head, b"").await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no 100 Continue")
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        drop(s);
    }
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_408_and_no_servers_fault() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let mut s = forwarding(bench.addr(), &a, &b, UPLOAD, &[b'x'; 100]).await;
        assert_eq!(answer(&mut s).await, (408, true, true));
    }
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_max_body_bytes_is_413_and_no_servers_fault() {
    let (mut bench, a, b) = setup().await;
    for _ in 0..4 {
        let mut s = forwarding(bench.addr(), &a, &b, CHUNKED, b"5\r\nhello\r\n").await;
        let chunk = format!("8000\r\n{}\r\n", "y".repeat(0x8000));
        for _ in 0..3 {
            if s.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        let (status, close, _) = answer(&mut s).await;
        assert_eq!((status, close), (413, true));
    }
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_mid_upload_is_the_clients() {
    let (mut bench, a, b) = setup().await;
    let tcp = TcpStream::connect(bench.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..12 {
        let before = hits(&a, &b);
        let mut send = send.clone().ready().await.unwrap();
        let req = http::Request::post(format!("http://{}/upload", bench.addr()))
            .body(())
            .unwrap();
        let (_resp, mut body) = send.send_request(req, false).unwrap();
        body.send_data(Bytes::from(vec![b'x'; 1000]), false)
            .unwrap();
        reached(&a, &b, before).await;
        body.send_reset(h2::Reason::CANCEL);
    }
    // The connection itself keeps serving.
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/after", bench.addr()))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    all_healthy(&bench).await;
    bench.steady_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_protocol_violation_mid_upload_is_the_clients() {
    let (mut bench, a, b) = setup().await;
    let authority = bench.addr().to_string();
    for _ in 0..4 {
        let before = hits(&a, &b);
        let mut s = TcpStream::connect(bench.addr()).await.unwrap();
        s.write_all(H2_PREFACE).await.unwrap();
        s.write_all(&h2_frame(FRAME_SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        let head = hpack_post(&authority, "/upload");
        s.write_all(&h2_frame(FRAME_HEADERS, END_HEADERS, 1, &head))
            .await
            .unwrap();
        s.write_all(&h2_frame(FRAME_DATA, 0, 1, &[b'x'; 1000]))
            .await
            .unwrap();
        reached(&a, &b, before).await;
        // A DATA frame past the 16 KiB frame size the client may send: a connection error
        // (RFC 9113 §4.2), the client's own, like a flow-control violation.
        let _ = s
            .write_all(&h2_frame(FRAME_DATA, 0, 1, &vec![b'x'; 20_000]))
            .await;
        let (_, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "the connection survived a protocol error");
    }
    all_healthy(&bench).await;
    bench.steady_ok().await;
}
