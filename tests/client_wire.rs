//! The client side of HTTP/1.1 on the wire (HTTP1-RULES "reading a request from a client"
//! and "writing the response to the client"), over real sockets against fairway's own
//! per-connection loop: pipelined requests answered in order with their bodies (by length
//! and chunked) intact, a head trickling in a byte at a time, HTTP/1.0 clients (closing,
//! keep-alive, and bodies of unknown length sent unframed), HEAD answered without a body,
//! `Expect: 100-continue` (the interim answer before the body, an upstream's early answer
//! after it, and a final answer that comes instead of it), heads refused with 431 and 400
//! then closed, an early 413 the client reads while still uploading, a response the
//! upstream cuts short cut short for the client too, and h2c prior knowledge beside
//! HTTP/1.1 on one listener. The header and idle timeouts are in `limits.rs`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::h2raw::*;
use common::raw::*;
use common::*;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that answers every request with its body as it arrived, and its method and
/// target in `x-method` and `x-uri`.
async fn echo_upstream() -> SocketAddr {
    let (addr, _) = raw_upstream(|stream| async move {
        let svc = service_fn(|req: Request<Incoming>| async move {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut resp = Response::new(Full::new(body));
            resp.headers_mut()
                .insert("x-method", method.parse().unwrap());
            resp.headers_mut().insert("x-uri", uri.parse().unwrap());
            Ok::<_, Infallible>(resp)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
    .await;
    addr
}

/// An upstream that answers every request on a connection with `answer` (given the request
/// head), as long as the connection lasts.
async fn answering(answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) -> SocketAddr {
    let answer = Arc::new(answer);
    let (addr, _) = raw_upstream(move |mut s| {
        let answer = Arc::clone(&answer);
        async move {
            while let Some(head) = read_head(&mut s).await {
                if s.write_all(&answer(&head)).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    addr
}

/// A response read to the connection's close, split at the end of its head: the head as
/// text (lowercased) and the bytes after it.
fn split_at_body(bytes: &[u8]) -> (String, &[u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head: {:?}", String::from_utf8_lossy(bytes)))
        + 4;
    (
        String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase(),
        &bytes[end..],
    )
}

/// What the chunked upstream sends as its body, in two chunks.
const CHUNKED_PAYLOAD: &[u8] = b"hello, chunked world";

/// An upstream that answers every request with [`CHUNKED_PAYLOAD`] in the chunked coding.
async fn chunked_upstream() -> SocketAddr {
    answering(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
          7\r\nhello, \r\nd\r\nchunked world\r\n0\r\n\r\n"
            .to_vec()
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Reading requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_are_answered_in_order_with_their_bodies() {
    let p = proxy_to(echo_upstream().await, "").await;
    let mut c = RawConn::connect(p.addr).await;
    // A GET, a body by length (whose bytes read like a request), and a chunked body with an
    // extension, all in one write.
    let mut all = b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n".to_vec();
    all.extend_from_slice(
        b"POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 30\r\n\r\nGET /smuggled HTTP/1.1\r\nX: y\r\n",
    );
    all.extend_from_slice(
        b"POST /three HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nfirst\r\n1\r\n \r\nc\r\nsecond chunk\r\n0\r\n\r\n",
    );
    c.send(&all).await;
    let want: [(&str, &str, &[u8]); 3] = [
        ("GET", "/one", b""),
        ("POST", "/two", b"GET /smuggled HTTP/1.1\r\nX: y\r\n"),
        ("POST", "/three", b"first second chunk"),
    ];
    for (method, uri, body) in want {
        let r = c.response().await;
        assert_eq!(r.status, 200, "{uri}");
        assert_eq!(
            (r.header("x-method"), r.header("x-uri")),
            (Some(method), Some(uri)),
            "answered out of order"
        );
        assert_eq!(
            r.body,
            body,
            "{uri}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("connection"), None, "{uri}");
    }
    // The connection goes on, and nothing else was answered.
    assert!(c.buf.is_empty(), "{:?}", String::from_utf8_lossy(&c.buf));
    c.send(b"GET /four HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.header("x-uri"), Some("/four"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickling_in_one_byte_per_write_is_served() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.stream.set_nodelay(true).unwrap();
    // A head is parsed again only once it has doubled or may have ended: heads of 62 to 67
    // bytes put the parse at 64 bytes at each place in and around their final CRLF CRLF.
    // The first head of the connection and later ones alike.
    for total in 62..=67 {
        let path = format!("/trickle/{total}");
        let bare = format!("GET {path} HTTP/1.1\r\nHost: h\r\nX-Trickle: \r\n\r\n").len();
        let pad = "t".repeat(total - bare);
        let head = format!("GET {path} HTTP/1.1\r\nHost: h\r\nX-Trickle: {pad}\r\n\r\n");
        assert_eq!(head.len(), total);
        // A millisecond apart, so that the proxy reads each byte on its own: the spacing
        // is what is tested, there is nothing to wait for.
        for b in head.as_bytes() {
            c.stream.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let r = c.response().await;
        assert_eq!(r.status, 200, "{path}");
        let j = r.json();
        assert_eq!(j["uri"], path.as_str());
        assert_eq!(j["headers"]["x-trickle"][0], pad.as_str());
    }
    assert_eq!(a.hits(), 6);
}

// ---------------------------------------------------------------------------------------
// HTTP/1.0 clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_keep_alive_is_answered_then_closed() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /old HTTP/1.0\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/old");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        c.closed_within(Duration::from_secs(3)).await.is_some(),
        "an HTTP/1.0 connection without keep-alive stays open"
    );
    assert!(!c.reset, "reset instead of a clean close");
    assert!(c.buf.is_empty(), "{:?}", String::from_utf8_lossy(&c.buf));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_keep_alive_connection_serves_a_second_request() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    for path in ["/ka-1", "/ka-2"] {
        c.send(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json()["uri"], path);
        assert_eq!(r.header("connection"), Some("keep-alive"), "{path}");
        assert!(r.header("content-length").is_some(), "{path}");
    }
    assert_eq!(a.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upstream_body_reaches_an_http10_client_without_chunk_framing() {
    let p = proxy_to(chunked_upstream().await, "").await;
    // Even when the client asks for keep-alive: a body of unknown length goes to an
    // HTTP/1.0 client delimited by the close (or by a length), never in chunks.
    for keep_alive in ["", "Connection: keep-alive\r\n"] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(format!("GET /ten HTTP/1.0\r\n{keep_alive}\r\n").as_bytes())
            .await
            .unwrap();
        let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
        let (head, body) = split_at_body(&bytes);
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert!(
            !head.contains("transfer-encoding"),
            "{keep_alive:?}: {head}"
        );
        assert_eq!(
            body,
            CHUNKED_PAYLOAD,
            "{keep_alive:?}: {:?}",
            String::from_utf8_lossy(body)
        );
        if head.contains("\r\ncontent-length:") {
            assert!(
                head.contains(&format!(
                    "\r\ncontent-length: {}\r\n",
                    CHUNKED_PAYLOAD.len()
                )),
                "{head}"
            );
        } else {
            // Delimited by the close: the connection must say so, and close.
            assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
            assert!(
                closed,
                "{keep_alive:?}: the close-delimited body never ended"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upstream_body_reaches_an_http11_client_in_valid_chunks() {
    let p = proxy_to(chunked_upstream().await, "").await;
    let mut c = RawConn::connect(p.addr).await;
    for _ in 0..2 {
        c.send(b"GET /eleven HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.body, CHUNKED_PAYLOAD);
        // The last chunk ended the body exactly: nothing follows it.
        assert!(c.buf.is_empty(), "{:?}", String::from_utf8_lossy(&c.buf));
    }
}

// ---------------------------------------------------------------------------------------
// HEAD

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_answer_keeps_its_content_length_and_sends_no_body() {
    let up = answering(|head| {
        if head.starts_with(b"HEAD /length ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()
        } else if head.starts_with(b"HEAD /chunked ") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()
        }
    })
    .await;
    let p = proxy_to(up, "").await;
    let mut c = RawConn::connect(p.addr).await;
    for (path, length) in [("/length", Some("5")), ("/chunked", None)] {
        c.send(format!("HEAD {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .await;
        let status = c.line().await;
        assert!(status.starts_with("HTTP/1.1 200 "), "{path}: {status:?}");
        let mut fields = Vec::new();
        loop {
            let l = c.line().await.to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            fields.push(l);
        }
        let field = |name: &str| {
            fields
                .iter()
                .find_map(|f| f.strip_prefix(name)?.strip_prefix(": "))
        };
        // The upstream's length is the client's; none is made up where it gave none.
        assert_eq!(field("content-length"), length, "{path}: {fields:?}");
        // The next answer on the connection starts right after the head: no body bytes,
        // nor a last chunk, in between.
        c.send(b"GET /g HTTP/1.1\r\nHost: h\r\n\r\n").await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while c.buf.len() < 9 {
                assert!(c.fill().await > 0, "closed after the HEAD answer");
            }
        })
        .await
        .expect("no answer to the GET");
        assert!(
            c.buf.starts_with(b"HTTP/1.1 "),
            "{path}: bytes after the HEAD answer: {:?}",
            String::from_utf8_lossy(&c.buf)
        );
        let r = c.response().await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    }
}

// ---------------------------------------------------------------------------------------
// Expect: 100-continue

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_100_continue_gets_it_then_the_answer() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    for path in ["/expect-1", "/expect-2"] {
        c.send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        // Nothing is sent until the interim answer has come.
        let interim = c.response().await;
        assert_eq!(interim.status, 100, "{path}");
        assert!(c.buf.is_empty(), "{:?}", String::from_utf8_lossy(&c.buf));
        c.send(b"hello").await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json()["uri"], path);
        assert_eq!(r.json()["body_len"], 5);
        assert_eq!(r.header("connection"), None, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_early_answer_after_100_continue_reaches_the_client_before_its_body() {
    // The upstream refuses at once, without reading the body, and keeps its connection.
    let up =
        answering(|_| b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\ndenied".to_vec())
            .await;
    let p = proxy_to(up, "").await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"POST /guarded HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    // fairway answers the expectation itself as it starts forwarding the body (HTTP1-RULES:
    // "answer 100 yourself before reading the body"), before the upstream has the head.
    let interim = c.response().await;
    assert_eq!(interim.status, 100);
    // The final answer comes without the body having been sent.
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_slice()), (401, &b"denied"[..]));
    assert_eq!(r.header("connection"), None);
    // After a 100 the client owes its body: it is read and discarded, and the connection
    // serves the next request.
    c.send(b"0123456789GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_slice()), (401, &b"denied"[..]));
    assert!(c.buf.is_empty(), "{:?}", String::from_utf8_lossy(&c.buf));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_answer_instead_of_100_continue_closes_the_connection() {
    // Answers fairway gives before the body is wanted: the upstream cannot be reached, and
    // a declared body over max_body_bytes. No 100 goes out, and since the body then may
    // never come, the connection closes after the answer instead of waiting for it.
    let dead = dead_addr().await;
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n\n\
         [upstreams.app]\nservers = [\"{dead}\"]\n"
    ))
    .await;
    for (length, status) in [(100, 502), (10_000, 413)] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            format!(
                "POST /expecting HTTP/1.1\r\nHost: h\r\nContent-Length: {length}\r\n\
                 Expect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(statuses(&bytes), [status], "{text:?}");
        assert!(
            text.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{text:?}"
        );
        assert!(
            closed,
            "{status}: the connection waits for a body that may never come"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Refused heads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_max_header_bytes_is_431_with_a_text_body_then_closed() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "max_header_bytes = \"8KiB\"\nheader_read_timeout = \"30s\"",
        &[&a],
    ))
    .await;
    // A complete head, and one that never ends: both are refused once over the limit,
    // the second without waiting for its end or for header_read_timeout.
    let pad = "p".repeat(10_000);
    let complete = format!("GET /big HTTP/1.1\r\nHost: h\r\nX-Pad: {pad}\r\n\r\n");
    let endless = format!("GET /big HTTP/1.1\r\nHost: h\r\nX-Pad: {pad}{pad}");
    for req in [complete, endless] {
        let mut c = RawConn::connect(p.addr).await;
        c.send(req.as_bytes()).await;
        let r = c.response().await;
        assert_eq!(r.status, 431);
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        // The text, then the request ID (CONTRACT §8) that the answer also carries.
        let id = r.header("x-request-id").expect("x-request-id");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("431 request header fields too large\nrequest id: {id}\n")
        );
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            c.closed_within(Duration::from_secs(3)).await.is_some(),
            "the connection stays open after the 431"
        );
        assert!(!c.reset, "reset instead of a clean close");
    }
    // Under the limit, the same header passes.
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        format!(
            "GET /fits HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(6_000)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.status, 200);
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_line_is_400_with_a_body_then_closed() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // Two spaces after the method; a well-formed request behind it must not be served.
    s.write_all(b"GET  / HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "the connection stays open after the 400");
    assert_eq!(
        statuses(&bytes),
        [400],
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    let (head, body) = split_at_body(&bytes);
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-type: text/plain"), "{head}");
    assert!(
        body.starts_with(b"400 bad request\nrequest id: "),
        "{body:?}"
    );
    assert!(
        head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
        "{head}"
    );
    assert_eq!(a.hits(), 0);
}

/// A body in a transfer coding fairway does not implement (anything before the final
/// `chunked`) is refused with 501 (RFC 9112 §6.1), never decoded and passed on as if plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_is_501_then_closed() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    for te in ["gzip, chunked", "deflate,chunked"] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let req = format!(
            "POST /coded HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "{te}: the connection stays open after the 501");
        assert_eq!(
            statuses(&bytes),
            [501],
            "{te}: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        let (head, _) = split_at_body(&bytes);
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    }
    assert_eq!(a.hits(), 0);
}

// ---------------------------------------------------------------------------------------
// Early answers, responses cut short

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_is_read_by_a_client_still_uploading() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("max_body_bytes = \"1KiB\"", &[&a])).await;
    const DECLARED: u64 = 10 * 1024 * 1024;
    const PIECE: usize = 16 * 1024;
    /// What the client still sends after it has read the answer, as a client busy
    /// uploading does.
    const AFTER: u64 = 1024 * 1024;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {DECLARED}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    // The body goes on in its own task and is never whole: the answer cannot wait for its
    // end. It must not be reset while the client reads the answer (lingering close).
    let answered = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&answered);
    let writer = tokio::spawn(async move {
        let piece = vec![b'u'; PIECE];
        let mut sent = 0u64;
        while !done.load(Ordering::SeqCst) && sent + AFTER + (PIECE as u64) < DECLARED {
            wr.write_all(&piece).await?;
            sent += PIECE as u64;
        }
        eventually(Duration::from_secs(10), "the 413 was read", || {
            let d = Arc::clone(&done);
            async move { d.load(Ordering::SeqCst) }
        })
        .await;
        let until = sent + AFTER;
        while sent < until {
            wr.write_all(&piece).await?;
            sent += PIECE as u64;
        }
        wr.shutdown().await
    });
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(());
            }
            match rd.read(&mut tmp).await {
                Ok(0) => return Err("closed".to_owned()),
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("no answer while the body was being sent");
    answered.store(true, Ordering::SeqCst);
    let text = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(head, Ok(()), "before an answer: {text:?}");
    assert!(text.starts_with("HTTP/1.1 413 "), "{text:?}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{text:?}"
    );
    let upload = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the upload after the answer never ended")
        .unwrap();
    assert!(
        upload.is_ok(),
        "the upload was cut off right after the answer: {upload:?}"
    );
    // Once the client is done sending, the connection closes.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stays open after the 413");
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_cut_short_is_cut_short_for_the_client() {
    let (up, _) = raw_upstream(|mut s| async move {
        while let Some(head) = read_head(&mut s).await {
            if head.starts_with(b"GET /short ") {
                // A tenth of it, then the connection closes.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    .await;
                return;
            }
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await;
    let p = proxy_to(up, "").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /short HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the client connection stays open after a cut-off body"
    );
    let (head, body) = split_at_body(&bytes);
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert!(head.contains("\r\ncontent-length: 100\r\n"), "{head}");
    assert!(
        body.len() < 100,
        "completed with a wrong body: {:?}",
        String::from_utf8_lossy(body)
    );
    assert!(
        b"0123456789".starts_with(body),
        "{:?}",
        String::from_utf8_lossy(body)
    );
    // The proxy serves the next connection.
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /whole HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
}

// ---------------------------------------------------------------------------------------
// HTTP/2 beside HTTP/1.1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_http11_share_the_listener() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        h2c_client().request(
            Request::get(p.url("/over-h2"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        ),
    )
    .await
    .expect("h2c request timed out")
    .expect("h2c request failed");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["uri"], "/over-h2");
    // HTTP/1.1 on the same listener, with a method that begins like the preface ("P").
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"POST /over-h1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.json()["uri"].as_str(), r.json()["body_len"].as_u64()),
        (Some("/over-h1"), Some(2))
    );
    // The preface split over writes is still HTTP/2: a HEADERS frame answers on stream 1.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    // A millisecond apart, so that the proxy reads them apart.
    for piece in H2_PREFACE.chunks(5) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.write_all(&h2_frame(FRAME_SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    let block = hpack_get(&p.addr.to_string(), "/split-preface");
    s.write_all(&h2_frame(
        FRAME_HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block,
    ))
    .await
    .unwrap();
    let headers = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut h = [0u8; 9];
            s.read_exact(&mut h).await.expect("closed before an answer");
            assert!(
                !h.starts_with(b"HTTP/1.1"),
                "answered as HTTP/1.1: {:?}",
                String::from_utf8_lossy(&h)
            );
            let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if h[3] == FRAME_HEADERS && stream == 1 {
                return payload;
            }
        }
    })
    .await
    .expect("no HEADERS frame on stream 1");
    // `:status: 200` from HPACK's static table.
    assert_eq!(headers.first(), Some(&0x88), "{headers:?}");
    assert_eq!(a.hits(), 3);
}
