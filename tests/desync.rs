//! An upstream connection goes back to the pool only when both directions ended cleanly
//! (SECURITY.md): an early response stops the upload (what the client still sends is read
//! and discarded) and closes the upstream connection, a response
//! framed twice is relayed by its chunked coding and its connection closed, a response with
//! a broken `Content-Length` is a 502; and a request that may have reached a server is sent
//! again only when it is idempotent (RFC 9110 §9.2.2).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::raw::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The first request line of a head, and its declared body length.
fn request_line(head: &[u8]) -> (String, usize) {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or("").to_owned();
    let len = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (line, len)
}

/// An upstream that answers an upload (`POST`) at once with 413, without reading its body,
/// and then goes on reading the connection as if the next request began right after the
/// head: whatever the body holds is taken for requests. Every other request gets 200 with
/// its request line as the body.
async fn early_answering_upstream() -> SocketAddr {
    let (addr, _) = raw_upstream(|mut s: TcpStream| async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut tmp = [0u8; 4096];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
                continue;
            };
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let (line, _) = request_line(&head);
            let answer = if line.starts_with("POST") {
                "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope".to_owned()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
                    line.len()
                )
            };
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_response_never_hands_a_smuggled_answer_to_another_client() {
    let up = early_answering_upstream().await;
    let p = proxy_to(up, "").await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    for round in 0..3 {
        // Client one: the head, then (once the 413 is back) a body that reads as a request.
        let mut one = TcpStream::connect(p.addr).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        );
        one.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        while !got.ends_with(b"nope") {
            let n = tokio::time::timeout(Duration::from_secs(5), one.read(&mut tmp))
                .await
                .expect("no early answer")
                .unwrap();
            assert!(n > 0, "closed before the early answer");
            got.extend_from_slice(&tmp[..n]);
        }
        assert_eq!(statuses(&got), [413]);
        // Still writing its body when the answer came: it is read and discarded, never
        // sent on, so client one gets no reset and its connection goes on.
        one.write_all(smuggled.as_bytes()).await.unwrap();
        // Client two, on a path of its own, must get its own answer.
        let r = get(&p.url(&format!("/mine/{round}"))).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.text(),
            format!("GET /mine/{round} HTTP/1.1"),
            "client two got an answer meant for another request"
        );
        // And so must client one, on its own connection.
        let mut one = common::raw::RawConn {
            stream: one,
            buf: Vec::new(),
            reset: false,
        };
        one.send(format!("GET /one/{round} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
            .await;
        let r = one.response().await;
        assert_eq!(r.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("GET /one/{round} HTTP/1.1")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_uploading_when_the_early_answer_comes_gets_it_without_a_reset() {
    let up = early_answering_upstream().await;
    let p = proxy_to(up, "").await;
    const LEN: usize = 16 * 1024 * 1024;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST /big HTTP/1.1\r\nHost: app\r\nContent-Length: {LEN}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..LEN / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        wr.write_all(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n")
            .await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while !got.ends_with(b"GET /next HTTP/1.1") {
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut tmp))
            .await
            .expect("no answer")
            .expect("the client got a reset");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&tmp[..n]);
    }
    assert_eq!(statuses(&got), [413, 200]);
    writer.await.unwrap().expect("the upload was cut off");
}

/// An upstream that answers every request with `answer`, counting the requests it read.
async fn answering_upstream(
    answer: &'static str,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&requests);
    let (addr, accepted) = raw_upstream(move |mut s: TcpStream| {
        let r = Arc::clone(&r);
        async move {
            while read_head(&mut s).await.is_some() {
                r.fetch_add(1, Ordering::SeqCst);
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, accepted, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_framings_is_relayed_by_chunks_and_its_connection_closed() {
    let (up, accepted, _) = answering_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let p = proxy_to(up, "").await;
    let c = client();
    for n in 1..=3 {
        let r = get_with(&c, &p.url("/"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello world");
        assert!(
            r.headers.get("content-length").is_none_or(|v| v == "11"),
            "the upstream's conflicting length was relayed: {:?}",
            r.headers
        );
        // Never reused: each request on a connection of its own.
        assert_eq!(accepted.load(Ordering::SeqCst), n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_a_broken_content_length_is_502_and_its_connection_closed() {
    for answer in [
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "HTTP/1.1 200 OK\r\nContent-Length: x5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let (up, accepted, _) = answering_upstream(answer).await;
        let p = proxy_to(up, "retries = 0").await;
        let c = client();
        for n in 1..=2 {
            let r = get_with(&c, &p.url("/"), &[]).await;
            assert_eq!(r.status, 502, "{answer:?}: {}", r.text());
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                n,
                "{answer:?}: connection reused"
            );
        }
    }
}

/// An upstream that answers its first request on each connection with 200 and keeps the
/// connection open, and reads every later request's head and closes without answering.
async fn breaking_after_first_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, _, requests) = {
        let requests = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&requests);
        let (addr, accepted) = raw_upstream(move |mut s: TcpStream| {
            let r = Arc::clone(&r);
            async move {
                let mut first = true;
                while let Some(head) = read_head(&mut s).await {
                    r.fetch_add(1, Ordering::SeqCst);
                    if !first || !request_line(&head).0.starts_with("GET /warm") {
                        return;
                    }
                    first = false;
                    let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if s.write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        })
        .await;
        (addr, accepted, requests)
    };
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_may_have_reached_the_server_is_never_sent_twice() {
    let (up, requests) = breaking_after_first_upstream().await;
    let p = proxy_to(up, "retries = 2").await;
    let c = client();
    for method in ["POST", "PATCH"] {
        // A pooled connection first, so that the request goes out on a reused one.
        let r = get_with(&c, &p.url("/warm"), &[]).await;
        assert_eq!(r.status, 200);
        let before = requests.load(Ordering::SeqCst);
        let req = http::Request::builder()
            .method(method)
            .uri(p.url("/order"))
            .body(Default::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, 502, "{method}");
        assert_eq!(
            requests.load(Ordering::SeqCst) - before,
            1,
            "{method} with no body was sent again after it reached the server"
        );
    }
    // An idempotent request on a reused connection is tried again on a fresh one (CONTRACT
    // §2 pool_idle_timeout), which breaks too.
    let r = get_with(&c, &p.url("/warm"), &[]).await;
    assert_eq!(r.status, 200);
    let before = requests.load(Ordering::SeqCst);
    let r = get_with(&c, &p.url("/again"), &[]).await;
    assert_eq!(r.status, 502);
    assert!(
        requests.load(Ordering::SeqCst) - before >= 2,
        "GET not retried"
    );
}
