//! The client listener's HTTP behaviour (CONTRACT §3): forwarding, hop-by-hop headers, h2c,
//! the proxy's own error codes, upstream connection pooling and `Connection: close`.
//! Forwarded headers are in `forwarded.rs`, routing in `routing.rs`, limits and timeouts in
//! `limits.rs`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::RawConn;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// 1. Forwarding

#[tokio::test]
async fn forwards_method_path_query_and_the_host_as_sent() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let c = client();
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"] {
        let req = Request::builder()
            .method(method)
            .uri(p.url("/some/path%20x/?q=1&r=two%2F&q=3"))
            .header("host", "app.example:1234")
            .header("x-custom", "v1")
            .body(Full::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, 200, "{method}");
        let j = r.json();
        assert_eq!(j["method"], method);
        assert_eq!(j["uri"], "/some/path%20x/?q=1&r=two%2F&q=3");
        assert_eq!(j["version"], "HTTP/1.1");
        assert_eq!(r.seen_one("host").as_deref(), Some("app.example:1234"));
        assert_eq!(r.seen_one("x-custom").as_deref(), Some("v1"));
    }
    assert_eq!(a.hits(), 6);
}

#[tokio::test]
async fn absolute_form_request_reaches_the_upstream_in_origin_form() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET http://app.example:1234/abs?x=1 HTTP/1.1\r\nHost: app.example:1234\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["uri"], "/abs?x=1");
    assert_eq!(j["headers"]["host"][0], "app.example:1234");
}

#[tokio::test]
async fn passes_status_headers_and_body_through() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    for code in [201u16, 404, 500, 503] {
        let r = get(&p.url(&format!("/status/{code}"))).await;
        assert_eq!(r.status, code);
        assert_eq!(r.headers["x-upstream"], "a");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(
            r.headers["content-length"].to_str().unwrap(),
            r.body.len().to_string()
        );
        // The upstream's own body, not an answer of the proxy.
        assert_eq!(r.json()["uri"], format!("/status/{code}"));
    }
    a.set_status(418);
    let r = get(&p.url("/teapot")).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.upstream(), "a");
    a.set_status(0);
    let r = get(&p.url("/bytes/100000")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "100000");
    assert_eq!(r.body.len(), 100_000);
    assert!(r.body.iter().all(|&b| b == b'x'));
}

#[tokio::test]
async fn head_returns_the_headers_without_a_body() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let r = send(
        &client(),
        Request::head(p.url("/bytes/5000"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-upstream"], "a");
    assert_eq!(r.headers["content-length"], "5000");
    assert!(r.body.is_empty());
    assert_eq!(a.hits(), 1);
    // The connection is still usable after a HEAD.
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let head = c.read_head_only().await;
    assert_eq!(head, 200);
    c.send(b"GET /after-head HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/after-head");
}

#[tokio::test]
async fn post_body_arrives_whole() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let body = Bytes::from(vec![7u8; 300_000]);
    let r = send(
        &client(),
        Request::post(p.url("/upload"))
            .body(Full::new(body))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body_len"], 300_000);
    assert_eq!(r.seen_one("content-length").as_deref(), Some("300000"));
    assert_eq!(r.seen_header("transfer-encoding"), None);
}

#[tokio::test]
async fn chunked_post_body_arrives_whole() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 11);
}

