//! Misbehaving upstreams (CONTRACT §3 error codes, §7 `response_body_idle_timeout`): one
//! that refuses connections, never answers, answers garbage, a huge head or a 101 nobody
//! asked for, closes mid-body, stops sending its body, or never reads an upload. The client
//! gets 502 or 504, or a response cut off, never a hang, while a well-behaved client
//! ([`Steady`]) keeps getting 200s beside it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::raw::*;
use common::steady::*;
use common::usage::MIB;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// An upstream whose `Connection` lists `Content-Length` and `Date` (so both are hop-by-hop):
/// the client still gets a framed body and a date, and its keep-alive connection carries the
/// next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_the_upstream_names_in_connection_is_reframed() {
    let (up, _) = raw_upstream(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            let answer = b"HTTP/1.1 200 OK\r\nConnection: content-length, Date\r\n\
                Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Length: 5\r\n\r\nhello";
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await;
    let mut b = bench("", &[up], "").await;
    let mut c = RawConn::connect(b.addr()).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("content-length"), Some("5"), "{:?}", r.headers);
        let date = r.header("date").expect("a date");
        assert!(!date.contains("1970"), "{date}");
    }
    b.steady_ok().await;
}
