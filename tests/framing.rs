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

/// An upstream that reads one chunked request and answers `chunks=N bytes=M`: how the body
/// was framed on its way from the proxy. Each chunk's arrival is also sent to `arrivals`.
async fn chunk_counter(
    arrivals: tokio::sync::mpsc::UnboundedSender<usize>,
) -> std::net::SocketAddr {
    let (addr, _) = raw_upstream(move |mut s: TcpStream| {
        let arrivals = arrivals.clone();
        async move {
            use tokio::io::AsyncReadExt;
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            let at = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut buf = head[at..].to_vec();
            let (mut chunks, mut bytes) = (0usize, 0usize);
            let mut tmp = [0u8; 64 * 1024];
            loop {
                // One chunk: size line, data, CRLF.
                let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    continue;
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&buf[..eol])
                        .unwrap()
                        .split(';')
                        .next()
                        .unwrap(),
                    16,
                )
                .unwrap();
                while buf.len() < eol + 2 + size + 2 {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                buf.drain(..eol + 2 + size + 2);
                if size == 0 {
                    break;
                }
                chunks += 1;
                bytes += size;
                let _ = arrivals.send(size);
            }
            let body = format!("chunks={chunks} bytes={bytes}");
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_chunks_are_gathered_before_they_go_upstream() {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let up = chunk_counter(tx).await;
    let p = proxy_to(up, "").await;
    const N: usize = 64 * 1024;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut req =
        b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    req.extend(b"1\r\nx\r\n".repeat(N));
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let (bytes, _) = read_to_close(&mut s, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let (chunks, total) = body
        .strip_prefix("chunks=")
        .and_then(|r| r.split_once(" bytes="))
        .map(|(c, b)| (c.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("{text:?}"));
    println!("{N} one-byte chunks from the client reached the upstream as {chunks} chunks");
    assert_eq!(total, N);
    assert!(
        chunks * 16 <= N,
        "{chunks} chunks upstream for {N} from the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_is_forwarded_as_it_comes() {
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let up = chunk_counter(tx).await;
    let p = proxy_to(up, "").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    // Each byte is with the upstream well before the client sends the next one.
    for _ in 0..5 {
        s.write_all(b"1\r\nx\r\n").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), arrivals.recv())
            .await
            .expect("a small chunk held back");
        assert_eq!(got, Some(1));
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let (bytes, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&bytes).ends_with("chunks=5 bytes=5"));
}
