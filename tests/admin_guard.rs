//! The admin listener's guard against cross-site requests (CONTRACT §7, `[admin]
//! allowed_hosts`) and its token scheme, over raw HTTP/1.1 so that each test controls `Host`,
//! `Origin` and `Sec-Fetch-Site` exactly: a browser driven by a foreign page, or by a name
//! rebound to a loopback address, gets 403 on every mutation, while a script such as
//! `curl -X POST` keeps working. Also: a drain path with percent-encoded multi-byte or
//! non-UTF-8 bytes gets 404 and leaves the admin listener serving.
mod common;

use std::net::SocketAddr;

use common::admin::ADMIN;
use common::raw::{RawConn, RawResponse};
use common::*;

/// An admin listener in front of one upstream `app`, with `admin_extra` under `[admin]`.
async fn start(admin_extra: &str) -> (TestUpstream, TestProxy, SocketAddr) {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(
        &[&a],
        &format!("{ADMIN}{admin_extra}\n"),
    ))
    .await;
    let admin = p.admin.expect("admin listener");
    (a, p, admin)
}

/// Sends `method path` on a new connection with exactly `headers` (each line ending in
/// `\r\n`) and reads the answer.
async fn request(admin: SocketAddr, method: &str, path: &str, headers: &str) -> RawResponse {
    let mut c = RawConn::connect(admin).await;
    c.send(
        format!(
            "{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    c.response().await
}

/// `POST /reload` with `headers`.
async fn reload(admin: SocketAddr, headers: &str) -> RawResponse {
    request(admin, "POST", "/reload", headers).await
}

/// `Host: 127.0.0.1:PORT`, as curl sends it.
fn ip_host(admin: SocketAddr) -> String {
    format!("Host: {admin}\r\n")
}

fn text(r: &RawResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Asserts a 403 that names `rule` in its text/plain body.
fn assert_refused(r: &RawResponse, rule: &str) {
    assert_eq!(r.status, 403, "{}", text(r));
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    assert!(text(r).contains(rule), "{:?} lacks {rule:?}", text(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_reload_by_ip_or_localhost_without_origin() {
    let (_a, p, admin) = start("").await;
    let r = reload(admin, &ip_host(admin)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["config_version"], 2);
    let port = admin.port();
    let r = reload(admin, &format!("Host: localhost:{port}\r\n")).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = reload(admin, &format!("Host: LocalHost.:{port}\r\n")).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(admin::config_version(&p).await, 4);

    // HTTP/1.0 without Host: nothing to rebind.
    let mut c = RawConn::connect(admin).await;
    c.send(b"POST /reload HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", text(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused_and_changes_nothing() {
    let (a, p, admin) = start("").await;
    let before = admin::config_version(&p).await;
    let r = reload(admin, "Host: evil.example\r\n").await;
    assert_refused(&r, "host not allowed");
    let port = admin.port();
    let r = reload(admin, &format!("Host: evil.example:{port}\r\n")).await;
    assert_refused(&r, "host not allowed");
    assert_eq!(
        admin::config_version(&p).await,
        before,
        "the refused reload ran"
    );

    // Drain and maintenance are refused the same way, before their path is looked at.
    let drain = format!("/upstreams/app/servers/{}/drain", a.addr);
    let r = request(admin, "POST", &drain, "Host: evil.example\r\n").await;
    assert_refused(&r, "host not allowed");
    let r = request(admin, "POST", "/maintenance", "Host: evil.example\r\n").await;
    assert_refused(&r, "host not allowed");
    let r = request(admin, "DELETE", "/status", "Host: evil.example\r\n").await;
    assert_refused(&r, "host not allowed");
    let r = request(admin, "GET", "/status", &ip_host(admin)).await;
    let status = r.json();
    let server = &status["upstreams"]["app"]["servers"][0];
    assert_eq!(server["draining"], false, "{status}");
    assert_eq!(status["upstreams"]["app"]["maintenance"], false, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hosts_admits_a_name_and_follows_reloads() {
    let (_a, p, admin) = start("allowed_hosts = [\"evil.example\"]").await;
    let r = reload(admin, "Host: evil.example\r\n").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = reload(admin, "Host: EVIL.example.:80\r\n").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = reload(admin, "Host: other.example\r\n").await;
    assert_refused(&r, "host not allowed");

    // The list is read from the config in force: a reload that drops the name refuses it.
    let toml = std::fs::read_to_string(&p.config_path).unwrap();
    let toml = toml.replace("allowed_hosts = [\"evil.example\"]", "");
    std::fs::write(&p.config_path, toml).unwrap();
    let r = reload(admin, &ip_host(admin)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = reload(admin, "Host: evil.example\r\n").await;
    assert_refused(&r, "host not allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_is_refused() {
    let (_a, p, admin) = start("").await;
    let host = ip_host(admin);
    let before = admin::config_version(&p).await;
    for origin in [
        "http://evil.example".to_owned(),
        "null".to_owned(),
        format!("http://127.0.0.1:{}", admin.port() + 1),
        format!("http://localhost:{}", admin.port()),
    ] {
        let r = reload(admin, &format!("{host}Origin: {origin}\r\n")).await;
        assert_refused(&r, "foreign origin");
    }
    assert_eq!(
        admin::config_version(&p).await,
        before,
        "a refused reload ran"
    );

    let r = reload(admin, &format!("{host}Origin: http://{admin}\r\n")).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let port = admin.port();
    let r = reload(
        admin,
        &format!("Host: localhost:{port}\r\nOrigin: http://LOCALHOST:{port}\r\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", text(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_fetch_is_refused() {
    let (_a, _p, admin) = start("").await;
    let host = ip_host(admin);
    let r = reload(admin, &format!("{host}Sec-Fetch-Site: cross-site\r\n")).await;
    assert_refused(&r, "cross-site fetch");
    for site in ["same-origin", "same-site", "none"] {
        let r = reload(admin, &format!("{host}Sec-Fetch-Site: {site}\r\n")).await;
        assert_eq!(r.status, 200, "{site}: {}", text(&r));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_not_guarded() {
    let (_a, _p, admin) = start("").await;
    let foreign =
        "Host: evil.example\r\nOrigin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n";
    for path in ["/status", "/healthz", "/readyz", "/metrics"] {
        let r = request(admin, "GET", path, foreign).await;
        assert_eq!(r.status, 200, "{path}: {}", text(&r));
    }
    let r = request(admin, "GET", "/status", foreign).await;
    assert!(r.json()["config_version"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_scheme_is_case_insensitive_and_the_guard_comes_first() {
    let (_a, p, admin) = start("token = \"s3cret\"").await;
    let host = ip_host(admin);
    for auth in ["bearer s3cret", "BEARER s3cret", "Bearer   s3cret"] {
        let r = reload(admin, &format!("{host}Authorization: {auth}\r\n")).await;
        assert_eq!(r.status, 200, "{auth}: {}", text(&r));
    }
    let r = reload(admin, &format!("{host}Authorization: bearer wrong\r\n")).await;
    assert_eq!(r.status, 401, "{}", text(&r));
    let r = reload(admin, &host).await;
    assert_eq!(r.status, 401, "{}", text(&r));

    // The right token from a cross-site page is still refused.
    let before = admin::config_version(&p).await;
    let auth = "Authorization: Bearer s3cret\r\n";
    let r = reload(
        admin,
        &format!("{host}{auth}Origin: http://evil.example\r\n"),
    )
    .await;
    assert_refused(&r, "foreign origin");
    let r = reload(
        admin,
        &format!("{host}{auth}Sec-Fetch-Site: cross-site\r\n"),
    )
    .await;
    assert_refused(&r, "cross-site fetch");
    let r = reload(admin, &format!("Host: evil.example\r\n{auth}")).await;
    assert_refused(&r, "host not allowed");
    // Without the token, a cross-site request learns nothing about it: 403, not 401.
    let r = reload(admin, "Host: evil.example\r\n").await;
    assert_refused(&r, "host not allowed");
    assert_eq!(
        admin::config_version(&p).await,
        before,
        "a refused reload ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_path_with_multi_byte_escapes_gets_404_and_the_listener_keeps_serving() {
    let (a, _p, admin) = start("").await;
    let host = ip_host(admin);
    let mut c = RawConn::connect(admin).await;
    // Raw multi-byte characters after `%` (hyper accepts UTF-8 in a path), escapes of a
    // multi-byte character, escapes that are not UTF-8, and escapes cut short.
    for addr in [
        "%\u{e9}",
        "%a\u{e9}",
        "%\u{20ac}",
        "%E2%82%AC",
        "%e2%82",
        "%FF",
        "%",
        "%4",
        "%zz",
        "%C3%A9%",
    ] {
        let path = format!("/upstreams/app/servers/{addr}/drain");
        c.send(format!("POST {path} HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(r.status, 404, "{path}: {}", text(&r));
    }
    // The same connection and a new one are still served.
    c.send(format!("GET /healthz HTTP/1.1\r\n{host}\r\n").as_bytes())
        .await;
    assert_eq!(c.response().await.status, 200);
    let r = request(admin, "GET", "/healthz", &host).await;
    assert_eq!(r.status, 200);

    // An escaped colon still names the server.
    let encoded = a.addr.to_string().replace(':', "%3A");
    let r = request(
        admin,
        "POST",
        &format!("/upstreams/app/servers/{encoded}/drain"),
        &host,
    )
    .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["draining"], true);
}
