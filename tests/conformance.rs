//! Points where fairway must follow the contract's exact wording, over real sockets:
//! IPv4-mapped entries in `trusted_proxies` (CONTRACT §3).

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

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
