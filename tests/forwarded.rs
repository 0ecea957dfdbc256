//! What the upstream learns about the client (CONTRACT §3): `X-Forwarded-For`, `-Proto`,
//! `-Host` and `X-Real-IP` set for an untrusted peer and extended for a trusted proxy,
//! underscore spellings of the forwarded headers, RFC 7239 `Forwarded`, HTTP/2 cookie crumbs
//! on the way to an HTTP/1.1 upstream, and an HTTP/2 request without an authority.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::raw::RawConn;
use common::*;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// Sends `head` (a whole HTTP/1.1 request without a body) on a new connection and returns
/// the headers the upstream received, as the echo JSON lists them.
async fn seen_over_raw(p: &TestProxy, head: &str) -> Value {
    let mut c = RawConn::connect(p.addr).await;
    c.send(head.as_bytes()).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["headers"].clone()
}

/// The names with `_` among the headers the upstream received.
fn underscore_names(seen: &Value) -> Vec<String> {
    let mut names: Vec<String> = seen
        .as_object()
        .expect("headers object")
        .keys()
        .filter(|k| k.contains('_'))
        .cloned()
        .collect();
    names.sort_unstable();
    names
}

const UNDERSCORE_HEAD: &str = "GET /u HTTP/1.1\r\nHost: app.example\r\n\
    X-Forwarded-For: 203.0.113.7\r\n\
    X_Forwarded_For: 6.6.6.6\r\nX-Forwarded_For: 6.6.6.6\r\nX-Real_IP: 6.6.6.6\r\n\
    X_Forwarded_Proto: https\r\nX_Forwarded_Host: evil.example\r\n\
    X_Forwarded_Port: 443\r\nX-Forwarded_Prefix: /admin\r\n\
    X_Request_Id: r-1\r\nX_Custom: kept\r\n\r\n";

// ---------------------------------------------------------------------------------------
// 1. X-Forwarded-* and X-Real-IP

#[tokio::test]
async fn forwarded_headers_forged_by_an_untrusted_client_are_replaced() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let mut c = RawConn::connect(p.addr).await;
    c.send(
        b"GET /f HTTP/1.1\r\nHost: app.example:1234\r\n\
          X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7, 8.8.8.8\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
          X-Real-IP: 6.6.6.6\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(
        h["x-forwarded-host"],
        serde_json::json!(["app.example:1234"])
    );
    assert_eq!(h["x-real-ip"], serde_json::json!(["127.0.0.1"]));
}