/// A hand-written upstream that answers every request head it reads with `response`.
async fn canned_upstream(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn repeated_headers_chunked_bodies_and_trailers_pass_through() {
    let up = canned_upstream(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2; HttpOnly\r\n\
          X-Dup: one\r\nX-Dup: two\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
    )
    .await;
    let cfg =
        format!("[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.app]\nservers = [\"{up}\"]\n");
    let p = TestProxy::start(&cfg).await;
    let mut c = RawConn::connect(p.addr).await;
    for _ in 0..2 {
        c.send(b"GET /cookies HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello world");
        let values = |name: &str| -> Vec<&str> {
            r.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("set-cookie"), ["a=1; Path=/", "b=2; HttpOnly"]);
        assert_eq!(values("x-dup"), ["one", "two"]);
        assert_eq!(r.header("trailer"), None);
    }
}

#[tokio::test]
async fn content_length_beside_chunked_is_not_forwarded() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    for req in [
        &b"POST /smuggle HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST /smuggle HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut c = RawConn::connect(p.addr).await;
        c.send(req).await;
        let r = c.response().await;
        // RFC 9112 §6.3: refuse, or forward without the Content-Length.
        if r.status == 400 {
            continue;
        }
        assert_eq!(r.status, 200);
        let j = r.json();
        assert_eq!(j["body_len"], 5);
        let cl = &j["headers"]["content-length"];
        assert!(cl.is_null() || *cl == serde_json::json!(["5"]), "{cl}");
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"POST /expect HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let interim = c.response().await;
    assert_eq!(interim.status, 100);
    c.send(b"hello").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 5);
}

// ---------------------------------------------------------------------------------------
// 2. Hop-by-hop headers

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"GET /hop-req HTTP/1.1\r\nHost: h\r\nConnection: x-secret\r\nX-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
          Trailer: x-t\r\nUpgrade: something\r\nX-Kept: yes\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    let j = r.json();
    let seen: Vec<&str> = j["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for h in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(!seen.contains(&h), "{h} reached the upstream: {seen:?}");
    }
    assert_eq!(j["headers"]["x-kept"], serde_json::json!(["yes"]));
    // Not an upgrade: the connection stays an ordinary keep-alive one.
    c.send(b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/second");
}

#[tokio::test]
async fn connection_header_listing_several_tokens_strips_each() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"GET /hop-req HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-One\r\n\
          Connection: x-two\r\nX-One: 1\r\nX-Two: 2\r\nX-Three: 3\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    let h = &r.json()["headers"];
    assert!(h.get("x-one").is_none(), "{h}");
    assert!(h.get("x-two").is_none(), "{h}");
    assert!(h.get("connection").is_none(), "{h}");
    assert_eq!(h["x-three"], serde_json::json!(["3"]));
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_returned() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /hop HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("a"));
    for h in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert_eq!(r.header(h), None, "{h} reached the client: {:?}", r.headers);
    }
    // The upstream's `keep-alive` token did not make the proxy close the client.
    c.send(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);

    // Over HTTP/2 as well (where connection-specific headers are a protocol error).
    let r = send(
        &h2c_client(),
        Request::get(p.url("/hop")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    for h in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert!(r.headers.get(h).is_none(), "{h} reached the h2 client");
    }
    assert_eq!(r.headers["x-upstream"], "a");
}

// ---------------------------------------------------------------------------------------
// 3. h2c

