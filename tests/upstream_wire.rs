//! The upstream side of HTTP/1.1 on the wire (HTTP1-RULES "reading a response from an
//! upstream"): informational answers skipped, bodies delimited by length, chunks or close,
//! a connection pooled only when its exchange ended cleanly both ways, an idle connection
//! the server closed never used, and bytes sent right after a `101` delivered.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::raw::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(up: SocketAddr) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.app]\nservers = [\"{up}\"]\n")
}

/// An upstream that answers every request on a connection with `answer` (given the request
/// head), as long as the connection lasts.
async fn answering(
    answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let answer = Arc::new(answer);
    raw_upstream(move |mut s| {
        let answer = Arc::clone(&answer);
        async move {
            while let Some(head) = read_head(&mut s).await {
                if s.write_all(&answer(&head)).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// `GET path` on `c`, and its response.
async fn get(c: &mut RawConn, path: &str) -> RawResponse {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
        .await;
    c.response().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_answers_before_the_final_one_are_skipped() {
    let (up, conns) = answering(|_| {
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            .to_vec()
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    for _ in 0..2 {
        let r = get(&mut c, "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"ok");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "the connection is reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_complete_response_keep_its_connection_out_of_the_pool() {
    // A second response, never asked for, right behind the first: whoever got this
    // connection next would be handed it.
    let (up, conns) = answering(|head| {
        if head.starts_with(b"GET /first") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst\
              HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
                .to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond".to_vec()
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    assert_eq!(get(&mut c, "/first").await.body, b"first");
    assert_eq!(get(&mut c, "/second").await.body, b"second");
    assert_eq!(conns.load(Ordering::SeqCst), 2, "a fresh connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_delimited_by_close_is_relayed_whole_and_its_connection_not_reused() {
    let (up, conns) = raw_upstream(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
                .await;
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    for _ in 0..2 {
        let r = get(&mut c, "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"until the end");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_to_head_has_no_body_and_keeps_its_connection() {
    let (up, conns) = answering(|head| {
        if head.starts_with(b"HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget".to_vec()
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let status = c.read_head_only().await;
    assert_eq!(status, 200);
    assert_eq!(get(&mut c, "/").await.body, b"get");
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_server_closed_is_not_used_even_for_a_post() {
    // Each connection answers one request and closes, without saying so: the pooled
    // connection is dead when the next request comes. A POST cannot be sent twice once it
    // may have reached a server, so it must never be tried on that connection.
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    let (up, conns) = raw_upstream(move |mut s| {
        let flag = Arc::clone(&flag);
        async move {
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            if head.starts_with(b"POST") {
                // The 4-byte body, or what of it did not come with the head.
                let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                let mut rest = vec![0u8; 4usize.saturating_sub(head.len() - end)];
                let _ = s.read_exact(&mut rest).await;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            let _ = s.shutdown().await;
            drop(s);
            flag.store(true, Ordering::SeqCst);
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    assert_eq!(get(&mut c, "/").await.status, 200);
    until_set(Duration::from_secs(5), "the upstream closed", &closed).await;
    c.send(b"POST /once HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_after_a_101_reach_the_client() {
    // A WebSocket text frame "hi" in the same write as the 101.
    let (up, _) = raw_upstream(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\n\r\n\x81\x02hi",
                )
                .await;
            let mut rest = [0u8; 64];
            let _ = s.read(&mut rest).await;
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(c.read_head_only().await, 101);
    let frame = tokio::time::timeout(Duration::from_secs(5), async {
        while c.buf.len() < 4 {
            assert!(c.fill().await > 0, "closed before the frame");
        }
        c.buf[..4].to_vec()
    })
    .await
    .expect("no frame after the 101");
    assert_eq!(frame, b"\x81\x02hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_in_one_byte_pieces_arrives_whole() {
    let (up, conns) = raw_upstream(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                           3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n";
            for b in answer {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                let _ = s.flush().await;
            }
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    for _ in 0..2 {
        let r = get(&mut c, "/").await;
        assert_eq!(r.body, b"abcde");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunk_in_a_response_cuts_the_client_off() {
    let (up, _) = answering(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nmore\r\n".to_vec()
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "the client connection stayed open");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a broken body must not be completed: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_off_mid_upload_leaves_the_client_connection_usable() {
    // The POST's connection is dropped after a little of its body; a GET is answered.
    let (up, _) = raw_upstream(|mut s| async move {
        while let Some(head) = read_head(&mut s).await {
            if head.starts_with(b"POST") {
                let mut some = [0u8; 1024];
                let _ = s.read(&mut some).await;
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = RawConn::connect(p.addr).await;
    const LEN: usize = 256 * 1024;
    c.send(format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {LEN}\r\n\r\n").as_bytes())
        .await;
    c.send(&[b'x'; 16 * 1024]).await;
    let r = c.response().await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("connection"), None, "the connection is kept");
    // The rest of the body is read and discarded; the connection then serves a next request.
    c.send(&vec![b'x'; LEN - 16 * 1024]).await;
    let r = get(&mut c, "/after").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_stay_within_max_idle_per_server_and_serve_every_worker() {
    // Six requests at once need six upstream connections; the upstream answers the first
    // request of each only once all six have come. Afterwards the pool may keep two, in
    // all (each worker thread keeps its own share), and the requests that follow reuse
    // them, whichever worker their client connection landed on.
    let open = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(6));
    let (o, b) = (Arc::clone(&open), Arc::clone(&barrier));
    let (up, conns) = raw_upstream(move |mut s| {
        let (open, barrier) = (Arc::clone(&o), Arc::clone(&b));
        async move {
            open.fetch_add(1, Ordering::SeqCst);
            let mut first = true;
            while read_head(&mut s).await.is_some() {
                if std::mem::take(&mut first) {
                    barrier.wait().await;
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    break;
                }
            }
            open.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await;
    let toml = format!("{}max_idle_per_server = 2\n", config(up));
    let p = TestProxy::start(&toml).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(tokio::spawn(async move {
            let mut c = RawConn::connect(p.addr).await;
            assert_eq!(get(&mut c, "/").await.status, 200);
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(conns.load(Ordering::SeqCst), 6);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while open.load(Ordering::SeqCst) > 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} upstream connections still open",
            open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..6 {
        let mut c = RawConn::connect(p.addr).await;
        assert_eq!(get(&mut c, "/").await.status, 200);
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        6,
        "no new connection was dialed"
    );
    assert_eq!(open.load(Ordering::SeqCst), 2);
}
