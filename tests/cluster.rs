//! The proxy in front of a cluster of nodes (CONTRACT §2, §4 and the §7 rows they add):
//! servers discovered through DNS (`resolver`, `resolve_interval`), the PROXY protocol from
//! trusted load balancers, `ip_hash` with `hash_prefix_v4`, replicas of the proxy that agree
//! on the client → server mapping, and a rolling upgrade with drain/undrain under traffic.
//!
//! DNS tests run a tiny authoritative server of their own (UDP on 127.0.0.1) and bind their
//! upstreams on the loopback aliases 127.0.0.2–127.0.0.4 with one shared port, since a name
//! resolves to addresses and the entry gives the port.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raw::{RawConn, RawResponse};
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// A tiny DNS server: A records from a changeable map, AAAA with no answers, NXDOMAIN for
// unknown names. It runs on its own thread and runtime, so that a proxy resolving with a
// blocking call (as `App::start` does) never starves it.

/// How the DNS server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum DnsMode {
    /// From the record map.
    Answer = 0,
    /// NXDOMAIN for every name.
    NxDomain = 1,
    /// No answer at all (a dead resolver).
    Silent = 2,
}

struct DnsServer {
    addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    mode: Arc<AtomicU8>,
    queries: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// One parsed question.
struct Query<'a> {
    id: u16,
    recursion_desired: bool,
    name: String,
    qtype: u16,
    /// The question section as sent (QNAME, QTYPE, QCLASS).
    question: &'a [u8],
}

