//! Response compression (CONTRACT §8 `[compression]`) over real sockets: negotiation from
//! `Accept-Encoding`, what is never compressed, the headers of a compressed response, the
//! per-route override, streaming (a pause in the upstream body flushes what was compressed
//! so far), HTTP/2, and the metrics.
mod common;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::admin::{ADMIN, metrics};
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// A bundle-like text: repetitive enough to compress, varied enough not to be trivial.
fn script(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut i = 0u64;
    while out.len() < len {
        let _ = writeln!(
            out,
            "function f{i}(a,b){{return a*{}+b.length+\"item-{}\";}}",
            i % 97,
            i * 7919 % 1000
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// An upstream whose answer the query describes: `len` bytes of script (default 4096),
/// `type` (default `application/javascript`), and optional `etag`, `vary`, `cc`
/// (Cache-Control), `ce` (Content-Encoding), `status`; `chunked=1` leaves the length out.
/// `/pause` sends 4 KiB, then waits for `release` before sending 4 KiB more.
async fn upstream(release: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let release = Arc::clone(&release);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let release = Arc::clone(&release);
                    async move { Ok::<_, Infallible>(answer(req, release)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type Out = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn answer(req: Request<Incoming>, release: Arc<Notify>) -> Response<Out> {
    let q: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let v = v
                .replace("%2F", "/")
                .replace("%20", " ")
                .replace("%22", "\"");
            (k.to_owned(), v)
        })
        .collect();
    if req.uri().path() == "/pause" {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from(script(4096))))).await;
            release.notified().await;
            let _ = tx.send(Ok(Frame::data(Bytes::from(script(4096))))).await;
        });
        let stream = tokio_stream_of(rx);
        return Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap();
    }
    let len: usize = q.get("len").and_then(|v| v.parse().ok()).unwrap_or(4096);
    let mut b = Response::builder().status(
        q.get("status")
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(200),
    );
    b = b.header(
        "content-type",
        q.get("type")
            .map_or("application/javascript", String::as_str),
    );
    for (k, h) in [
        ("etag", "etag"),
        ("vary", "vary"),
        ("cc", "cache-control"),
        ("ce", "content-encoding"),
    ] {
        if let Some(v) = q.get(k) {
            b = b.header(h, v.as_str());
        }
    }
    let body = Bytes::from(script(len));
    if q.contains_key("chunked") {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(body))).await;
        });
        return b
            .body(BodyExt::boxed(StreamBody::new(tokio_stream_of(rx))))
            .unwrap();
    }
    b.body(BodyExt::boxed(Full::new(body))).unwrap()
}

/// A receiver as a stream of frames.
fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            let mut d = flate2::write::GzDecoder::new(&mut out);
            d.write_all(body).unwrap();
            d.finish().unwrap();
        }
        "br" => {
            let mut d = brotli::DecompressorWriter::new(&mut out, 4096);
            d.write_all(body).unwrap();
            d.close().unwrap();
        }
        "zstd" => {
            out = zstd::stream::decode_all(body).unwrap();
        }
        other => panic!("unexpected encoding {other}"),
    }
    out
}

async fn proxy(addr: SocketAddr, compression: &str, route: &str) -> TestProxy {
    TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n[compression]\n{compression}\n\
         [upstreams.app]\nservers = [\"{addr}\"]\n{route}"
    ))
    .await
}

async fn fetch(p: &TestProxy, path: &str, accept: Option<&str>) -> Reply {
    let mut h = vec![];
    if let Some(a) = accept {
        h.push(("accept-encoding", a));
    }
    let r = get_with(&client(), &p.url(path), &h).await;
    assert_eq!(r.status / 100, 2, "{path}: {}", r.status);
    r
}

