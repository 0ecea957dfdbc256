//! Micro-benchmarks of the per-request work: server selection for each balancer with 3, 30
//! and 300 servers, route matching, and request-head rewriting.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fairway::balance::{Ring, SmoothWrr, client_key};
use fairway::headers::{self, Origin};
use fairway::route::{RouteSpec, RouteTable};
use http::{HeaderMap, HeaderValue};

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [3usize, 30, 300] {
        let rr = SmoothWrr::new((0..n).map(|i| (i, 1 + (i % 3) as u32)).collect());
        g.bench_with_input(BenchmarkId::new("round_robin", n), &n, |b, _| {
            b.iter(|| black_box(rr.pick(|_| true)))
        });
        let addrs: Vec<String> = (0..n)
            .map(|i| format!("10.0.{}.{}:13000", i / 256, i % 256))
            .collect();
        let members: Vec<(usize, &str, u32)> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i, a.as_str(), 1))
            .collect();
        let ring = Ring::new(&members);
        let mut ip = 0u32;
        g.bench_with_input(BenchmarkId::new("ip_hash", n), &n, |b, _| {
            b.iter(|| {
                ip = ip.wrapping_add(7919);
                let key = client_key(IpAddr::V4(Ipv4Addr::from(ip)));
                black_box(ring.pick(key, |_| true))
            })
        });
    }
    g.finish();
}

fn route(c: &mut Criterion) {
    let specs: Vec<RouteSpec<'_>> = [
        (Some("app.example.com"), "/api"),
        (Some("*.example.com"), "/"),
        (None, "/static"),
        (None, "/"),
    ]
    .iter()
    .map(|&(host, path_prefix)| RouteSpec {
        host,
        path_prefix,
        upstream: 0,
    })
    .collect();
    let table = RouteTable::build(&specs, 1);
    c.bench_function("route/lookup", |b| {
        b.iter(|| black_box(table.lookup(black_box("app.example.com"), black_box("/api/v1/users"))))
    });
}

fn rewrite(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "app.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
        ("accept", "text/html,application/xhtml+xml"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "session=abcdef0123456789"),
        ("connection", "keep-alive"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    let origin = Origin {
        peer: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        client: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        trusted: false,
        proto: "http",
    };
    let fields = headers::RawFields::from_map(&base, &mut headers::Facts::default());
    let method = http::Method::GET;
    c.bench_function("headers/rewrite", |b| {
        b.iter(|| {
            let mut out = bytes::BytesMut::new();
            headers::write_upstream_head(
                &mut out,
                &headers::UpstreamRequest {
                    method: &method,
                    target: "/api/items?page=2",
                    fields: &fields,
                    origin: &origin,
                    host: Some(b"app.example.com"),
                    host_from_target: false,
                    upgrade: false,
                    http2: false,
                    has_body: false,
                    request_id: None,
                    rules: None,
                },
            );
            black_box(out)
        })
    });
}

criterion_group!(benches, select, route, rewrite);
criterion_main!(benches);
