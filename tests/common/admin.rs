//! The admin listener of a [`TestProxy`] as operators use it: its URLs, requests with or
//! without the token, `/status` and the servers it lists, and `/metrics` parsed.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;

use super::prometheus::{self, Exposition};
use super::{Reply, TestProxy, client, get, send};

/// The `[admin]` section on port 0: appended to a config, it turns the admin listener on.
pub const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// A config with `[server]` and `[admin]` on port 0, then `rest` (upstreams, routes).
pub fn config(rest: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n{rest}")
}

/// `http://ADMIN_ADDR{path}`.
pub fn url(p: &TestProxy, path: &str) -> String {
    format!("http://{}{path}", p.admin.expect("admin listener"))
}

/// A request to the admin listener on a fresh client, with a bearer token if given (and a
/// JSON content type if there is a body).
pub async fn request(
    p: &TestProxy,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Reply {
    let mut b = Request::builder().method(method).uri(url(p, path));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    send(
        &client(),
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
    )
    .await
}

/// `POST path` with `body` and no token.
pub async fn post(p: &TestProxy, path: &str, body: &str) -> Reply {
    request(p, Method::POST, path, None, body).await
}

/// The `/status` document (which must answer 200).
pub async fn status(p: &TestProxy) -> serde_json::Value {
    let r = get(&url(p, "/status")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// `config_version` in `/status`.
pub async fn config_version(p: &TestProxy) -> u64 {
    status(p).await["config_version"]
        .as_u64()
        .expect("config_version in /status")
}

/// The servers `/status` lists for `upstream` (none if it lists no such upstream).
pub fn servers<'a>(status: &'a serde_json::Value, upstream: &str) -> &'a [serde_json::Value] {
    status["upstreams"][upstream]["servers"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

/// The `/status` entry of server `addr` in `upstream`, if listed.
pub fn find_server<'a>(
    status: &'a serde_json::Value,
    upstream: &str,
    addr: &str,
) -> Option<&'a serde_json::Value> {
    servers(status, upstream).iter().find(|s| s["addr"] == addr)
}

/// The `/status` entry of server `addr` in `upstream`, which must be listed.
pub fn server_entry<'a>(
    status: &'a serde_json::Value,
    upstream: &str,
    addr: &str,
) -> &'a serde_json::Value {
    find_server(status, upstream, addr)
        .unwrap_or_else(|| panic!("no server {addr} in {upstream}: {status}"))
}

/// Scrapes `/metrics`, checks the answer's status and content type, and parses the body.
pub async fn metrics(p: &TestProxy) -> Exposition {
    let r = get(&url(p, "/metrics")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    prometheus::parse(&text).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}"))
}
