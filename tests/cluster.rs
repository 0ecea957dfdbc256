//! The proxy in front of a cluster of nodes (CONTRACT §2, §4 and the §7 rows they add): the
//! PROXY protocol from trusted load balancers, `ip_hash` with `hash_prefix_v4`, replicas of
//! the proxy that agree on the client → server mapping, and a rolling upgrade with
//! drain/undrain under traffic. Servers discovered through DNS are in `dns_discovery.rs`.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::raw::{RawConn, RawResponse};
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------
// 1. PROXY protocol

fn pp_config(trusted: &str, ups: &[&TestUpstream], upstream_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [{trusted}]\n\n\
         [upstreams.app]\nservers = [{}]\n{upstream_extra}\n",
        quoted(ups)
    )
}

fn v1(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 {sport} 80\r\n").into_bytes()
}

/// A v2 PROXY header: signature, version 2 PROXY, TCP over IPv4, 12 address bytes.
fn v2(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

/// One request on a new connection that starts with `header`.
async fn via_proxy_protocol(addr: SocketAddr, header: &[u8], extra: &str) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(
        format!("GET /pp HTTP/1.1\r\nHost: app.example\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    c.send(&bytes).await;
    c.response().await
}

/// Sends `bytes` on a new connection; the proxy must close it without a byte of answer.
async fn closed_without_answer(addr: SocketAddr, bytes: &[u8]) {
    let mut c = RawConn::connect(addr).await;
    // The proxy may already have closed it: a failed write is part of being refused.
    let _ = c.stream.write_all(bytes).await;
    let closed = c.closed_within(Duration::from_secs(3)).await;
    assert!(closed.is_some(), "connection still open after 3 s");
    assert!(
        c.buf.is_empty(),
        "got an answer: {:?}",
        String::from_utf8_lossy(&c.buf)
    );
}

fn seen(r: &RawResponse, header: &str) -> Vec<String> {
    r.json()["headers"][header]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_carry_the_client_address() {
    let up = TestUpstream::start("pp").await;
    let p = TestProxy::start(&pp_config("\"127.0.0.1/32\"", &[&up], "")).await;
    let client_ip = Ipv4Addr::new(203, 0, 113, 7);

    let r = via_proxy_protocol(p.addr, &v1(client_ip, 5555), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "x-forwarded-for"), ["203.0.113.7"]);
    assert_eq!(seen(&r, "x-real-ip"), ["203.0.113.7"]);

    // The carried client is not a trusted proxy: what it claims is replaced.
    let forged = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n";
    let r = via_proxy_protocol(p.addr, &v1(client_ip, 5555), forged).await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "x-forwarded-for"), ["203.0.113.7"]);
    assert_eq!(seen(&r, "x-real-ip"), ["203.0.113.7"]);

    let header = v2(
        Ipv4Addr::new(198, 51, 100, 9),
        Ipv4Addr::LOCALHOST,
        40000,
        80,
    );
    let r = via_proxy_protocol(p.addr, &header, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "x-forwarded-for"), ["198.51.100.9"]);
    assert_eq!(seen(&r, "x-real-ip"), ["198.51.100.9"]);

    // v2 with a TLV after the addresses (as AWS NLB sends its endpoint id): skipped whole.
    let mut header = v2(
        Ipv4Addr::new(198, 51, 100, 10),
        Ipv4Addr::LOCALHOST,
        40001,
        80,
    );
    let tlv = [0xea, 0x00, 0x04, 0x01, b'v', b'p', b'c'];
    header[15] = 12 + tlv.len() as u8;
    header.extend_from_slice(&tlv);
    let r = via_proxy_protocol(p.addr, &header, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "x-forwarded-for"), ["198.51.100.10"]);

    // UNKNOWN (a load balancer's own connection): the TCP peer stands.
    let r = via_proxy_protocol(p.addr, b"PROXY UNKNOWN\r\n", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&r, "x-real-ip"), ["127.0.0.1"]);

    // No header: closed without an HTTP answer, promptly.
    closed_without_answer(
        p.addr,
        b"GET /pp HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn proxy_protocol_from_an_untrusted_peer_is_refused() {
    let up = TestUpstream::start("pp-untrusted").await;
    let p = TestProxy::start(&pp_config("\"10.0.0.0/8\"", &[&up], "")).await;
    let mut with_header = v1(Ipv4Addr::new(203, 0, 113, 7), 5555);
    with_header.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    closed_without_answer(p.addr, &with_header).await;
    closed_without_answer(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn ip_hash_uses_the_address_from_the_proxy_protocol_header() {
    let (a, b, c) = (
        TestUpstream::start("pp-a").await,
        TestUpstream::start("pp-b").await,
        TestUpstream::start("pp-c").await,
    );
    let p = TestProxy::start(&pp_config(
        "\"127.0.0.1/32\"",
        &[&a, &b, &c],
        "balance = \"ip_hash\"",
    ))
    .await;
    let mut chosen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for i in 1..=60u8 {
        let ip = Ipv4Addr::new(203, 0, 113, i);
        let r = via_proxy_protocol(p.addr, &v1(ip, 1000 + u16::from(i)), "").await;
        assert_eq!(r.status, 200);
        chosen.insert(ip, r.json()["name"].as_str().unwrap().to_owned());
    }
    let used: BTreeSet<&String> = chosen.values().collect();
    assert_eq!(used.len(), 3, "60 clients over 3 servers: {chosen:?}");
    // The same client again, through the other header version and another source port:
    // the same server.
    for (ip, server) in &chosen {
        let header = v2(*ip, Ipv4Addr::LOCALHOST, 50000, 80);
        let r = via_proxy_protocol(p.addr, &header, "").await;
        assert_eq!(r.json()["name"], server.as_str(), "client {ip}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. hash_prefix_v4

fn hash_config(ups: &[&TestUpstream], upstream_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n\
         [upstreams.app]\nbalance = \"ip_hash\"\nservers = [{}]\n{upstream_extra}\n",
        quoted(ups)
    )
}

#[tokio::test]
async fn hash_prefix_v4_groups_clients_by_network() {
    let (a, b, c) = (
        TestUpstream::start("hp-a").await,
        TestUpstream::start("hp-b").await,
        TestUpstream::start("hp-c").await,
    );
    let ups = [&a, &b, &c];
    let grouped = TestProxy::start(&hash_config(&ups, "hash_prefix_v4 = 24")).await;
    let by_host = TestProxy::start(&hash_config(&ups, "")).await;
    let cl = client();

    // One /24: one server with /24 grouping, all three with the default /32.
    let mut one_net = BTreeSet::new();
    let mut default_32 = BTreeSet::new();
    for i in 1..=50u8 {
        let ip = Ipv4Addr::new(198, 51, 100, i);
        one_net.insert(served_as(&cl, &grouped, &ip.to_string()).await);
        default_32.insert(served_as(&cl, &by_host, &ip.to_string()).await);
    }
    assert_eq!(one_net.len(), 1, "one /24, grouped by /24: {one_net:?}");
    assert_eq!(default_32.len(), 3, "one /24, by host: {default_32:?}");

    // Many /24s spread; two hosts of one /24 still agree.
    let mut many = BTreeSet::new();
    for i in 0..60u8 {
        let net = [10, i, i.wrapping_mul(7), 0];
        let low = served_as(
            &cl,
            &grouped,
            &Ipv4Addr::new(net[0], net[1], net[2], 9).to_string(),
        )
        .await;
        let high = served_as(
            &cl,
            &grouped,
            &Ipv4Addr::new(net[0], net[1], net[2], 200).to_string(),
        )
        .await;
        assert_eq!(low, high, "10.{i}.{}.0/24", net[2]);
        many.insert(low);
    }
    assert_eq!(many.len(), 3, "60 networks over 3 servers: {many:?}");
}

// ---------------------------------------------------------------------------------------
// 3. Replicas

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_one_config_map_clients_identically() {
    let (a, b, c) = (
        TestUpstream::start("rep-a").await,
        TestUpstream::start("rep-b").await,
        TestUpstream::start("rep-c").await,
    );
    let cfg = hash_config(&[&a, &b, &c], "");
    let first = Arc::new(TestProxy::start(&cfg).await);
    let second = Arc::new(TestProxy::start(&cfg).await);
    // 500 distinct client addresses (an LCG over 10.0.0.0/8), mapped by both replicas.
    let ips: Vec<Ipv4Addr> = (0..500u32)
        .map(|i| Ipv4Addr::from(0x0a00_0000 | (i.wrapping_mul(2_654_435_761) >> 8)))
        .collect();
    assert_eq!(ips.iter().collect::<BTreeSet<_>>().len(), 500);
    let mut tasks = Vec::new();
    for chunk in ips.chunks(125) {
        let (chunk, first, second) = (chunk.to_vec(), Arc::clone(&first), Arc::clone(&second));
        tasks.push(tokio::spawn(async move {
            let cl = client();
            let mut out = Vec::new();
            for ip in chunk {
                let x = served_as(&cl, &first, &ip.to_string()).await;
                let y = served_as(&cl, &second, &ip.to_string()).await;
                out.push((ip, x, y));
            }
            out
        }));
    }
    let mut per_server: BTreeMap<String, usize> = BTreeMap::new();
    let mut disagree = Vec::new();
    for t in tasks {
        for (ip, x, y) in t.await.unwrap() {
            if x != y {
                disagree.push(format!("{ip}: {x} vs {y}"));
            }
            *per_server.entry(x).or_default() += 1;
        }
    }
    assert!(disagree.is_empty(), "replicas disagree: {disagree:?}");
    assert_eq!(per_server.len(), 3, "{per_server:?}");
    assert!(per_server.values().all(|&n| n >= 75), "{per_server:?}");
}

// ---------------------------------------------------------------------------------------
// 4. Rolling upgrade

const TOKEN: &str = "upgrade-token";

/// What one client task saw.
#[derive(Default)]
struct Tally {
    ok: usize,
    failures: Vec<String>,
}

/// GETs `url` in a loop until `stop` is set, counting answered requests in `served`.
async fn keep_requesting(url: String, stop: Arc<AtomicBool>, served: Arc<AtomicUsize>) -> Tally {
    let c = client();
    let mut t = Tally::default();
    while !stop.load(Ordering::SeqCst) {
        let req = Request::get(&url).body(Full::default()).unwrap();
        match tokio::time::timeout(Duration::from_secs(10), c.request(req)).await {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(_) if status == 200 => {
                        t.ok += 1;
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(body) => t.failures.push(format!(
                        "status {status}: {}",
                        String::from_utf8_lossy(&body.to_bytes())
                    )),
                    Err(e) => t.failures.push(format!("body broke off: {e}")),
                }
            }
            Ok(Err(e)) => t.failures.push(format!("request failed: {e:?}")),
            Err(_) => t.failures.push("no answer within 10 s".into()),
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_upgrade_under_traffic_fails_no_request() {
    let mut nodes = vec![
        TestUpstream::start("node-a").await,
        TestUpstream::start("node-b").await,
        TestUpstream::start("node-c").await,
    ];
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [upstreams.app]\nservers = [{}]\n\n\
         [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         healthy_threshold = 2\nunhealthy_threshold = 2\n",
        quoted(&nodes.iter().collect::<Vec<_>>())
    );
    let p = TestProxy::start(&cfg).await;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            tokio::spawn(keep_requesting(p.url("/delay/5"), stop, served))
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "traffic reaches every node",
        || async { nodes.iter().all(|n| n.hits() > 0) },
    )
    .await;

    let mut upgraded = Vec::new();
    for old in nodes.drain(..) {
        let addr = old.addr.to_string();
        // 1. Drain: no new requests; those in flight finish.
        let r = admin::request(
            &p,
            Method::POST,
            &format!("/upstreams/app/servers/{addr}/drain"),
            Some(TOKEN),
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["draining"], true);
        eventually(
            Duration::from_secs(5),
            "the drained node has no request in flight",
            || {
                let (p, addr) = (&p, &addr);
                async move {
                    let st = admin::status(p).await;
                    let s = admin::server_entry(&st, "app", addr);
                    s["draining"] == true && s["active_requests"] == 0
                }
            },
        )
        .await;
        // Traffic goes on without it.
        let hits = old.hits();
        let mark = served.load(Ordering::SeqCst);
        eventually(
            Duration::from_secs(5),
            "traffic flows on the other nodes",
            || async { served.load(Ordering::SeqCst) >= mark + 40 },
        )
        .await;
        assert_eq!(old.hits(), hits, "{} got requests while drained", old.name);

        // 2. The node goes down for its upgrade; the health check notices.
        old.stop();
        eventually(
            Duration::from_secs(5),
            "the stopped node is marked down",
            || {
                let (p, addr) = (&p, &addr);
                async move {
                    admin::server_entry(&admin::status(p).await, "app", addr)["healthy"] == false
                }
            },
        )
        .await;

        // 3. The upgraded node starts on the same address and passes its health checks.
        let new = TestUpstream::start_at(&format!("{}-v2", old.name), old.addr).await;
        eventually(
            Duration::from_secs(5),
            "the upgraded node is healthy again",
            || {
                let (p, addr) = (&p, &addr);
                async move {
                    admin::server_entry(&admin::status(p).await, "app", addr)["healthy"] == true
                }
            },
        )
        .await;
        assert!(new.knobs.health_hits.load(Ordering::SeqCst) > 0);

        // 4. Undrain, and see it serve.
        let r = admin::request(
            &p,
            Method::POST,
            &format!("/upstreams/app/servers/{addr}/undrain"),
            Some(TOKEN),
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["draining"], false);
        eventually(
            Duration::from_secs(5),
            "the upgraded node receives traffic",
            || async { new.hits() > 0 },
        )
        .await;
        upgraded.push(new);
    }

    stop.store(true, Ordering::SeqCst);
    let mut ok = 0;
    let mut failures = Vec::new();
    for t in clients {
        let t = t.await.unwrap();
        ok += t.ok;
        failures.extend(t.failures);
    }
    let retries = admin::metrics(&p).await.sum("fairway_retries_total", &[]);
    println!(
        "rolling upgrade: {} requests, {} failed, {retries} retried; per upgraded node: {:?}",
        ok + failures.len(),
        failures.len(),
        upgraded
            .iter()
            .map(|n| (n.name.as_str(), n.hits()))
            .collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the upgrade: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 0);
    for n in &upgraded {
        assert!(n.hits() > 0, "{} served nothing", n.name);
    }
    for s in admin::servers(&admin::status(&p).await, "app") {
        assert_eq!(s["draining"], false, "{s}");
        assert_eq!(s["healthy"], true, "{s}");
    }
}