fn encoding(r: &Reply) -> Option<&str> {
    r.headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_client_gets_the_best_encoding_it_accepts_and_the_same_bytes() {
    let addr = upstream(Arc::new(Notify::new())).await;
    let p = proxy(addr, "enabled = true", "").await;
    let want = script(100_000);
    for (accept, chosen) in [
        ("gzip, deflate, br, zstd", Some("zstd")),
        ("gzip, br", Some("br")),
        ("br;q=0.5, gzip;q=0.8", Some("gzip")),
        ("gzip", Some("gzip")),
        ("zstd;q=0, *", Some("br")),
        ("*;q=0", None),
        ("identity", None),
        ("deflate", None),
    ] {
        let r = fetch(&p, "/a.js?len=100000", Some(accept)).await;
        assert_eq!(encoding(&r), chosen, "{accept}");
        match chosen {
            Some(e) => {
                assert_eq!(decode(e, &r.body), want, "{accept}");
                assert!(r.body.len() < want.len() / 3, "{accept}: {}", r.body.len());
                assert!(!r.headers.contains_key("content-length"), "{accept}");
                assert_eq!(r.headers["vary"], "Accept-Encoding", "{accept}");
            }
            None => {
                assert_eq!(&r.body[..], &want[..], "{accept}");
                assert!(!r.headers.contains_key("vary"), "{accept}");
            }
        }
    }
    let none = fetch(&p, "/a.js?len=100000", None).await;
    assert_eq!(encoding(&none), None);
    let m = metrics(&p).await;
    for (alg, n) in [("zstd", 1.0), ("br", 2.0), ("gzip", 2.0)] {
        assert_eq!(
            m.get("fairway_compressed_responses_total", &[("algorithm", alg)]),
            Some(n),
            "{alg}"
        );
    }
    let bytes_in = m
        .get("fairway_compression_bytes_total", &[("direction", "in")])
        .unwrap();
    let bytes_out = m
        .get("fairway_compression_bytes_total", &[("direction", "out")])
        .unwrap();
    assert_eq!(bytes_in, 5.0 * 100_000.0);
    assert!(bytes_out > 0.0 && bytes_out < bytes_in / 3.0, "{bytes_out}");
}

#[tokio::test]
async fn what_is_never_compressed() {
    let addr = upstream(Arc::new(Notify::new())).await;
    let p = proxy(addr, "enabled = true\nalgorithms = [\"gzip\"]", "").await;
    for path in [
        "/x?len=1023",                  // below min_length
        "/x?type=image%2Fpng",          // not a listed type
        "/x?ce=br",                     // already encoded
        "/x?cc=public,%20no-transform", // no-transform
        "/x?type=text%2Fevent-stream",  // a stream of events
        "/x?status=206",                // a range
        "/x?status=204&len=0",          // no body
    ] {
        let r = fetch(&p, path, Some("gzip")).await;
        assert_eq!(encoding(&r).filter(|e| *e != "br"), None, "{path}");
    }
    // HEAD: no body and no encoding either.
    let r = send(
        &client(),
        Request::head(p.url("/x?len=5000"))
            .header("accept-encoding", "gzip")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(encoding(&r), None);
    // Unknown length is eligible; a type with parameters matches its type.
    let r = fetch(
        &p,
        "/x?chunked=1&len=3000&type=text%2Fhtml;%20charset=utf-8",
        Some("gzip"),
    )
    .await;
    assert_eq!(encoding(&r), Some("gzip"));
    assert_eq!(decode("gzip", &r.body), script(3000));
}

#[tokio::test]
async fn etag_turns_weak_and_vary_is_merged() {
    let addr = upstream(Arc::new(Notify::new())).await;
    let p = proxy(addr, "enabled = true\nalgorithms = [\"gzip\"]", "").await;
    let r = fetch(&p, "/x?etag=%22abc%22&vary=Origin", Some("gzip")).await;
    assert_eq!(encoding(&r), Some("gzip"));
    assert_eq!(r.headers["etag"], "W/\"abc\"");
    let vary: Vec<_> = r.headers.get_all("vary").iter().collect();
    let joined = vary
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect::<Vec<_>>()
        .join(", ")
        .to_ascii_lowercase();
    assert!(
        joined.contains("origin") && joined.contains("accept-encoding"),
        "{joined}"
    );
    let r = fetch(&p, "/x?etag=W%2F%22abc%22", Some("gzip")).await;
    assert_eq!(r.headers["etag"], "W/\"abc\"");
}

#[tokio::test]
async fn a_route_overrides_enabled_either_way() {
    let addr = upstream(Arc::new(Notify::new())).await;
    let routes = "[[routes]]\npath_prefix = \"/raw\"\nupstream = \"app\"\ncompression = false\n\
                  [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n";
    let p = proxy(addr, "enabled = true", routes).await;
    assert_eq!(encoding(&fetch(&p, "/raw/a", Some("gzip")).await), None);
    assert_eq!(encoding(&fetch(&p, "/a", Some("gzip")).await), Some("gzip"));
    let routes = "[[routes]]\npath_prefix = \"/assets\"\nupstream = \"app\"\ncompression = true\n\
                  [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n";
    let p = proxy(addr, "", routes).await;
    assert_eq!(
        encoding(&fetch(&p, "/assets/a", Some("gzip")).await),
        Some("gzip")
    );
    assert_eq!(encoding(&fetch(&p, "/a", Some("gzip")).await), None);
}

/// A pause in the upstream body flushes what was compressed so far: the client decodes the
/// first half before the upstream sends the second.
#[tokio::test]
async fn a_pause_in_the_upstream_body_flushes_what_was_compressed() {
    for alg in ["gzip", "br", "zstd"] {
        let release = Arc::new(Notify::new());
        let addr = upstream(Arc::clone(&release)).await;
        let p = proxy(addr, "enabled = true", "").await;
        let resp = client()
            .request(
                Request::get(p.url("/pause"))
                    .header("accept-encoding", alg)
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-encoding"], alg);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        // Streaming decoders: what the client can decode so far.
        let first = script(4096);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let decoded_so_far = |bytes: &[u8]| -> usize {
            let mut out = Vec::new();
            match alg {
                "gzip" => {
                    let mut d = flate2::write::GzDecoder::new(&mut out);
                    let _ = d.write_all(bytes);
                    let _ = d.flush();
                    drop(d);
                }
                "br" => {
                    let mut d = brotli::DecompressorWriter::new(&mut out, 4096);
                    let _ = d.write_all(bytes);
                    let _ = d.flush();
                    drop(d);
                }
                _ => {
                    let mut d = zstd::stream::write::Decoder::new(&mut out).unwrap();
                    let _ = d.write_all(bytes);
                    let _ = d.flush();
                    drop(d);
                }
            }
            out.len()
        };
        while decoded_so_far(&got) < first.len() {
            let frame = tokio::time::timeout_at(deadline, body.frame())
                .await
                .unwrap_or_else(|_| panic!("{alg}: the first half was held back"))
                .unwrap()
                .unwrap();
            if let Ok(d) = frame.into_data() {
                got.extend_from_slice(&d);
            }
        }
        release.notify_one();
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                got.extend_from_slice(&d);
            }
        }
        let mut want = script(4096);
        want.extend_from_slice(&script(4096));
        assert_eq!(decode(alg, &got), want, "{alg}");
    }
}

#[tokio::test]
async fn http2_clients_get_compressed_streams_too() {
    let addr = upstream(Arc::new(Notify::new())).await;
    let p = proxy(addr, "enabled = true", "").await;
    let r = get_with(
        &h2c_client(),
        &p.url("/a.js?len=50000"),
        &[("accept-encoding", "br")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(encoding(&r), Some("br"));
    assert_eq!(decode("br", &r.body), script(50_000));
}

#[test]
fn check_names_bad_compression_values() {
    for (text, key) in [
        ("algorithms = [\"deflate\"]", "compression.algorithms"),
        ("algorithms = []", "compression.algorithms"),
        (
            "algorithms = [\"gzip\", \"gzip\"]",
            "compression.algorithms[1]",
        ),
        ("types = [\"html\"]", "compression.types[0]"),
        ("level = \"max\"", "compression.level"),
        ("min_length = \"big\"", "compression.min_length"),
    ] {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[compression]\nenabled = true\n{text}\n\
             [upstreams.a]\nservers = [\"127.0.0.1:2\"]\n"
        );
        let e = fairway::config::parse(std::path::Path::new("f.toml"), &toml)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml:5:") && e.contains(key), "{text}: {e}");
    }
}