#[tokio::test]
async fn h2c_request_reaches_the_upstream_as_http11_with_a_host_header() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let r = send(
        &h2c_client(),
        Request::get(p.url("/h2?x=1"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-upstream"], "a");
    let j = r.json();
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["method"], "GET");
    assert_eq!(j["uri"], "/h2?x=1");
    let authority = p.addr.to_string();
    assert_eq!(r.seen_one("host").as_deref(), Some(authority.as_str()));
    assert_eq!(
        r.seen_one("x-forwarded-host").as_deref(),
        Some(authority.as_str())
    );
    assert_eq!(r.seen_one("x-forwarded-proto").as_deref(), Some("http"));
}

#[tokio::test]
async fn h2c_post_body_arrives() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let c = h2c_client();
    let r = send(
        &c,
        Request::post(p.url("/h2-upload"))
            .body(Full::new(Bytes::from(vec![1u8; 500_000])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(r.json()["body_len"], 500_000);
    // Several streams on the one connection, all answered.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (c, url) = (c.clone(), p.url(&format!("/s/{i}")));
        tasks.push(tokio::spawn(async move {
            send(&c, Request::get(url).body(Full::default()).unwrap()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["uri"], format!("/s/{i}"));
    }
}

// ---------------------------------------------------------------------------------------
// 4. Errors answered by the proxy

fn assert_plain(r: &Reply, code: u16) {
    assert_eq!(r.status, code, "{}", r.text());
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/plain"), "{ct}");
    assert!(!r.body.is_empty());
}

#[tokio::test]
async fn refused_upstream_is_502_and_other_routes_keep_working() {
    let a = TestUpstream::start("a").await;
    let stopped = TestUpstream::start("stopped").await;
    let dead = dead_addr().await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"{}\"]\n\n\
         [upstreams.dead]\nservers = [\"{dead}\"]\n\n\
         [upstreams.stopped]\nservers = [\"{}\"]\n\n\
         [[routes]]\nupstream = \"app\"\n\n\
         [[routes]]\npath_prefix = \"/dead\"\nupstream = \"dead\"\n\n\
         [[routes]]\npath_prefix = \"/stopped\"\nupstream = \"stopped\"\n",
        a.addr, stopped.addr
    );
    let p = TestProxy::start(&cfg).await;
    assert_eq!(get(&p.url("/stopped")).await.upstream(), "stopped");
    stopped.stop();
    let addr = stopped.addr;
    eventually(
        Duration::from_secs(5),
        "stopped upstream refuses",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;

    let r = get(&p.url("/dead/x")).await;
    assert_plain(&r, 502);
    assert_eq!(get(&p.url("/")).await.status, 200);
    let r = get(&p.url("/stopped")).await;
    assert_plain(&r, 502);
    assert_eq!(get(&p.url("/")).await.status, 200);
    let r = send(
        &client(),
        Request::post(p.url("/dead"))
            .body(Full::new(Bytes::from_static(b"data")))
            .unwrap(),
    )
    .await;
    assert_plain(&r, 502);
    assert_eq!(get(&p.url("/")).await.upstream(), "a");
}

#[tokio::test]
async fn upstream_closing_without_an_answer_is_502() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    a.set_reset(true);
    let r = get(&p.url("/reset")).await;
    assert_plain(&r, 502);
    let r = send(
        &client(),
        Request::post(p.url("/reset"))
            .body(Full::new(Bytes::from_static(b"data")))
            .unwrap(),
    )
    .await;
    assert_plain(&r, 502);
    a.set_reset(false);
    assert_eq!(get(&p.url("/")).await.status, 200);
}

/// A 504 that came after `took`, as a `request_timeout` of 300 ms allows.
fn timed_out(r: &Reply, took: Duration) {
    assert_plain(r, 504);
    assert!(
        took >= Duration::from_millis(280),
        "504 too early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "504 too late: {took:?}");
}

/// The head's deadline is kept with the pooled connection's own timer: one armed by an
/// earlier request, fired or still pending, must neither cut a later request short nor
/// let it wait past its own deadline.
#[tokio::test]
async fn request_timeout_holds_on_a_reused_upstream_connection() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("request_timeout = \"300ms\"", &[&a])).await;
    for pause in [Duration::from_millis(450), Duration::from_millis(150)] {
        // A quick request arms the connection's timer for 300 ms from now.
        assert_eq!(get(&p.url("/")).await.status, 200);
        // Past that deadline (the timer fired while the connection was idle), or before it
        // (the timer is still set, earlier than the next request's deadline).
        tokio::time::sleep(pause).await;
        let start = Instant::now();
        let r = get(&p.url("/delay/3000")).await;
        timed_out(&r, start.elapsed());
    }
}

#[tokio::test]
async fn slow_upstream_is_504_after_request_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("request_timeout = \"300ms\"", &[&a])).await;
    let start = Instant::now();
    let r = get(&p.url("/delay/3000")).await;
    timed_out(&r, start.elapsed());
    // Not retried elsewhere: one try reached the upstream.
    assert_eq!(a.hits(), 1);
    // With a body, the timeout runs from the end of the body.
    let start = Instant::now();
    let r = send(
        &client(),
        Request::post(p.url("/delay/3000"))
            .body(Full::new(Bytes::from(vec![0u8; 4096])))
            .unwrap(),
    )
    .await;
    timed_out(&r, start.elapsed());
    let r = get(&p.url("/delay/50")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream(), "a");
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let limit = Duration::from_secs(3);
    for bad in [
        &b"NOT-HTTP\r\n\r\n"[..],
        b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ] {
        let answer = raw(p.addr, bad, limit).await;
        assert_eq!(
            raw_status(&answer),
            Some(400),
            "{:?} -> {answer:?}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(get(&p.url("/")).await.status, 200);
    }
    assert_eq!(a.hits(), 5);
}

// RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
// HTTP/1.1 request message that lacks a Host header field and to any request message that
// contains more than one Host header field line". Nginx does the same.

#[tokio::test]
async fn http11_without_host_is_400() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let answer = raw(
        p.addr,
        b"GET /no-host HTTP/1.1\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(400), "{answer:?}");
    assert_eq!(a.hits(), 0);
    assert_eq!(get(&p.url("/")).await.status, 200);
}

#[tokio::test]
async fn two_host_headers_are_400() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let answer = raw(
        p.addr,
        b"GET /two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(400), "{answer:?}");
    assert_eq!(a.hits(), 0);
    assert_eq!(get(&p.url("/")).await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 5. Upstream keep-alive pooling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let c = client();
    for i in 0..20 {
        let r = send(
            &c,
            Request::get(p.url(&format!("/n/{i}")))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(a.hits(), 20);
    let conns = a
        .knobs
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    println!("upstream connections for 20 sequential requests: {conns}");
    assert!(conns <= 2, "{conns} upstream connections for 20 requests");
    // Different client connections share the pool too.
    for _ in 0..10 {
        assert_eq!(get(&p.url("/fresh-client")).await.status, 200);
    }
    let conns = a
        .knobs
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(conns <= 3, "{conns} upstream connections for 30 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_close_is_honoured() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    for i in 0..5 {
        c.send(b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "round {i}");
        // Hop-by-hop: the upstream's close is not the client's.
        assert_eq!(r.header("connection"), None);
        c.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "round {i}");
        assert_eq!(r.json()["uri"], "/after");
    }
    // Every `/close` answer ended its upstream connection, so none was used twice.
    let conns = a
        .knobs
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(conns >= 5, "only {conns} upstream connections");
    assert_eq!(a.hits(), 10);
}

// ---------------------------------------------------------------------------------------
// 6. Client `Connection: close`

#[tokio::test]
async fn client_connection_close_is_honoured() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /bye HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(r.json()["headers"].get("connection").is_none());
    let closed = c.closed_within(Duration::from_secs(2)).await;
    assert!(
        closed.is_some(),
        "connection still open after Connection: close"
    );
    assert!(c.buf.is_empty(), "bytes after the response: {:?}", c.buf);
    assert!(!c.reset, "reset instead of a clean close");
    // The request was read whole and nothing followed it: the connection closed without
    // lingering (a FIN, not a reset), so what the client sends now is refused by the
    // closed socket instead of read and discarded.
    let deadline = Instant::now() + Duration::from_secs(3);
    while c.stream.write_all(b"more").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the proxy still reads what the client sends after the close it asked for"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http10_without_keep_alive_is_closed_after_the_response() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/old");
    assert!(c.closed_within(Duration::from_secs(2)).await.is_some());
    assert!(!c.reset, "reset instead of a clean close");
}

/// `0.0.0.0:P` and `[::]:P` together: the IPv6 socket is IPv6 only (as Nginx's
/// `ipv6only=on`), so both bind, and each answers its own family.
#[tokio::test]
async fn ipv4_and_ipv6_wildcards_share_a_port() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 on this machine: nothing to check");
        return;
    }
    let a = TestUpstream::start("a").await;
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = TestProxy::start(&format!(
        "[server]\nlisten = [\"0.0.0.0:{port}\", \"[::]:{port}\"]\n[upstreams.app]\nservers = [\"{}\"]\n",
        a.addr
    ))
    .await;
    assert_eq!(p.handle().client_addrs().len(), 2);
    assert_eq!(get(format!("http://127.0.0.1:{port}/")).await.status, 200);
    assert_eq!(get(format!("http://[::1]:{port}/")).await.status, 200);
}
