//! Servers discovered through DNS (CONTRACT §7 `resolver`, `resolve_interval`): the set
//! follows the answers and a removed server finishes its requests in flight, failures keep
//! the last good set, servers appear once a resolver that was down answers, and an entry's
//! weight applies to each address it resolves to.
//!
//! The tests run a tiny authoritative server of their own (UDP on 127.0.0.1) and bind their
//! upstreams on the loopback aliases 127.0.0.2–127.0.0.4 with one shared port, since a name
//! resolves to addresses and the entry gives the port.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::Full;
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

/// Starts `names[i]` on `ALIASES[i]:P` for one port P free on all three. A DNS entry names
/// one port for every address it resolves to, so this is the one place where a test picks
/// a port: the first alias binds port 0, the others try the same port, and the listeners
/// are kept and handed to the upstreams (nothing is released in between).
async fn start_on_aliases(names: [&str; 3]) -> (u16, Vec<TestUpstream>) {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((ALIASES[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let others: Result<Vec<_>, _> = ALIASES[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind((*ip, port)))
            .collect();
        if let Ok(others) = others {
            let listeners = std::iter::once(first).chain(others);
            let ups = names
                .iter()
                .zip(listeners)
                .map(|(name, l)| TestUpstream::start_on(name, l))
                .collect();
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
// DNS discovery

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