impl DnsServer {
    fn start(records: &[(&str, &[Ipv4Addr])]) -> DnsServer {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let records: HashMap<String, Vec<Ipv4Addr>> = records
            .iter()
            .map(|(n, ips)| ((*n).to_owned(), ips.to_vec()))
            .collect();
        let server = DnsServer {
            addr,
            records: Arc::new(Mutex::new(records)),
            mode: Arc::new(AtomicU8::new(DnsMode::Answer as u8)),
            queries: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let (records, mode, queries, stop) = (
            Arc::clone(&server.records),
            Arc::clone(&server.mode),
            Arc::clone(&server.queries),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
                let mut buf = [0u8; 512];
                loop {
                    let (n, from) = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = socket.recv_from(&mut buf) => match r {
                            Ok(x) => x,
                            Err(_) => continue,
                        },
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    let Some(q) = parse_query(&buf[..n]) else {
                        continue;
                    };
                    let reply = match mode.load(Ordering::SeqCst) {
                        m if m == DnsMode::Silent as u8 => continue,
                        m if m == DnsMode::NxDomain as u8 => dns_answer(&q, 3, &[]),
                        _ => {
                            let known = records.lock().unwrap().get(&q.name).cloned();
                            match known {
                                None => dns_answer(&q, 3, &[]),
                                Some(ips) if q.qtype == 1 => dns_answer(&q, 0, &ips),
                                // AAAA (and anything else): the name exists, no records.
                                Some(_) => dns_answer(&q, 0, &[]),
                            }
                        }
                    };
                    let _ = socket.send_to(&reply, from).await;
                }
            });
        });
        server
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.records
            .lock()
            .unwrap()
            .insert(name.to_owned(), ips.to_vec());
    }

    fn set_mode(&self, mode: DnsMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn parse_query(m: &[u8]) -> Option<Query<'_>> {
    // A query (QR = 0) with at least one question.
    if m.len() < 12 || m[2] & 0x80 != 0 || u16::from_be_bytes([m[4], m[5]]) == 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*m.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = std::str::from_utf8(m.get(at..at + len)?).ok()?;
        labels.push(label.to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
    let end = at + 4;
    Some(Query {
        id: u16::from_be_bytes([m[0], m[1]]),
        recursion_desired: m[2] & 0x01 != 0,
        name: labels.join("."),
        qtype,
        question: m.get(12..end)?,
    })
}

/// An answer with `rcode` and one A record per address, the answer name compressed to the
/// question's (pointer 0xC00C).
fn dns_answer(q: &Query<'_>, rcode: u8, ips: &[Ipv4Addr]) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + q.question.len() + 16 * ips.len());
    r.extend_from_slice(&q.id.to_be_bytes());
    // QR, AA, RD as asked; RA and the rcode.
    r.push(0x84 | u8::from(q.recursion_desired));
    r.push(0x80 | rcode);
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(q.question);
    for ip in ips {
        // Name pointer, TYPE A, CLASS IN, TTL 30, RDLENGTH 4.
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    r
}

// ---------------------------------------------------------------------------------------
// Loopback aliases: three upstreams on 127.0.0.2, .3 and .4 with one shared port.

const ALIASES: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
    Ipv4Addr::new(127, 0, 0, 4),
];

/// Serializes port picking among the tests of this file (only they bind the aliases).
static ALIAS_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts `names[i]` on `ALIASES[i]:P` for one port P free on all three.
async fn start_on_aliases(names: [&str; 3]) -> (u16, Vec<TestUpstream>) {
    let _one_at_a_time = ALIAS_PORTS.lock().await;
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((ALIASES[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let others: Vec<_> = ALIASES[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind((*ip, port)))
            .collect();
        if others.iter().all(Result::is_ok) {
            drop((first, others));
            let mut ups = Vec::new();
            for (ip, name) in ALIASES.iter().zip(names) {
                ups.push(TestUpstream::start_at(name, SocketAddr::from((*ip, port))).await);
            }
            return (port, ups);
        }
    }
    panic!("no port free on 127.0.0.2, 127.0.0.3 and 127.0.0.4");
}

// ---------------------------------------------------------------------------------------
// Admin helpers.

/// The `/status` servers of upstream `app`.
async fn servers(p: &TestProxy) -> Vec<serde_json::Value> {
    admin::servers(&admin::status(p).await, "app").to_vec()
}

async fn server_addrs(p: &TestProxy) -> BTreeSet<String> {
    servers(p)
        .await
        .iter()
        .map(|s| s["addr"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `fairway_dns_resolutions_total{upstream="app",result=...}` (0 while absent).
async fn dns_resolutions(p: &TestProxy, result: &str) -> u64 {
    admin::metrics(p).await.sum(
        "fairway_dns_resolutions_total",
        &[("upstream", "app"), ("result", result)],
    ) as u64
}

// ---------------------------------------------------------------------------------------
// Traffic helpers.

/// GETs `path` `n` times on one keep-alive client; every answer must be 200. Counts by
/// upstream name.
async fn spread(c: &HttpClient, p: &TestProxy, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let r = send(c, Request::get(p.url(path)).body(Full::default()).unwrap()).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        *out.entry(r.upstream()).or_default() += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------
// 1. DNS discovery

fn dns_config(entries: &str, dns: &DnsServer) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [{entries}]\nresolver = \"{}\"\nresolve_interval = \"200ms\"\n",
        dns.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_servers_follow_the_answers_and_removed_ones_finish_in_flight_requests() {
    let (port, ups) = start_on_aliases(["dns-a", "dns-b", "dns-c"]).await;
    let dns = DnsServer::start(&[("app.test", &ALIASES[..2])]);
    let p = TestProxy::start(&dns_config(&format!("\"app.test:{port}\""), &dns)).await;
    let addr = |i: usize| format!("{}:{port}", ALIASES[i]);

    // Resolved at start: one server per address, named IP:PORT.
    let want: BTreeSet<String> = [addr(0), addr(1)].into();
    assert_eq!(server_addrs(&p).await, want);
    assert!(dns.queries.load(Ordering::SeqCst) >= 2, "A and AAAA asked");
    let c = client();
    let seen = spread(&c, &p, "/", 20).await;
    assert_eq!(seen.get("dns-a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("dns-b"), Some(&10), "{seen:?}");
    assert_eq!(ups[2].hits(), 0);

    // A third address: within 2 s it is listed and serves.
    dns.set("app.test", &ALIASES);
    eventually(
        Duration::from_secs(2),
        "the added address gets traffic",
        || {
            let (c, p, u) = (&c, &p, &ups[2]);
            async move {
                spread(c, p, "/", 3).await;
                u.hits() > 0
            }
        },
    )
    .await;
    let want: BTreeSet<String> = [addr(0), addr(1), addr(2)].into();
    assert_eq!(server_addrs(&p).await, want);

    // A slow request in flight to 127.0.0.4, then the address leaves the DNS answer.
    ups[2].set_delay(Duration::from_millis(2500));
    let before = ups[2].hits();
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let url = p.url("/slow");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "a request is in flight on dns-c",
        || async { ups[2].hits() > before },
    )
    .await;
    dns.set("app.test", &ALIASES[..2]);
    eventually(
        Duration::from_secs(2),
        "the removed address leaves /status",
        || async { !server_addrs(&p).await.contains(&addr(2)) },
    )
    .await;
    assert!(
        in_flight.iter().any(|h| !h.is_finished()),
        "the slow request ended before the address was removed: the test proves nothing"
    );
    let mut names = Vec::new();
    for h in in_flight {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        names.push(r.upstream());
    }
    assert!(names.iter().any(|n| n == "dns-c"), "{names:?}");

    // No new request goes to the removed address.
    let hits = ups[2].hits();
    let seen = spread(&c, &p, "/", 30).await;
    assert_eq!(ups[2].hits(), hits, "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failures_keep_the_last_good_set() {
    let (port, ups) = start_on_aliases(["keep-a", "keep-b", "keep-c"]).await;
    let dns = DnsServer::start(&[("app.test", &ALIASES[..])]);
    let p = TestProxy::start(&dns_config(&format!("\"app.test:{port}\""), &dns)).await;
    let c = client();
    eventually(
        Duration::from_secs(2),
        "a successful resolution is counted",
        || async { dns_resolutions(&p, "success").await >= 1 },
    )
    .await;
    assert_eq!(servers(&p).await.len(), 3);

    // NXDOMAIN: failures are counted, successes stop, all three addresses keep serving.
    dns.set_mode(DnsMode::NxDomain);
    let failed = dns_resolutions(&p, "failure").await;
    eventually(
        Duration::from_secs(2),
        "an NXDOMAIN failure is counted",
        || async { dns_resolutions(&p, "failure").await > failed },
    )
    .await;
    let successes = dns_resolutions(&p, "success").await;
    let failed = dns_resolutions(&p, "failure").await;
    eventually(Duration::from_secs(3), "two more failures", || async {
        dns_resolutions(&p, "failure").await >= failed + 2
    })
    .await;
    assert_eq!(dns_resolutions(&p, "success").await, successes);
    assert_eq!(servers(&p).await.len(), 3);
    let seen = spread(&c, &p, "/", 30).await;
    assert_eq!(seen.len(), 3, "the last good set serves: {seen:?}");

    // A resolver that does not answer at all: the same (a failure after the query timeout).
    dns.set_mode(DnsMode::Silent);
    let failed = dns_resolutions(&p, "failure").await;
    eventually(
        Duration::from_secs(6),
        "a timed-out resolution is counted",
        || async { dns_resolutions(&p, "failure").await > failed },
    )
    .await;
    let seen = spread(&c, &p, "/", 30).await;
    assert_eq!(seen.len(), 3, "the last good set serves: {seen:?}");
    let hits: Vec<usize> = ups.iter().map(TestUpstream::hits).collect();
    assert!(hits.iter().all(|&h| h >= 20), "{hits:?}");

    // Answers again: counted as successes.
    dns.set_mode(DnsMode::Answer);
    let successes = dns_resolutions(&p, "success").await;
    eventually(
        Duration::from_secs(5),
        "resolutions succeed again",
        || async { dns_resolutions(&p, "success").await > successes },
    )
    .await;
    assert_eq!(servers(&p).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_down_at_start_then_servers_appear_when_it_answers() {
    let (port, ups) = start_on_aliases(["late-a", "late-b", "late-c"]).await;
    let dns = DnsServer::start(&[("app.test", &ALIASES[..])]);
    dns.set_mode(DnsMode::NxDomain);
    let p = TestProxy::start(&dns_config(&format!("\"app.test:{port}\""), &dns)).await;
    // The proxy starts anyway; the entry waits, unresolved.
    assert!(
        !server_addrs(&p)
            .await
            .contains(&format!("{}:{port}", ALIASES[0])),
        "resolved although the DNS server said NXDOMAIN"
    );
    dns.set_mode(DnsMode::Answer);
    let want: BTreeSet<String> = ALIASES.iter().map(|ip| format!("{ip}:{port}")).collect();
    eventually(
        Duration::from_secs(2),
        "the resolved servers appear",
        || async { server_addrs(&p).await == want },
    )
    .await;
    let seen = spread(&client(), &p, "/", 30).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(ups.iter().all(|u| u.hits() == 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_entry_weight_applies_to_each_resolved_server() {
    let (port, _ups) = start_on_aliases(["w-a", "w-b", "w-unused"]).await;
    let plain = TestUpstream::start("w-ip").await;
    let dns = DnsServer::start(&[("app.test", &ALIASES[..2])]);
    let entries = format!(
        "{{ addr = \"app.test:{port}\", weight = 3 }}, {{ addr = \"{}\", weight = 1 }}",
        plain.addr
    );
    let p = TestProxy::start(&dns_config(&entries, &dns)).await;
    let weights: BTreeMap<String, u64> = servers(&p)
        .await
        .iter()
        .map(|s| {
            (
                s["addr"].as_str().unwrap().to_owned(),
                s["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: BTreeMap<String, u64> = [
        (format!("{}:{port}", ALIASES[0]), 3),
        (format!("{}:{port}", ALIASES[1]), 3),
        (plain.addr.to_string(), 1),
    ]
    .into();
    assert_eq!(weights, want);
    // Smooth weighted round robin over 3 + 3 + 1: exact shares per period of 7.
    let seen = spread(&client(), &p, "/", 70).await;
    let want: BTreeMap<String, usize> =
        [("w-a".into(), 30), ("w-b".into(), 30), ("w-ip".into(), 10)].into();
    assert_eq!(seen, want);
}

// ---------------------------------------------------------------------------------------
// 2. PROXY protocol

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
// 3. hash_prefix_v4

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
// 4. Replicas

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
// 5. Rolling upgrade

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
    for s in servers(&p).await {
        assert_eq!(s["draining"], false, "{s}");
        assert_eq!(s["healthy"], true, "{s}");
    }
}
