//! Metrics as operators scrape them (CONTRACT §5, and the §7 names fairway has built):
//! `/metrics` parsed as Prometheus text format 0.0.4 after known traffic, with every name,
//! type and label set, the duration histogram, active requests, connections and process
//! metrics; hyper's own 400s counted with `upstream="none"`; and the series of a server a
//! reload removed leaving the exposition for good. The parser itself is tested first.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::admin::ADMIN;
use common::prometheus;
use common::*;
use http::Request;
use http_body_util::Full;

// ---------------------------------------------------------------------------------------
// The parser every metrics test reads through

#[test]
fn the_exposition_parser_handles_escapes_types_and_histograms() {
    let text = "# HELP x_total Things.\n\
                # TYPE x_total counter\n\
                x_total{path=\"/a\\\\b\",q=\"say \\\"hi\\\"\",nl=\"1\\n2\",} 3\n\
                x_total{path=\"c,d=e\"} 4 1700000000000\n\
                # TYPE h histogram\n\
                h_bucket{u=\"a\",le=\"0.5\"} 1\n\
                h_bucket{u=\"a\",le=\"+Inf\"} 2\n\
                h_sum{u=\"a\"} 0.75\n\
                h_count{u=\"a\"} 2\n\
                # a free comment\n\
                up NaN\n";
    let e = prometheus::parse(text).unwrap();
    assert_eq!(
        e.get(
            "x_total",
            &[("path", "/a\\b"), ("q", "say \"hi\""), ("nl", "1\n2")]
        ),
        Some(3.0)
    );
    assert_eq!(e.get("x_total", &[("path", "c,d=e")]), Some(4.0));
    assert_eq!(e.kind("x_total"), Some(prometheus::Kind::Counter));
    assert_eq!(e.kind("h"), Some(prometheus::Kind::Histogram));
    let h = e.histogram("h", &[("u", "a")]).unwrap();
    assert_eq!(h.buckets, vec![(0.5, 1.0), (f64::INFINITY, 2.0)]);
    assert_eq!((h.sum, h.count), (0.75, 2.0));
    assert!(e.series("h_count").all(|s| s.family == "h"));
    assert!(e.get("up", &[]).unwrap().is_nan());
    assert_eq!(e.comments, vec!["# a free comment".to_owned()]);
    for bad in [
        "x{a=\"1\"} 1\ny 2\nx{a=\"2\"} 3\n", // family not grouped
        "x 1\n# TYPE x gauge\n",             // TYPE after samples
        "x{a=\"\\t\"} 1\n",                  // bad escape
        "x{a=\"1\"",                         // unclosed
        "x{a=\"1\",a=\"2\"} 1\n",            // duplicate label
        "x 1\nx 2\n",                        // duplicate series
        "x one\n",                           // bad value
        "# TYPE h histogram\nh_bucket 1\n",  // bucket without le
        "# TYPE x gauge\n# TYPE x gauge\n",  // two TYPE lines
        "# TYPE x widget\n",                 // unknown type
    ] {
        assert!(prometheus::parse(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Now, in Unix seconds.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// 1. Metrics after known traffic

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_cannot_parse_are_counted_with_upstream_none() {
    let a = TestUpstream::start("a").await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n[upstreams.app]\nservers = [{}]\n",
        quoted(&[&a])
    );
    let p = TestProxy::start(&cfg).await;
    for bytes in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
    ] {
        let answer = raw(p.addr, bytes, Duration::from_secs(3)).await;
        assert_eq!(raw_status(&answer), Some(400), "{answer:?}");
    }
    let e = admin::metrics(&p).await;
    let req = "fairway_requests_total";
    assert_eq!(
        e.must(
            req,
            &[("upstream", "none"), ("server", "none"), ("code", "400")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_known_traffic() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n\
         [upstreams.app]\nservers = [{}]\n\
         [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\n\n\
         [[routes]]\nhost = \"only.test\"\nupstream = \"app\"\n",
        quoted(&[&a, &b])
    );
    let p = TestProxy::start(&cfg).await;

    // Exactly 10 routed GETs on one keep-alive connection, and one route miss.
    let c = client();
    let mut by = BTreeMap::new();
    for i in 0..10 {
        let r = get_with(&c, &p.url(&format!("/n/{i}")), &[("host", "only.test")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *by.entry(r.upstream()).or_insert(0) += 1;
    }
    assert_eq!(
        by,
        BTreeMap::from([("a".to_owned(), 5), ("b".to_owned(), 5)])
    );
    let miss = get_with(&c, &p.url("/n"), &[("host", "elsewhere.test")]).await;
    assert_eq!(miss.status, 404);

    let r = get(&admin::url(&p, "/metrics")).await;
    assert!(
        !r.text().lines().any(|l| l.trim() == "# EOF"),
        "0.0.4 has no # EOF line"
    );
    let e = admin::metrics(&p).await;

    // Every §5 name, with the right TYPE (and the §7 names fairway has built).
    use prometheus::Kind::*;
    for (family, kind) in [
        ("fairway_requests_total", Counter),
        ("fairway_request_duration_seconds", Histogram),
        ("fairway_upstream_server_healthy", Gauge),
        ("fairway_upstream_active_requests", Gauge),
        ("fairway_health_checks_total", Counter),
        ("fairway_retries_total", Counter),
        ("fairway_config_reloads_total", Counter),
        ("fairway_config_last_reload_successful", Gauge),
        ("fairway_client_connections_active", Gauge),
        ("fairway_client_connections_rejected_total", Counter),
        ("fairway_access_log_dropped_total", Counter),
        ("fairway_upstream_maintenance", Gauge),
        ("process_resident_memory_bytes", Gauge),
        ("process_cpu_seconds_total", Counter),
        ("process_open_fds", Gauge),
        ("process_start_time_seconds", Gauge),
    ] {
        assert_eq!(e.kind(family), Some(kind), "# TYPE of {family}");
    }
    // Every fairway sample belongs to a typed family.
    for s in &e.samples {
        if s.name.starts_with("fairway_") {
            assert!(e.kind(&s.family).is_some(), "untyped sample {s:?}");
        }
    }

    let req = "fairway_requests_total";
    assert_eq!(
        e.must(
            req,
            &[("upstream", "app"), ("server", &aa), ("code", "200")]
        ),
        5.0
    );
    assert_eq!(
        e.must(
            req,
            &[("upstream", "app"), ("server", &ba), ("code", "200")]
        ),
        5.0
    );
    assert_eq!(
        e.must(
            req,
            &[("upstream", "none"), ("server", "none"), ("code", "404")]
        ),
        1.0
    );
    // Nothing else was counted.
    let total: f64 = e.series(req).map(|s| s.value).sum();
    assert_eq!(total, 11.0, "{:?}", e.series(req).collect::<Vec<_>>());

    // The duration histogram: 10 routed requests, buckets 0.5 ms .. 30 s and +Inf.
    let h = e
        .histogram("fairway_request_duration_seconds", &[("upstream", "app")])
        .expect("duration histogram of app");
    assert_eq!(h.count, 10.0);
    assert!(h.sum > 0.0 && h.sum < 10.0 * 30.0, "sum {}", h.sum);
    let les: Vec<f64> = h.buckets.iter().map(|b| b.0).collect();
    assert_eq!(les.first(), Some(&0.0005), "{les:?}");
    assert_eq!(les.last(), Some(&f64::INFINITY), "{les:?}");
    assert_eq!(les[les.len() - 2], 30.0, "{les:?}");
    assert!(
        les.windows(2).all(|w| w[0] < w[1]),
        "le not increasing: {les:?}"
    );
    let counts: Vec<f64> = h.buckets.iter().map(|b| b.1).collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "buckets not cumulative: {counts:?}"
    );
    assert_eq!(counts.last(), Some(&h.count), "+Inf bucket is the count");
    // The route miss has no upstream, hence no duration series of its own.
    assert!(
        e.series("fairway_request_duration_seconds_count")
            .all(|s| s.labels["upstream"] == "app"),
        "{:?}",
        e.series("fairway_request_duration_seconds_count")
            .collect::<Vec<_>>()
    );

    for addr in [&aa, &ba] {
        let l = [("upstream", "app"), ("server", addr.as_str())];
        assert_eq!(e.must("fairway_upstream_server_healthy", &l), 1.0);
        for result in ["success", "failure"] {
            let v = e.must(
                "fairway_health_checks_total",
                &[l[0], l[1], ("result", result)],
            );
            assert!(v >= 0.0 && v.fract() == 0.0, "{result}: {v}");
        }
    }
    assert_eq!(e.must("fairway_retries_total", &[("upstream", "app")]), 0.0);
    assert_eq!(
        e.must("fairway_config_reloads_total", &[("result", "success")]),
        0.0
    );
    assert_eq!(
        e.must("fairway_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert_eq!(e.must("fairway_config_last_reload_successful", &[]), 1.0);
    // `c` keeps its keep-alive connection open.
    assert!(e.must("fairway_client_connections_active", &[]) >= 1.0);

    // Process metrics, plausible for this (test) process.
    let rss = e.must("process_resident_memory_bytes", &[]);
    assert!((1e6..64e9).contains(&rss), "rss {rss}");
    let cpu = e.must("process_cpu_seconds_total", &[]);
    assert!(cpu.is_finite() && cpu >= 0.0, "cpu {cpu}");
    let fds = e.must("process_open_fds", &[]);
    assert!(fds >= 3.0 && fds.fract() == 0.0, "fds {fds}");
    if let Some(max) = e.get("process_max_fds", &[]) {
        assert!(fds <= max, "{fds} > {max}");
    }
    let start = e.must("process_start_time_seconds", &[]);
    let now = now_secs();
    assert!(
        start <= now + 5.0 && start > now - 3600.0,
        "start {start}, now {now}"
    );

    // Health checks run and are counted per server.
    eventually(Duration::from_secs(3), "health checks counted", || async {
        let e = admin::metrics(&p).await;
        [&aa, &ba].iter().all(|addr| {
            e.get(
                "fairway_health_checks_total",
                &[("upstream", "app"), ("server", addr), ("result", "success")],
            )
            .is_some_and(|v| v >= 1.0)
        })
    })
    .await;

    // Active requests: 0 after the traffic, 1 while a slow request is in flight.
    let active = |e: &prometheus::Exposition| -> Vec<f64> {
        [&aa, &ba]
            .iter()
            .map(|addr| {
                e.must(
                    "fairway_upstream_active_requests",
                    &[("upstream", "app"), ("server", addr)],
                )
            })
            .collect()
    };
    eventually(Duration::from_secs(2), "no request in flight", || async {
        active(&admin::metrics(&p).await) == [0.0, 0.0]
    })
    .await;
    a.set_delay(Duration::from_millis(1500));
    b.set_delay(Duration::from_millis(1500));
    let slow = {
        let url = p.url("/slow");
        tokio::spawn(async move {
            send(
                &client(),
                Request::get(url)
                    .header("host", "only.test")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        })
    };
    eventually(Duration::from_secs(1), "one request in flight", || async {
        let mut v = active(&admin::metrics(&p).await);
        v.sort_by(f64::total_cmp);
        v == [0.0, 1.0]
    })
    .await;
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(2), "the slow request ended", || async {
        active(&admin::metrics(&p).await) == [0.0, 0.0]
    })
    .await;

    // Client connections close with their clients.
    drop(c);
    eventually(
        Duration::from_secs(3),
        "client connections closed",
        || async {
            admin::metrics(&p)
                .await
                .get("fairway_client_connections_active", &[])
                == Some(0.0)
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. A server removed by a reload leaves the exposition

fn labels_mention(e: &prometheus::Exposition, needle: &str) -> Vec<prometheus::Sample> {
    e.samples
        .iter()
        .filter(|s| s.labels.values().any(|v| v == needle))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_removed_by_a_reload_leaves_the_exposition() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let p = TestProxy::start(&TestProxy::config(&[&a, &b], ADMIN)).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            send(&c, Request::get(p.url("/")).body(Full::default()).unwrap())
                .await
                .status,
            200
        );
    }
    let e = admin::metrics(&p).await;
    for addr in [&aa, &ba] {
        let l = [
            ("upstream", "app"),
            ("server", addr.as_str()),
            ("code", "200"),
        ];
        assert_eq!(e.must("fairway_requests_total", &l), 1.0);
    }
    assert!(!labels_mention(&e, &ba).is_empty());

    std::fs::write(&p.config_path, TestProxy::config(&[&a], ADMIN)).unwrap();
    let v = p.handle().reload().expect("reload");
    assert_eq!(v, 2);

    let e = admin::metrics(&p).await;
    assert_eq!(
        labels_mention(&e, &ba),
        Vec::new(),
        "series of the removed server"
    );
    // The server that stays keeps its series and counts.
    assert_eq!(
        e.must(
            "fairway_requests_total",
            &[("upstream", "app"), ("server", &aa), ("code", "200")]
        ),
        1.0
    );
    assert_eq!(
        e.must(
            "fairway_upstream_server_healthy",
            &[("upstream", "app"), ("server", &aa)]
        ),
        1.0
    );
    assert!(
        e.must("fairway_config_reloads_total", &[("result", "success")]) >= 1.0,
        "reload counted"
    );
    assert_eq!(e.must("fairway_config_last_reload_successful", &[]), 1.0);
    // Traffic after the reload goes to a only, and b stays out of the exposition.
    for _ in 0..2 {
        let r = send(&c, Request::get(p.url("/")).body(Full::default()).unwrap()).await;
        assert_eq!(r.upstream(), "a");
    }
    assert_eq!(labels_mention(&admin::metrics(&p).await, &ba), Vec::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_on_a_removed_server_does_not_bring_its_series_back() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let ba = b.addr.to_string();
    let p = TestProxy::start(&TestProxy::config(&[&b], ADMIN)).await;
    b.set_delay(Duration::from_millis(600));
    let slow = tokio::spawn(get(p.url("/slow")));
    eventually(Duration::from_secs(2), "request in flight on b", || async {
        b.hits() == 1
    })
    .await;
    std::fs::write(&p.config_path, TestProxy::config(&[&a], ADMIN)).unwrap();
    p.handle().reload().expect("reload");
    assert_eq!(labels_mention(&admin::metrics(&p).await, &ba), Vec::new());
    // Requests in flight finish on the config they started with.
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.upstream().as_str()), (200, "b"));
    assert_eq!(
        labels_mention(&admin::metrics(&p).await, &ba),
        Vec::new(),
        "the removed server is back in the exposition"
    );
}
