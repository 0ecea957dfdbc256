//! Request framing limits (HTTP1-RULES "limits that keep it cheap"): bytes past a request's
//! end are the next head and are held to `header_read_timeout`, and a chunked body whose
//! framing costs far more than its payload is refused with 400, while 1-byte chunks pass.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A proxy whose head limit is short and whose idle limit is long.
async fn setup() -> (TestUpstream, TestProxy) {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "header_read_timeout = \"400ms\"\nidle_timeout = \"30s\"",
        &[&up],
    ))
    .await;
    (up, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_begun_after_a_request_is_held_to_header_read_timeout() {
    let (_up, p) = setup().await;
    for (what, bytes) in [
        (
            "after a Content-Length body",
            &b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhelloGET /b HT"[..],
        ),
        (
            "after a request without body",
            &b"GET /a HTTP/1.1\r\nHost: app\r\n\r\nGET /b HTTP/1.1\r\nHo"[..],
        ),
    ] {
        let mut c = RawConn::connect(p.addr).await;
        c.send(bytes).await;
        assert_eq!(c.response().await.status, 200, "{what}");
        let closed = c.closed_within(Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "{what}: a half-sent head is held to idle_timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_after_a_body_waits_for_idle_timeout() {
    let (_up, p) = setup().await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_eq!(c.response().await.status, 200);
    // Nothing more was sent: idle, not a head in progress.
    assert!(
        c.closed_within(Duration::from_millis(1500)).await.is_none(),
        "an idle connection was closed at header_read_timeout"
    );
    c.send(b"GET /again HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
}

/// Sends a chunked upload of `chunks` chunks of one byte, each framed by `size` (the
/// chunk-size line without its CRLF), and returns the answer's status.
async fn upload(p: &TestProxy, size: &str, chunks: usize) -> (u16, Option<serde_json::Value>) {
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let one = format!("{size}\r\nx\r\n");
    let batch = one.repeat(4096);
    let mut left = chunks;
    while left > 0 {
        let n = left.min(4096);
        if s.write_all(&batch.as_bytes()[..n * one.len()])
            .await
            .is_err()
        {
            break;
        }
        left -= n;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let (bytes, _) = read_to_close(&mut s, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = raw_status(&text).unwrap_or(0);
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok());
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_chunks_pass_and_padded_chunk_sizes_are_400() {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&up])).await;
    // 256 KiB in 1-byte chunks: five framing bytes per byte, as any client may send.
    let (status, json) = upload(&p, "1", 256 * 1024).await;
    assert_eq!(status, 200);
    assert_eq!(json.unwrap()["body_len"], 256 * 1024);
    // The same bytes with chunk sizes padded to 30 digits: 35 framing bytes per byte.
    let padded = format!("{:0>30}", "1");
    let (status, _) = upload(&p, &padded, 256 * 1024).await;
    assert_eq!(status, 400);
    // Extensions on every chunk cost the same way.
    let (status, _) = upload(&p, "1;a=bbbbbbbbbbbbbbbbbbbbbbbbbb", 256 * 1024).await;
    assert_eq!(status, 400);
    assert_eq!(get(&p.url("/after")).await.status, 200);
}
