//! Routing on the normalized path (CONTRACT §2 `[[routes]]`, RFC 3986 §5.2.4 and
//! §6.2.2.2): dot segments and escaped unreserved characters cannot reach another route than
//! the one the application resolves the path to, the routed path is the one sent upstream,
//! and an encoded `/` or encoded dot segment that would change the route gets 400. Requests
//! go as raw HTTP/1.1 bytes so that no client rewrites the path on the way.

mod common;

use std::net::SocketAddr;

use common::raw::{RawConn, RawResponse};
use common::*;
use http::Request;
use http_body_util::Full;

/// Upstream `a` takes every path, `b` the `/api` prefix.
async fn start() -> (TestUpstream, TestUpstream, TestProxy) {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.a]\nservers = [\"{}\"]\n\n[upstreams.b]\nservers = [\"{}\"]\n\n\
         [[routes]]\nupstream = \"a\"\n\n\
         [[routes]]\npath_prefix = \"/api\"\nupstream = \"b\"\n",
        a.addr, b.addr
    );
    let p = TestProxy::start(&toml).await;
    (a, b, p)
}

/// Sends `GET target` exactly as written and reads the answer.
async fn get_raw(addr: SocketAddr, target: &str) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    let head = format!("GET {target} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n");
    c.send(head.as_bytes()).await;
    c.response().await
}

/// The upstream that answered and the request target it received.
fn answered(r: &RawResponse) -> (String, String) {
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    (
        j["name"].as_str().unwrap_or_default().to_owned(),
        j["uri"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A 400 from the proxy itself, closing the connection, with nothing sent upstream.
fn refused(r: &RawResponse, a: &TestUpstream, b: &TestUpstream) {
    assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!((a.hits(), b.hits()), (0, 0));
}

#[tokio::test]
async fn a_dot_segment_routes_like_the_path_without_it() {
    let (_a, _b, p) = start().await;
    let r = get_raw(p.addr, "/./api/x").await;
    assert_eq!(answered(&r), ("b".into(), "/api/x".into()));
}

#[tokio::test]
async fn an_escaped_unreserved_character_routes_decoded_and_the_query_is_kept_as_sent() {
    let (_a, _b, p) = start().await;
    let r = get_raw(p.addr, "/%61pi/x?q=%2E").await;
    assert_eq!(answered(&r), ("b".into(), "/api/x?q=%2E".into()));
}

#[tokio::test]
async fn a_dot_dot_segment_routes_on_the_resolved_path() {
    let (_a, _b, p) = start().await;
    let r = get_raw(p.addr, "/public/../api/x").await;
    assert_eq!(answered(&r), ("b".into(), "/api/x".into()));
    let r = get_raw(p.addr, "/api/../x").await;
    assert_eq!(answered(&r), ("a".into(), "/x".into()));
}

#[tokio::test]
async fn an_encoded_dot_dot_segment_that_changes_the_route_gets_400() {
    let (a, b, p) = start().await;
    let r = get_raw(p.addr, "/public/%2E%2E/api/x").await;
    refused(&r, &a, &b);
}

#[tokio::test]
async fn an_encoded_dot_dot_segment_that_keeps_the_route_is_resolved() {
    let (_a, _b, p) = start().await;
    let r = get_raw(p.addr, "/api/v1/%2e%2e/x").await;
    assert_eq!(answered(&r), ("b".into(), "/api/x".into()));
}

#[tokio::test]
async fn climbing_above_the_root_gets_400() {
    let (a, b, p) = start().await;
    for target in ["/../x", "/api/../../x", "/%2E%2E/api/x"] {
        let r = get_raw(p.addr, target).await;
        refused(&r, &a, &b);
    }
}

#[tokio::test]
async fn an_encoded_slash_that_keeps_the_route_is_sent_encoded() {
    let (_a, _b, p) = start().await;
    let r = get_raw(p.addr, "/api/a%2Fb").await;
    assert_eq!(answered(&r), ("b".into(), "/api/a%2Fb".into()));
    // Decoded, `/api/x/../y` is still under `/api`.
    let r = get_raw(p.addr, "/api/x%2F..%2Fy").await;
    assert_eq!(answered(&r), ("b".into(), "/api/x%2F..%2Fy".into()));
}

#[tokio::test]
async fn an_encoded_slash_that_would_reach_another_route_gets_400() {
    let (a, b, p) = start().await;
    // As sent the path is under `/` (upstream a); decoded, `/x/../api/y` is under `/api`.
    for target in ["/x%2F..%2Fapi/y", "/x%2f%2E%2E%2fapi"] {
        let r = get_raw(p.addr, target).await;
        refused(&r, &a, &b);
    }
}

#[tokio::test]
async fn an_encoded_slash_that_would_climb_above_the_root_gets_400() {
    let (a, b, p) = start().await;
    let r = get_raw(p.addr, "/api/..%2F..%2F..%2Fetc/passwd").await;
    refused(&r, &a, &b);
}

#[tokio::test]
async fn h2c_dot_segments_are_resolved_the_same_way() {
    let (a, b, p) = start().await;
    let c = h2c_client();
    let get = |path: &str| Request::get(p.url(path)).body(Full::default()).unwrap();
    let r = send(&c, get("/./api/x?q=1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), "b");
    assert_eq!(r.json()["uri"], "/api/x?q=1");
    // The client sends `:path` as written: a 400 here shows that `/./` above reached the
    // proxy too.
    let r = send(&c, get("/../x")).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(b.hits(), 1);
    assert_eq!(a.hits(), 0);
}
