//! Points where fairway must follow the contract's exact wording, over real sockets: the
//! `name` beside the resolved `addr` in `/status` (CONTRACT §4) and IPv4-mapped entries in
//! `trusted_proxies` (§3).

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

async fn status(p: &TestProxy) -> serde_json::Value {
    let r = get(&format!("http://{}/status", p.admin.unwrap())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

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
    let st = status(&p).await;
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
