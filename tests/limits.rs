//! The client listener's limits and timeouts (CONTRACT §2 `[server]`, §3): `max_header_bytes`,
//! `max_body_bytes`, `body_read_timeout`, `header_read_timeout` (the slow-loris guard),
//! `idle_timeout`, `request_timeout` counted from the end of the body, and streaming in both
//! directions with flat memory.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::RawConn;
use common::usage::{MIB, rss_bytes};
use common::*;
use http::Request;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

/// A client whose request bodies are streamed (the common `client()` sends `Full` bodies).
type StreamClient = Client<HttpConnector, BoxBody<Bytes, std::io::Error>>;

fn stream_client() -> StreamClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A body of `total` bytes generated in chunks of `chunk` bytes, waiting `pause` before
/// each chunk. Nothing but one chunk is ever held in memory.
fn generated_body(total: u64, chunk: usize, pause: Duration) -> BoxBody<Bytes, std::io::Error> {
    let block = Bytes::from(vec![b'u'; chunk]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let block = block.clone();
        async move {
            if left == 0 {
                return None;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let take = left.min(block.len() as u64) as usize;
            Some((
                Ok::<_, std::io::Error>(Frame::data(block.slice(..take))),
                left - take as u64,
            ))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// The largest RSS of this process seen while it runs, sampled every 10 ms.
struct RssWatch {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start() -> RssWatch {
        let max = Arc::new(AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (Arc::clone(&max), Arc::clone(&stop));
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        RssWatch { max, stop }
    }

    fn sample(&self) {
        self.max.fetch_max(rss_bytes(), Ordering::Relaxed);
    }

    fn finish(self) -> u64 {
        self.sample();
        self.stop.store(true, Ordering::Relaxed);
        self.max.load(Ordering::Relaxed)
    }
}

/// GETs `/` through the proxy and expects 200 from the upstream.
async fn still_serving(p: &TestProxy) {
    let r = get(&p.url("/still-serving")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/still-serving");
}

// ---------------------------------------------------------------------------------------
// max_header_bytes

#[tokio::test]
async fn a_head_larger_than_max_header_bytes_is_431() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("max_header_bytes = \"8KiB\"", &[&a])).await;
    let big = "a".repeat(20_000);
    let req = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\n\r\n");
    let answer = raw(p.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(raw_status(&answer), Some(431), "{answer:?}");
    assert_eq!(a.hits(), 0);
    still_serving(&p).await;
    // A head well under the limit passes.
    let ok = "b".repeat(4_000);
    let r = send(
        &client(),
        Request::get(p.url("/ok"))
            .header("x-big", ok.as_str())
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("x-big"), Some(vec![ok]));
}

// ---------------------------------------------------------------------------------------
// max_body_bytes

#[tokio::test]
async fn a_declared_body_larger_than_max_body_bytes_is_413_before_the_upstream() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("max_body_bytes = \"1KiB\"", &[&a])).await;
    // The head alone: the declared length is enough to refuse, without reading the body.
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 2048\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 413);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(a.hits(), 0);
    still_serving(&p).await;
    // With the body sent along.
    let r = send(
        &client(),
        Request::post(p.url("/big"))
            .body(Full::new(Bytes::from(vec![0u8; 2048])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(a.hits(), 1, "only still_serving reached the upstream");
    // One byte over the limit.
    let r = send(
        &client(),
        Request::post(p.url("/big"))
            .body(Full::new(Bytes::from(vec![0u8; 1025])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413);
    still_serving(&p).await;
}

#[tokio::test]
async fn a_chunked_body_larger_than_max_body_bytes_is_413() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("max_body_bytes = \"1KiB\"", &[&a])).await;
    let mut req =
        b"POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b'c'; 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(p.addr, &req, Duration::from_secs(3)).await;
    assert_eq!(raw_status(&answer), Some(413), "{answer:?}");
    still_serving(&p).await;
    // The same through a client streaming chunks without a Content-Length.
    let resp = stream_client()
        .request(
            Request::post(p.url("/chunked"))
                .body(generated_body(4096, 512, Duration::ZERO))
                .unwrap(),
        )
        .await
        .expect("no answer to a streamed chunked body");
    assert_eq!(resp.status(), 413);
    still_serving(&p).await;
}

#[tokio::test]
async fn bodies_within_max_body_bytes_pass() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("max_body_bytes = \"1KiB\"", &[&a])).await;
    for len in [0usize, 512, 1024] {
        let r = send(
            &client(),
            Request::post(p.url("/small"))
                .body(Full::new(Bytes::from(vec![1u8; len])))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{len} bytes");
        assert_eq!(r.json()["body_len"], len as u64);
    }
    // Chunked, exactly at the limit.
    let r = stream_client()
        .request(
            Request::post(p.url("/small"))
                .body(generated_body(1024, 256, Duration::ZERO))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["body_len"], 1024);
}

// ---------------------------------------------------------------------------------------
// body_read_timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_after_body_read_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("body_read_timeout = \"300ms\"", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    let start = Instant::now();
    c.send(b"POST /stall HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    let stalled = async {
        let r = c.response().await;
        let took = start.elapsed();
        let closed = c.closed_within(Duration::from_secs(2)).await;
        (r, took, closed)
    };
    let others = async {
        let mut n = 0;
        while start.elapsed() < Duration::from_millis(250) {
            still_serving(&p).await;
            n += 1;
        }
        n
    };
    let ((r, took, closed), served) = tokio::join!(stalled, others);
    assert_eq!(r.status, 408, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(
        took >= Duration::from_millis(280),
        "408 too early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "408 too late: {took:?}");
    assert!(closed.is_some(), "connection left open after the 408");
    assert!(served >= 1);
    still_serving(&p).await;
}

// ---------------------------------------------------------------------------------------
// header_read_timeout and idle_timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_head_is_closed_after_header_read_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
        &[&a],
    ))
    .await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    let start = Instant::now();
    let loris = c.closed_within(Duration::from_secs(2));
    let others = async {
        let mut n = 0;
        while start.elapsed() < Duration::from_millis(250) {
            still_serving(&p).await;
            n += 1;
        }
        n
    };
    let (closed, served) = tokio::join!(loris, others);
    let took = closed.expect("slow-loris connection still open after 2 s");
    assert!(!c.reset, "reset instead of a clean close");
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    assert!(
        c.buf.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&c.buf)
    );
    assert!(served >= 1);
    assert_eq!(a.hits(), served);
}

#[tokio::test]
async fn a_head_trickling_in_byte_by_byte_is_still_cut_at_header_read_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
        &[&a],
    ))
    .await;
    let mut c = RawConn::connect(p.addr).await;
    let start = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: abcdefghijklmnopqrstuvwxyz\r\n";
    let mut closed = false;
    for chunk in head.chunks(2) {
        // Keeps bytes moving every 50 ms: a total, not an idle, limit must cut this.
        if c.stream.write_all(chunk).await.is_err() {
            closed = true;
            break;
        }
        if c.closed_within(Duration::from_millis(50)).await.is_some() {
            closed = true;
            break;
        }
    }
    let took = start.elapsed();
    assert!(closed, "trickling head never cut");
    assert!(
        took >= Duration::from_millis(250),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "cut too late: {took:?}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_header_read_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
        &[&a],
    ))
    .await;
    let mut c = RawConn::connect(p.addr).await;
    let closed = c.closed_within(Duration::from_secs(2)).await;
    let took = closed.expect("silent connection still open after 2 s (idle_timeout is 30 s)");
    assert!(!c.reset, "reset instead of a clean close");
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    assert!(c.buf.is_empty());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_header_read_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"2s\"",
        &[&a],
    ))
    .await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    // Idle for over three header_read_timeouts, under idle_timeout: must stay open.
    assert_eq!(c.closed_within(Duration::from_secs(1)).await, None);
    c.send(b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/second");
    // The next head, once begun, is under header_read_timeout again.
    c.send(b"GET /third HTTP/1.1\r\nHost: h\r\n").await;
    let took = c
        .closed_within(Duration::from_secs(2))
        .await
        .expect("partial second head not cut");
    assert!(!c.reset, "reset instead of a clean close");
    assert!(
        took >= Duration::from_millis(250),
        "cut too early: {took:?}"
    );
    assert_eq!(a.hits(), 2);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"500ms\"",
        &[&a],
    ))
    .await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    let took = c
        .closed_within(Duration::from_secs(3))
        .await
        .expect("idle connection still open after 3 s");
    assert!(!c.reset, "reset instead of a clean close");
    assert!(
        took >= Duration::from_millis(450),
        "closed too early: {took:?}"
    );
    assert!(c.buf.is_empty(), "{:?}", String::from_utf8_lossy(&c.buf));
}

