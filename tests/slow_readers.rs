//! Slow readers cannot hold upstream capacity (CONTRACT §7 `send_timeout`): a client that
//! stops reading its response, over HTTP/1.1 or on one HTTP/2 stream, is cut off after
//! `send_timeout`, which releases its upstream connection and its
//! `max_connections_per_server` slot; the rest of an HTTP/2 connection goes on.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

/// One server that takes one request at a time, behind a proxy with a short send_timeout.
async fn setup() -> (TestUpstream, TestProxy) {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nsend_timeout = \"400ms\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"{}\"]\nmax_connections_per_server = 1\n",
        up.addr
    ))
    .await;
    (up, p)
}

async fn active_requests(p: &TestProxy) -> u64 {
    admin::status(p).await["upstreams"]["app"]["servers"][0]["active_requests"]
        .as_u64()
        .unwrap()
}

/// Waits until the server's slot is held by the unread download.
async fn until_held(p: &TestProxy) {
    eventually(
        Duration::from_secs(5),
        "the download holds the slot",
        || async { active_requests(p).await == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_is_cut_off_and_its_slot_released() {
    let (_up, p) = setup().await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut s = socket.connect(p.addr).await.unwrap();
    s.write_all(b"GET /bytes/200000000 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    until_held(&p).await;
    // While it is held, the one slot is taken: circuit breaking answers 503.
    assert_eq!(get(&p.url("/other")).await.status, 503);
    let start = std::time::Instant::now();
    eventually(Duration::from_secs(5), "the slot is released", || async {
        active_requests(&p).await == 0
    })
    .await;
    let held = start.elapsed();
    assert_eq!(get(&p.url("/other")).await.status, 200);
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "the client that reads nothing is still connected");
    println!("unread HTTP/1.1 download cut off {held:?} after the slot was seen held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_http2_stream_is_cut_off_alone() {
    let (_up, p) = setup().await;
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    // A stream window of 1 KiB that is never given back: the download stalls at once.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/bytes/50000000", p.addr))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let _unread = resp.into_body();
    until_held(&p).await;
    eventually(
        Duration::from_secs(5),
        "the stream's slot is released",
        || async { active_requests(&p).await == 0 },
    )
    .await;
    // The same connection still serves.
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/after", p.addr))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    assert!(n > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
    let (_up, p) = setup().await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut s = socket.connect(p.addr).await.unwrap();
    s.write_all(b"GET /bytes/1000000 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // 1 MB read in 64 KiB steps every 150 ms: never 400 ms without a byte taken.
    use tokio::io::AsyncReadExt;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(got > 1_000_000, "cut off after {got} bytes");
}
