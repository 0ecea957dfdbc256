//! Points where fairway must follow the contract's exact wording, over real sockets: the
//! `name` beside the resolved `addr` in `/status` (CONTRACT §4), IPv4-mapped entries in
//! `trusted_proxies` (§3), and escaping of what the client sent in the `common` access
//! log (§7), read from the real binary's stdout.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::admin::ADMIN;
use common::process::{Proc, fairway, log_level};
use common::raw::RawConn;
use common::*;
use http::Request;
use http_body_util::Full;

// ---------------------------------------------------------------------------------------
// /status: `name` as written beside `addr`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_entry_as_written_beside_the_address_connected_to() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let by_name = format!("localhost:{}", a.addr.port());
    let by_ip = b.addr.to_string();
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n\
         [upstreams.app]\nservers = [\"{by_name}\", \"{by_ip}\"]\n"
    ))
    .await;
    let st = admin::status(&p).await;
    let servers = st["upstreams"]["app"]["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("no servers: {st}"));

    // The host-name entry: one server per address it resolved to, each named as written.
    let named: Vec<&serde_json::Value> = servers
        .iter()
        .filter(|s| s["name"] == by_name.as_str())
        .collect();
    assert!(!named.is_empty(), "no server named {by_name}: {st}");
    for s in &named {
        let addr: SocketAddr = s["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("addr is not IP:PORT: {s}"));
        assert!(
            addr.ip().is_loopback() && addr.port() == a.addr.port(),
            "{s}"
        );
    }
    assert!(
        named
            .iter()
            .any(|s| s["addr"] == a.addr.to_string().as_str()),
        "{by_name} did not resolve to {}: {st}",
        a.addr
    );

    // The IP entry: name and addr are the same.
    let ip: Vec<&serde_json::Value> = servers
        .iter()
        .filter(|s| s["addr"] == by_ip.as_str())
        .collect();
    assert_eq!(ip.len(), 1, "{st}");
    assert_eq!(ip[0]["name"], by_ip.as_str(), "{st}");
    assert_eq!(servers.len(), named.len() + 1, "{st}");
}

// ---------------------------------------------------------------------------------------
// trusted_proxies: IPv4-mapped entries

async fn forwarded_by(trusted: &str, up: &TestUpstream) -> (Vec<String>, Vec<String>) {
    let p = TestProxy::start(&proxy_config(
        &format!("trusted_proxies = [\"{trusted}\"]"),
        &[up],
    ))
    .await;
    let r = send(
        &client(),
        Request::get(p.url("/"))
            .header("x-forwarded-for", "203.0.113.7")
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    (
        r.seen_header("x-forwarded-for").unwrap_or_default(),
        r.seen_header("x-real-ip").unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_trusted_proxy_matches_its_ipv4_peer() {
    let a = TestUpstream::start("a").await;
    let (xff, real) = forwarded_by("::ffff:127.0.0.1", &a).await;
    assert_eq!(xff, ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(real, ["203.0.113.7"]);

    let (xff, real) = forwarded_by("::ffff:127.0.0.0/104", &a).await;
    assert_eq!(xff, ["203.0.113.7, 127.0.0.1"]);
    assert_eq!(real, ["203.0.113.7"]);

    // Another mapped address does not make the peer trusted: the header is replaced.
    let (xff, real) = forwarded_by("::ffff:10.0.0.1", &a).await;
    assert_eq!(xff, ["127.0.0.1"]);
    assert_eq!(real, ["127.0.0.1"]);
}

// ---------------------------------------------------------------------------------------
// The common access log escapes what the client sent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_common_access_log_escapes_the_request_target() {
    let up = TestUpstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fairway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"common\"\n\n\
             [upstreams.app]\nservers = [\"{}\"]\n",
            up.addr
        ),
    )
    .unwrap();
    let mut cmd = fairway(&["run", "--config", config.to_str().unwrap()]);
    cmd.env("RUST_LOG", log_level("warn"))
        .stdout(Stdio::piped());
    let mut proc = Proc::spawn(cmd);
    let addr = proc.client_addr().await;

    // `"` and `\` and UTF-8 in the target pass hyper's parser and go upstream as they are.
    let mut conn = RawConn::connect(addr).await;
    conn.send(
        "GET /a\"b\\c/é?q=\\1 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n".as_bytes(),
    )
    .await;
    let r = conn.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["uri"], "/a\"b\\c/é?q=\\1");

    let line = proc.stdout_line(Duration::from_secs(5)).await;
    assert!(line.is_ascii(), "{line:?}");
    assert!(
        line.contains(r#" "GET /a\x22b\x5Cc/\xC3\xA9?q=\x5C1 HTTP/1.1" 200 "#),
        "{line:?}"
    );
    proc.signal("TERM");
    proc.expect_clean_exit(Duration::from_secs(10)).await;
}