// ---------------------------------------------------------------------------------------
// request_timeout starts once the body has been sent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_starts_after_a_slow_body() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "request_timeout = \"500ms\"\nbody_read_timeout = \"500ms\"",
        &[&a],
    ))
    .await;
    let start = Instant::now();
    // 10 chunks, 150 ms apart: 1.5 s in all, three times both timeouts.
    let resp = stream_client()
        .request(
            Request::post(p.url("/slow-upload"))
                .body(generated_body(10 * 1024, 1024, Duration::from_millis(150)))
                .unwrap(),
        )
        .await
        .expect("slow upload failed");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let took = start.elapsed();
    assert_eq!(status, 200, "{:?}", String::from_utf8_lossy(&body));
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["body_len"], 10 * 1024);
    assert!(
        took >= Duration::from_millis(1400),
        "upload too fast: {took:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Streaming with flat memory (CONTRACT §3)

const BIG: u64 = 200 * MIB;
const RSS_LIMIT: u64 = 64 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_200_mib_each_way_with_flat_memory() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    still_serving(&p).await;

    // Download, read chunk by chunk.
    let before = rss_bytes();
    let watch = RssWatch::start();
    let start = Instant::now();
    let resp = client()
        .request(
            Request::get(p.url(&format!("/bytes/{BIG}")))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], BIG.to_string().as_str());
    let mut body = resp.into_body();
    let mut got = 0u64;
    let mut frames = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            got += d.len() as u64;
        }
        frames += 1;
        if frames.is_multiple_of(64) {
            watch.sample();
        }
    }
    let peak = watch.finish();
    let growth = peak.saturating_sub(before);
    println!(
        "download: {got} bytes in {:?}; RSS before {} MiB, peak {} MiB, growth {:.1} MiB",
        start.elapsed(),
        before / MIB,
        peak / MIB,
        growth as f64 / MIB as f64
    );
    assert_eq!(got, BIG);
    assert!(
        growth < RSS_LIMIT,
        "RSS grew {growth} bytes during a download"
    );

    // Upload, generated chunk by chunk; the upstream counts what arrives.
    let before = rss_bytes();
    let watch = RssWatch::start();
    let start = Instant::now();
    let resp = stream_client()
        .request(
            Request::post(p.url("/upload"))
                .header("content-length", BIG)
                .body(generated_body(BIG, 64 * 1024, Duration::ZERO))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let peak = watch.finish();
    let growth = peak.saturating_sub(before);
    println!(
        "upload: {BIG} bytes in {:?}; RSS before {} MiB, peak {} MiB, growth {:.1} MiB",
        start.elapsed(),
        before / MIB,
        peak / MIB,
        growth as f64 / MIB as f64
    );
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["body_len"], BIG);
    assert_eq!(j["headers"]["content-length"][0], BIG.to_string());
    assert!(
        growth < RSS_LIMIT,
        "RSS grew {growth} bytes during an upload"
    );
}
