//! Routing (CONTRACT §2 `[[routes]]`): exact host before `*.suffix` before any host, then
//! the longest path-segment prefix; a plain-text 404 when nothing matches; the only upstream
//! gets everything when there are no routes. Then routing on the normalized path (RFC 3986
//! §5.2.4 and §6.2.2.2): dot segments and escaped unreserved characters cannot reach another
//! route than the one the application resolves the path to, the routed path is the one sent
//! upstream, and an encoded `/` or encoded dot segment that would change the route gets 400.
//! Those requests go as raw HTTP/1.1 bytes so that no client rewrites the path on the way.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::raw::{RawConn, RawResponse};
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// 1. Hosts and path prefixes

/// Upstreams `a` and `b`, then `routes`.
fn routed_config(a: &TestUpstream, b: &TestUpstream, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.a]\nservers = [\"{}\"]\n\n[upstreams.b]\nservers = [\"{}\"]\n\n{routes}",
        a.addr, b.addr
    )
}

/// The upstream that answered `host` + `path`, or the status when the proxy answered.
async fn route_of(p: &TestProxy, host: &str, path: &str) -> String {
    let r = get_with(&client(), &p.url(path), &[("host", host)]).await;
    if r.status == 200 {
        r.upstream()
    } else {
        r.status.to_string()
    }
}

/// An absolute-form target's authority wins over `Host` (RFC 9112 §3.2.2): the request is
/// routed by it and the upstream gets it as `Host`, so the route and the application cannot
/// disagree about the host.
#[tokio::test]
async fn an_absolute_form_target_wins_over_host() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let routes = "[[routes]]\nhost = \"a.example\"\nupstream = \"a\"\n\n\
                  [[routes]]\nhost = \"b.example\"\nupstream = \"b\"\n";
    let p = TestProxy::start(&routed_config(&a, &b, routes)).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(b"GET http://a.example:8080/x?y=1 HTTP/1.1\r\nHost: b.example\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("a"));
    let j = r.json();
    assert_eq!(j["uri"], "/x?y=1");
    assert_eq!(j["headers"]["host"], serde_json::json!(["a.example:8080"]));
    // Origin form: Host decides, as before.
    c.send(b"GET /x HTTP/1.1\r\nHost: b.example\r\n\r\n").await;
    assert_eq!(c.response().await.header("x-upstream"), Some("b"));
}

#[tokio::test]
async fn routes_by_host_wildcard_and_path_segments() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let routes = r#"
[[routes]]
host = "app.example"
upstream = "a"

[[routes]]
host = "app.example"
path_prefix = "/api"
upstream = "b"

[[routes]]
host = "app.example"
path_prefix = "/api/v2/"
upstream = "a"

[[routes]]
host = "*.wild.example"
upstream = "b"

[[routes]]
path_prefix = "/static"
upstream = "a"
"#;
    let p = TestProxy::start(&routed_config(&a, &b, routes)).await;
    let cases = [
        ("app.example", "/", "a"),
        ("app.example", "/x", "a"),
        ("app.example", "/api", "b"),
        ("app.example", "/api/", "b"),
        ("app.example", "/api/x?y=1", "b"),
        ("app.example", "/apix", "a"),
        ("app.example", "/api/v2", "a"),
        ("app.example", "/api/v2/users", "a"),
        ("app.example", "/api/v20", "b"),
        ("app.example:8080", "/api/x", "b"),
        ("APP.Example", "/api/x", "b"),
        ("foo.wild.example", "/anything", "b"),
        ("a.b.wild.example", "/api", "b"),
        ("wild.example", "/static/x.js", "a"),
        ("other.example", "/static", "a"),
        ("other.example", "/static/app.js", "a"),
        ("wild.example", "/x", "404"),
        ("other.example", "/staticx", "404"),
        ("other.example", "/", "404"),
    ];
    for (host, path, want) in cases {
        assert_eq!(route_of(&p, host, path).await, want, "{host} {path}");
    }
}

#[tokio::test]
async fn the_most_specific_host_wins_before_the_longest_prefix() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let routes = r#"
[[routes]]
path_prefix = "/api/deep"
upstream = "b"

[[routes]]
host = "x.example"
upstream = "a"

[[routes]]
host = "*.example"
path_prefix = "/long/prefix"
upstream = "b"
"#;
    let p = TestProxy::start(&routed_config(&a, &b, routes)).await;
    assert_eq!(route_of(&p, "x.example", "/api/deep").await, "a");
    assert_eq!(route_of(&p, "x.example", "/long/prefix").await, "a");
    assert_eq!(route_of(&p, "y.example", "/long/prefix/z").await, "b");
    assert_eq!(route_of(&p, "y.example", "/api/deep").await, "b");
    assert_eq!(route_of(&p, "other.org", "/api/deep/er").await, "b");
    assert_eq!(route_of(&p, "y.example", "/other").await, "404");
}

#[tokio::test]
async fn no_matching_route_is_a_plain_text_404() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let routes = "[[routes]]\nhost = \"app.example\"\nupstream = \"a\"\n";
    let p = TestProxy::start(&routed_config(&a, &b, routes)).await;
    let r = get_with(&client(), &p.url("/x"), &[("host", "nope.example")]).await;
    assert_eq!(r.status, 404);
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/plain"), "{ct}");
    assert!(!r.body.is_empty());
    assert!(r.headers.get("x-upstream").is_none());
    assert_eq!(a.hits() + b.hits(), 0);
    // h2c requests are routed by their `:authority`.
    let (status, body) = h2_get(p.addr, "http://nope.example/h2").await;
    assert_eq!(status, 404);
    assert!(!body.is_empty());
    let (status, body) = h2_get(p.addr, "http://app.example:8443/h2").await;
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["name"], "a");
    assert_eq!(
        j["headers"]["host"],
        serde_json::json!(["app.example:8443"])
    );
}

/// GET `uri` over h2c prior knowledge on a connection to `addr`, whatever the URI's host
/// (so that `:authority` can name a host that does not resolve).
async fn h2_get(addr: SocketAddr, uri: &str) -> (u16, Bytes) {
    use http_body_util::BodyExt;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get(uri).body(Full::<Bytes>::default()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("h2 request timed out")
        .expect("h2 request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

#[tokio::test]
async fn with_no_routes_the_only_upstream_gets_everything() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    for (host, path) in [
        ("anything.example", "/"),
        ("other", "/deep/path?q"),
        ("1.2.3.4:99", "/x"),
    ] {
        let r = get_with(&client(), &p.url(path), &[("host", host)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.upstream(), "a");
    }
    assert_eq!(a.hits(), 3);
}

// ---------------------------------------------------------------------------------------
// 2. The normalized path

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