#[tokio::test]
async fn forwarded_headers_are_set_when_the_client_sent_none() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let r = get_with(&client(), &p.url("/f"), &[("host", "app.example")]).await;
    assert_eq!(r.seen_one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen_one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.seen_one("x-forwarded-host").as_deref(),
        Some("app.example")
    );
    assert_eq!(r.seen_one("x-real-ip").as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarded_headers_and_the_peer_is_appended() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("trusted_proxies = [\"127.0.0.0/8\"]", &[&a])).await;
    let r = get_with(
        &client(),
        &p.url("/f"),
        &[
            ("host", "app.example"),
            ("x-forwarded-for", "203.0.113.7, 198.51.100.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "front.example"),
            ("x-real-ip", "192.0.2.1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_one("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 198.51.100.2, 127.0.0.1")
    );
    assert_eq!(r.seen_one("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        r.seen_one("x-forwarded-host").as_deref(),
        Some("front.example")
    );
    assert_eq!(r.seen_one("x-real-ip").as_deref(), Some("192.0.2.1"));
}

#[tokio::test]
async fn a_trusted_proxy_without_x_real_ip_gets_the_rightmost_untrusted_address() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("trusted_proxies = [\"127.0.0.0/8\"]", &[&a])).await;
    // 127.0.0.9 is trusted, so the client is the address before it.
    let r = get_with(
        &client(),
        &p.url("/f"),
        &[
            ("host", "app.example"),
            ("x-forwarded-for", "10.1.1.1, 203.0.113.7, 127.0.0.9"),
        ],
    )
    .await;
    assert_eq!(
        r.seen_one("x-forwarded-for").as_deref(),
        Some("10.1.1.1, 203.0.113.7, 127.0.0.9, 127.0.0.1")
    );
    assert_eq!(r.seen_one("x-real-ip").as_deref(), Some("203.0.113.7"));
    // Not sent by the trusted peer: set by the proxy.
    assert_eq!(r.seen_one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.seen_one("x-forwarded-host").as_deref(),
        Some("app.example")
    );

    // No X-Forwarded-For at all: the trusted peer is the client.
    let r = get_with(&client(), &p.url("/f"), &[("host", "app.example")]).await;
    assert_eq!(r.seen_one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen_one("x-real-ip").as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_peer_outside_trusted_proxies_is_not_trusted() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("trusted_proxies = [\"10.0.0.0/8\"]", &[&a])).await;
    let r = get_with(
        &client(),
        &p.url("/f"),
        &[
            ("host", "app.example"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(r.seen_one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen_one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(r.seen_one("x-real-ip").as_deref(), Some("127.0.0.1"));
}

// ---------------------------------------------------------------------------------------
// 2. Underscore spellings

#[tokio::test]
async fn underscore_spellings_are_removed_from_an_untrusted_peer() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let seen = seen_over_raw(&p, UNDERSCORE_HEAD).await;
    // Only names outside the forwarded list pass.
    assert_eq!(underscore_names(&seen), ["x_custom", "x_request_id"]);
    assert_eq!(seen["x-forwarded-for"], json!(["127.0.0.1"]));
    assert_eq!(seen["x-real-ip"], json!(["127.0.0.1"]));
    assert_eq!(seen["x-forwarded-proto"], json!(["http"]));
    assert_eq!(seen["x-forwarded-host"], json!(["app.example"]));
}

#[tokio::test]
async fn underscore_spellings_are_removed_from_a_trusted_peer() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("trusted_proxies = [\"127.0.0.1/32\"]", &[&a])).await;
    let seen = seen_over_raw(&p, UNDERSCORE_HEAD).await;
    assert_eq!(underscore_names(&seen), ["x_custom", "x_request_id"]);
    // The canonical names from the trusted peer are kept and appended to as usual.
    assert_eq!(seen["x-forwarded-for"], json!(["203.0.113.7, 127.0.0.1"]));
    assert_eq!(seen["x-real-ip"], json!(["203.0.113.7"]));
}

// ---------------------------------------------------------------------------------------
// 3. RFC 7239 `Forwarded`

#[tokio::test]
async fn forwarded_from_an_untrusted_peer_is_replaced() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let seen = seen_over_raw(
        &p,
        "GET /f HTTP/1.1\r\nHost: app.example:8080\r\n\
         Forwarded: for=6.6.6.6;proto=https;host=evil.example\r\n\
         Forwarded: for=7.7.7.7\r\n\r\n",
    )
    .await;
    assert_eq!(
        seen["forwarded"],
        json!(["for=127.0.0.1;proto=http;host=\"app.example:8080\""])
    );
}

#[tokio::test]
async fn forwarded_is_set_when_the_client_sent_none() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let seen = seen_over_raw(&p, "GET /f HTTP/1.1\r\nHost: app.example\r\n\r\n").await;
    assert_eq!(
        seen["forwarded"],
        json!(["for=127.0.0.1;proto=http;host=app.example"])
    );
    // An HTTP/2 client's `:authority` is the host.
    let r = send(
        &h2c_client(),
        http::Request::get(p.url("/f"))
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await;
    let host = format!("for=127.0.0.1;proto=http;host=\"{}\"", p.addr);
    assert_eq!(r.seen_header("forwarded"), Some(vec![host]));
}

#[tokio::test]
async fn forwarded_from_a_trusted_peer_gets_the_element_appended() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("trusted_proxies = [\"127.0.0.1/32\"]", &[&a])).await;
    let seen = seen_over_raw(
        &p,
        "GET /f HTTP/1.1\r\nHost: app.example\r\n\
         Forwarded: for=203.0.113.7;proto=https;host=front.example\r\n\
         Forwarded: for=\"[2001:db8::7]\"\r\n\r\n",
    )
    .await;
    assert_eq!(
        seen["forwarded"],
        json!([
            "for=203.0.113.7;proto=https;host=front.example, for=\"[2001:db8::7]\", \
             for=127.0.0.1;proto=http;host=app.example"
        ])
    );
}

// ---------------------------------------------------------------------------------------
// 4. HTTP/2 cookie crumbs (RFC 9113 §8.2.3)

#[tokio::test]
async fn http2_cookie_crumbs_reach_an_http11_upstream_as_one_cookie() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let req = http::Request::get(p.url("/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(http_body_util::Full::default())
        .unwrap();
    let r = send(&h2c_client(), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(r.seen_header("cookie"), Some(vec!["a=1; b=2".to_owned()]));
}

#[tokio::test]
async fn http11_cookie_lines_pass_as_they_are() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let seen = seen_over_raw(
        &p,
        "GET /c HTTP/1.1\r\nHost: app.example\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    )
    .await;
    assert_eq!(seen["cookie"], json!(["a=1", "b=2"]));
}

// ---------------------------------------------------------------------------------------
// 5. HTTP/2 without `:authority`

/// Sends `req` on an h2 connection and reads the whole answer.
async fn h2_send(h2: &h2::client::SendRequest<Bytes>, req: http::Request<()>) -> (u16, Bytes) {
    let mut ready = h2.clone().ready().await.expect("h2 connection not ready");
    let (resp, _) = ready.send_request(req, true).expect("h2 request refused");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("no h2 answer within 5 s")
        .expect("h2 stream failed");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("h2 body failed");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, out.freeze())
}

#[tokio::test]
async fn http2_request_without_authority_or_host_is_400() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("", &[&a])).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // A relative URI in an HTTP/1.1-versioned request: the h2 crate sends `:scheme` and
    // `:path` with no `:authority` (hyper's client always sets one).
    let (status, body) = h2_send(&h2, http::Request::get("/no-authority").body(()).unwrap()).await;
    assert_eq!(status, 400, "{body:?}");
    assert_eq!(a.hits(), 0);
    // `Host` without `:authority` is enough.
    let req = http::Request::get("/host-only")
        .header("host", "app.example")
        .body(())
        .unwrap();
    let (status, body) = h2_send(&h2, req).await;
    assert_eq!(status, 200, "{body:?}");
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["host"], json!(["app.example"]));
    // The connection still serves an ordinary request.
    let uri = format!("http://{}/after", p.addr);
    let (status, _) = h2_send(&h2, http::Request::get(uri).body(()).unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(a.hits(), 2);
}
