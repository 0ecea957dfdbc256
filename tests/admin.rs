//! The admin listener and what operators read from outside (CONTRACT §4, §5 and the admin
//! rows of §7): `/metrics` parsed as Prometheus text format 0.0.4 after known traffic,
//! `/status`, `/readyz`, the admin token, drain/undrain, the maintenance switch, and the
//! access log written by the real binary on its stdout.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::admin::ADMIN;
use common::process::{Proc, fairway, log_level};
use common::prometheus;
use common::*;
use http::{Method, Request};
use http_body_util::Full;
use std::sync::atomic::Ordering;

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

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Words of a plain-text body, split on anything but name characters.
fn words(s: &str) -> BTreeSet<&str> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// The comma-separated methods of an `Allow` header.
fn allow(r: &Reply) -> BTreeSet<String> {
    let v = r
        .headers
        .get("allow")
        .unwrap_or_else(|| panic!("405 without Allow: {:?}", r.headers));
    v.to_str()
        .unwrap()
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect()
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

// ---------------------------------------------------------------------------------------
// 3. /status

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_document_has_the_contract_fields_and_types() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n\
         [upstreams.app]\nservers = [{{ addr = \"{aa}\", weight = 3 }}, {{ addr = \"{ba}\", backup = true }}]\n"
    );
    let p = TestProxy::start(&cfg).await;
    let st = admin::status(&p).await;
    assert!(st["config_version"].is_u64(), "{st}");
    assert_eq!(st["config_version"], 1);
    let app = &st["upstreams"]["app"];
    assert_eq!(app["balance"], "round_robin");
    assert_eq!(app["maintenance"], false);
    let servers = app["servers"].as_array().expect("servers array");
    assert_eq!(servers.len(), 2);
    for s in servers {
        assert!(s["addr"].is_string(), "{s}");
        assert!(s["healthy"].is_boolean(), "{s}");
        assert!(s["weight"].is_u64(), "{s}");
        assert!(s["backup"].is_boolean(), "{s}");
        assert!(s["active_requests"].is_u64(), "{s}");
        assert!(s["draining"].is_boolean(), "{s}");
    }
    let sa = admin::server_entry(&st, "app", &aa);
    assert_eq!(
        (
            &sa["healthy"],
            &sa["weight"],
            &sa["backup"],
            &sa["active_requests"],
            &sa["draining"]
        ),
        (
            &true.into(),
            &3.into(),
            &false.into(),
            &0.into(),
            &false.into()
        )
    );
    let sb = admin::server_entry(&st, "app", &ba);
    assert_eq!(
        (
            &sb["healthy"],
            &sb["weight"],
            &sb["backup"],
            &sb["active_requests"],
            &sb["draining"]
        ),
        (
            &true.into(),
            &1.into(),
            &true.into(),
            &0.into(),
            &false.into()
        )
    );
    // A reload bumps config_version and shows the new balance.
    std::fs::write(
        &p.config_path,
        cfg.replace(
            "[upstreams.app]\nservers",
            "[upstreams.app]\nbalance = \"ip_hash\"\nservers",
        ),
    )
    .unwrap();
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["config_version"], 2);
    let st = admin::status(&p).await;
    assert_eq!(st["config_version"], 2);
    assert_eq!(st["upstreams"]["app"]["balance"], "ip_hash");
}

// ---------------------------------------------------------------------------------------
// 4. /readyz

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_health_of_every_upstream() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n\
         [upstreams.app]\nservers = [\"{}\"]\n\
         [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
         unhealthy_threshold = 1\nhealthy_threshold = 1\n\n\
         [upstreams.other]\nservers = [\"{}\"]\n\n\
         [[routes]]\nhost = \"app.test\"\nupstream = \"app\"\n\n\
         [[routes]]\nhost = \"other.test\"\nupstream = \"other\"\n",
        a.addr, b.addr
    );
    let p = TestProxy::start(&cfg).await;
    let readyz = || get(admin::url(&p, "/readyz"));
    let r = readyz().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = get(&admin::url(&p, "/healthz")).await;
    assert_eq!((h.status, h.text().trim()), (200, "ok"));

    a.set_healthy(false);
    eventually(Duration::from_secs(3), "readyz 503", || async {
        readyz().await.status == 503
    })
    .await;
    let r = readyz().await;
    assert_eq!(r.status, 503);
    let body = r.text();
    let w = words(&body);
    assert!(w.contains("app"), "503 body does not name app: {body:?}");
    assert!(
        !w.contains("other"),
        "503 body names a healthy upstream: {body:?}"
    );
    // The proxy answers app's requests itself, counted with server="none".
    let c = client();
    assert_eq!(
        get_with(&c, &p.url("/"), &[("host", "app.test")])
            .await
            .status,
        503
    );
    assert_eq!(
        get_with(&c, &p.url("/"), &[("host", "other.test")])
            .await
            .status,
        200
    );
    let e = admin::metrics(&p).await;
    assert_eq!(
        e.must(
            "fairway_requests_total",
            &[("upstream", "app"), ("server", "none"), ("code", "503")]
        ),
        1.0
    );
    assert_eq!(
        e.must(
            "fairway_upstream_server_healthy",
            &[("upstream", "app"), ("server", &a.addr.to_string())]
        ),
        0.0
    );

    a.set_healthy(true);
    eventually(Duration::from_secs(3), "readyz 200 again", || async {
        readyz().await.status == 200
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Admin token, unknown paths and methods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_every_non_get_request() {
    let a = TestUpstream::start("a").await;
    let aa = a.addr.to_string();
    let p = TestProxy::start(&TestProxy::config(
        &[&a],
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
    ))
    .await;
    let tok = Some("s3cret");

    let r = admin::request(&p, Method::POST, "/reload", None, "").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let challenge = r
        .headers
        .get("www-authenticate")
        .expect("401 without WWW-Authenticate");
    assert!(
        challenge.to_str().unwrap().starts_with("Bearer"),
        "{challenge:?}"
    );
    let r = admin::request(&p, Method::POST, "/reload", Some("wrong"), "").await;
    assert_eq!(r.status, 401);
    let r = admin::request(&p, Method::POST, "/reload", Some("s3cret2"), "").await;
    assert_eq!(r.status, 401);
    let r = admin::request(&p, Method::POST, "/reload", tok, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["config_version"], 2);

    // Reads need no token.
    for path in ["/metrics", "/status", "/healthz", "/readyz"] {
        assert_eq!(get(&admin::url(&p, path)).await.status, 200, "{path}");
    }

    // Drain and maintenance need it too; nothing changes without it.
    let drain = format!("/upstreams/app/servers/{aa}/drain");
    assert_eq!(admin::post(&p, &drain, "").await.status, 401);
    let on = r#"{"upstream":"app","on":true}"#;
    assert_eq!(admin::post(&p, "/maintenance", on).await.status, 401);
    let st = admin::status(&p).await;
    assert_eq!(admin::server_entry(&st, "app", &aa)["draining"], false);
    assert_eq!(st["upstreams"]["app"]["maintenance"], false);
    assert_eq!(get(&p.url("/")).await.status, 200);
    let r = admin::request(&p, Method::POST, "/maintenance", tok, on).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&p.url("/")).await.status, 503);
    let off = r#"{"upstream":"app","on":false}"#;
    assert_eq!(
        admin::request(&p, Method::POST, "/maintenance", tok, off)
            .await
            .status,
        200
    );
    assert_eq!(get(&p.url("/")).await.status, 200);

    // Unknown paths and wrong methods.
    assert_eq!(get(&admin::url(&p, "/nope")).await.status, 404);
    assert_eq!(
        admin::request(&p, Method::POST, "/nope", tok, "")
            .await
            .status,
        404
    );
    let r = admin::request(&p, Method::DELETE, "/metrics", tok, "").await;
    assert_eq!(r.status, 405);
    assert!(allow(&r).contains("GET"), "{:?}", allow(&r));
    assert!(!allow(&r).contains("DELETE"));
    let r = get(&admin::url(&p, "/reload")).await;
    assert_eq!(r.status, 405);
    assert_eq!(allow(&r), BTreeSet::from(["POST".to_owned()]));
    let r = get(&admin::url(&p, "/maintenance")).await;
    assert_eq!(r.status, 405);
    assert_eq!(allow(&r), BTreeSet::from(["POST".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_wrong_methods_get_405_with_allow() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let r = admin::request(&p, Method::DELETE, "/metrics", None, "").await;
    assert_eq!(r.status, 405);
    assert!(allow(&r).contains("GET"), "{:?}", allow(&r));
    let r = admin::request(&p, Method::PUT, "/status", None, "").await;
    assert_eq!(r.status, 405);
    assert!(allow(&r).contains("GET"));
    assert_eq!(
        admin::request(&p, Method::POST, "/nope", None, "")
            .await
            .status,
        404
    );
    // No token configured: POST /reload is open.
    assert_eq!(admin::post(&p, "/reload", "").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 6. Drain and undrain

fn drain_path(addr: &str, action: &str) -> String {
    format!("/upstreams/app/servers/{addr}/{action}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_gets_no_new_requests_and_finishes_those_in_flight() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let encoded = aa.replace(':', "%3A");
    let p = TestProxy::start(&TestProxy::config(&[&a, &b], ADMIN)).await;

    // Unknown names, and the wrong method.
    let r = admin::post(&p, &drain_path("127.0.0.1:1", "drain"), "").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = admin::post(&p, &format!("/upstreams/nope/servers/{aa}/drain"), "").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = get(&admin::url(&p, &drain_path(&aa, "drain"))).await;
    assert_eq!(r.status, 405);
    assert_eq!(allow(&r), BTreeSet::from(["POST".to_owned()]));
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &aa)["draining"],
        false
    );

    // A slow request in flight on a (round robin sends one of two to each server).
    a.set_delay(Duration::from_millis(3000));
    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(get(p.url("/slow")))).collect();
    eventually(Duration::from_secs(2), "a slow request on a", || async {
        admin::server_entry(&admin::status(&p).await, "app", &aa)["active_requests"] == 1
    })
    .await;

    let r = admin::post(&p, &drain_path(&aa, "drain"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let st = admin::status(&p).await;
    let sa = admin::server_entry(&st, "app", &aa);
    assert_eq!(
        (&sa["draining"], &sa["active_requests"]),
        (&true.into(), &1.into())
    );
    assert_eq!(admin::server_entry(&st, "app", &ba)["draining"], false);

    // No new request reaches a.
    let hits_a = a.hits();
    let c = client();
    for _ in 0..6 {
        let r = send(&c, Request::get(p.url("/")).body(Full::default()).unwrap()).await;
        assert_eq!((r.status, r.upstream().as_str()), (200, "b"));
    }
    assert_eq!(a.hits(), hits_a);

    // The request in flight on a completes.
    let mut answered = BTreeMap::new();
    for s in slow {
        let r = s.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        *answered.entry(r.upstream()).or_insert(0) += 1;
    }
    assert_eq!(
        answered,
        BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 1)])
    );
    eventually(
        Duration::from_secs(2),
        "a has no request in flight",
        || async {
            admin::server_entry(&admin::status(&p).await, "app", &aa)["active_requests"] == 0
        },
    )
    .await;
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &aa)["draining"],
        true
    );

    // Undrain (percent-encoded address): a gets traffic again.
    a.set_delay(Duration::ZERO);
    let r = admin::post(&p, &drain_path(&encoded, "undrain"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &aa)["draining"],
        false
    );
    let mut seen = BTreeMap::new();
    for _ in 0..4 {
        let r = send(&c, Request::get(p.url("/")).body(Full::default()).unwrap()).await;
        assert_eq!(r.status, 200);
        *seen.entry(r.upstream()).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 2)])
    );

    // Drain by the percent-encoded address too.
    let r = admin::post(&p, &drain_path(&encoded, "drain"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &aa)["draining"],
        true
    );
    for _ in 0..3 {
        let r = send(&c, Request::get(p.url("/")).body(Full::default()).unwrap()).await;
        assert_eq!(r.upstream(), "b");
    }
    assert_eq!(
        admin::post(&p, &drain_path(&aa, "undrain"), "")
            .await
            .status,
        200
    );
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &aa)["draining"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_clients_of_a_drained_server_move_and_come_back() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let d = TestUpstream::start("c").await;
    let aa = a.addr.to_string();
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n{ADMIN}\n\
         [upstreams.app]\nbalance = \"ip_hash\"\nservers = [{}]\n",
        quoted(&[&a, &b, &d])
    );
    let p = TestProxy::start(&cfg).await;
    let c = client();
    let ips: Vec<String> = (0..60).map(|i| format!("10.{i}.{}.7", i * 3)).collect();
    let mut before = BTreeMap::new();
    for ip in &ips {
        before.insert(ip.clone(), served_as(&c, &p, ip).await);
    }
    let on_a = before.values().filter(|s| *s == "a").count();
    assert!(on_a > 0, "no client hashed to a: {before:?}");

    assert_eq!(
        admin::post(&p, &drain_path(&aa, "drain"), "").await.status,
        200
    );
    for ip in &ips {
        let now = served_as(&c, &p, ip).await;
        if before[ip] == "a" {
            assert_ne!(now, "a", "{ip} still on the drained server");
        } else {
            assert_eq!(now, before[ip], "{ip} moved though its server stayed");
        }
    }

    assert_eq!(
        admin::post(&p, &drain_path(&aa, "undrain"), "")
            .await
            .status,
        200
    );
    for ip in &ips {
        assert_eq!(
            served_as(&c, &p, ip).await,
            before[ip],
            "{ip} after undrain"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. Maintenance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_answers_503_with_retry_after_and_the_page() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{ADMIN}\n\
         [upstreams.app]\nservers = [\"{}\"]\n#PAGE\n\
         [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\n\n\
         [upstreams.api]\nservers = [\"{}\"]\n\n\
         [[routes]]\nhost = \"app.test\"\nupstream = \"app\"\n\n\
         [[routes]]\nhost = \"api.test\"\nupstream = \"api\"\n",
        a.addr, b.addr
    );
    let p = TestProxy::start(&base).await;
    let c = client();
    assert_eq!(
        get_with(&c, &p.url("/"), &[("host", "app.test")])
            .await
            .status,
        200
    );
    assert_eq!(
        get_with(&c, &p.url("/"), &[("host", "api.test")])
            .await
            .status,
        200
    );
    let maint = |e: &prometheus::Exposition, u: &str| {
        e.must("fairway_upstream_maintenance", &[("upstream", u)])
    };

    // Errors first: unknown upstream, malformed bodies.
    let r = admin::post(&p, "/maintenance", r#"{"upstream":"nope","on":true}"#).await;
    assert_eq!(r.status, 404, "{}", r.text());
    for bad in [
        "{not json",
        r#"{"upstream":"app"}"#,
        r#"{"upstream":"app","on":"yes"}"#,
        "",
    ] {
        let r = admin::post(&p, "/maintenance", bad).await;
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
    }
    assert_eq!(
        admin::status(&p).await["upstreams"]["app"]["maintenance"],
        false
    );

    // app in maintenance for 30 s.
    let r = admin::post(
        &p,
        "/maintenance",
        r#"{"upstream":"app","on":true,"retry_after":"30s"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let hits = a.hits();
    for _ in 0..2 {
        let r = get_with(&c, &p.url("/x"), &[("host", "app.test")]).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.headers["retry-after"], "30");
    }
    assert_eq!(
        a.hits(),
        hits,
        "a request reached the upstream in maintenance"
    );
    assert_eq!(
        get_with(&c, &p.url("/"), &[("host", "api.test")])
            .await
            .status,
        200
    );
    let st = admin::status(&p).await;
    assert_eq!(st["upstreams"]["app"]["maintenance"], true);
    assert_eq!(st["upstreams"]["api"]["maintenance"], false);
    let e = admin::metrics(&p).await;
    assert_eq!((maint(&e, "app"), maint(&e, "api")), (1.0, 0.0));
    // Health checks keep running.
    let checks = a.knobs.health_hits.load(Ordering::SeqCst);
    eventually(Duration::from_secs(2), "health checks go on", || async {
        a.knobs.health_hits.load(Ordering::SeqCst) >= checks + 2
    })
    .await;
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &a.addr.to_string())["healthy"],
        true
    );

    // A maintenance page, relative to the config file, picked up by a reload; the switch
    // survives the reload.
    let page = "<!doctype html>\n<h1>Back soon</h1>\n";
    std::fs::write(p.dir.path().join("page.html"), page).unwrap();
    std::fs::write(
        &p.config_path,
        base.replace("#PAGE", "maintenance_page = \"page.html\""),
    )
    .unwrap();
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get_with(&c, &p.url("/"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "30");
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/html"), "{ct}");
    assert_eq!(r.text(), page);
    assert_eq!(maint(&admin::metrics(&p).await, "app"), 1.0);

    // Off again.
    let r = admin::post(&p, "/maintenance", r#"{"upstream":"app","on":false}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get_with(&c, &p.url("/"), &[("host", "app.test")])
            .await
            .status,
        200
    );
    assert_eq!(
        admin::status(&p).await["upstreams"]["app"]["maintenance"],
        false
    );
    assert_eq!(maint(&admin::metrics(&p).await, "app"), 0.0);

    // Every upstream at once.
    let r = admin::post(
        &p,
        "/maintenance",
        r#"{"upstream":"*","on":true,"retry_after":"2m"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for host in ["app.test", "api.test"] {
        let r = get_with(&c, &p.url("/"), &[("host", host)]).await;
        assert_eq!(r.status, 503, "{host}");
        assert_eq!(r.headers["retry-after"], "120", "{host}");
    }
    let st = admin::status(&p).await;
    assert_eq!(st["upstreams"]["app"]["maintenance"], true);
    assert_eq!(st["upstreams"]["api"]["maintenance"], true);
    let e = admin::metrics(&p).await;
    assert_eq!((maint(&e, "app"), maint(&e, "api")), (1.0, 1.0));
    let r = admin::post(&p, "/maintenance", r#"{"upstream":"*","on":false}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for host in ["app.test", "api.test"] {
        assert_eq!(
            get_with(&c, &p.url("/"), &[("host", host)]).await.status,
            200,
            "{host}"
        );
    }
    let e = admin::metrics(&p).await;
    assert_eq!((maint(&e, "app"), maint(&e, "api")), (0.0, 0.0));
}

// ---------------------------------------------------------------------------------------
// 8. The access log, from the real binary's stdout

/// Starts the binary with `[log] access = format` in front of `up`, and sends its three
/// requests: two routed 200s and one route miss. Returns the child, the bodies' lengths by
/// path and the time window of the requests.
async fn access_log_run(
    format: &str,
    up: &TestUpstream,
) -> (
    Proc,
    BTreeMap<&'static str, usize>,
    tempfile::TempDir,
    (SystemTime, SystemTime),
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fairway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"{format}\"\n\n\
             [upstreams.app]\nservers = [\"{}\"]\n\n\
             [[routes]]\nhost = \"app.test\"\nupstream = \"app\"\n",
            up.addr
        ),
    )
    .unwrap();
    let mut cmd = fairway(&["run", "--config", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", log_level("warn"))
        .stdout(Stdio::piped());
    let mut f = Proc::spawn(cmd);
    let addr = f.client_addr().await;
    let t0 = SystemTime::now();
    let c = client();
    let mut sizes = BTreeMap::new();
    for (host, path, code) in [
        ("app.test", "/hello?x=1&y=two", 200),
        ("app.test", "/bytes/1234", 200),
        ("nowhere.test", "/missing?q=1", 404),
    ] {
        let r = send(
            &c,
            Request::get(format!("http://{addr}{path}"))
                .header("host", host)
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, code, "{path}: {}", r.text());
        sizes.insert(path, r.body.len());
    }
    assert_eq!(sizes["/bytes/1234"], 1234);
    let t1 = SystemTime::now();
    (f, sizes, dir, (t0, t1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_lines_from_the_binary() {
    let up = TestUpstream::start("a").await;
    let (mut f, sizes, _dir, (t0, t1)) = access_log_run("json", &up).await;
    let lines = f.stdout_lines(3, Duration::from_secs(5)).await;
    let mut by_path = BTreeMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {line:?}"));
        by_path.insert(v["path"].as_str().expect("path").to_owned(), v);
    }
    let keys: Vec<&str> = by_path.keys().map(String::as_str).collect();
    assert_eq!(keys, ["/bytes/1234", "/hello?x=1&y=two", "/missing?q=1"]);
    for (path, v) in &by_path {
        let miss = path.starts_with("/missing");
        let time = humantime::parse_rfc3339(v["time"].as_str().expect("time string"))
            .unwrap_or_else(|e| panic!("time {}: {e}", v["time"]));
        assert!(
            time + Duration::from_secs(1) >= t0 && time <= t1 + Duration::from_secs(1),
            "time {:?} outside the requests",
            v["time"]
        );
        assert_eq!(v["client"], "127.0.0.1", "{v}");
        assert_eq!(v["method"], "GET", "{v}");
        assert_eq!(v["status"], if miss { 404 } else { 200 }, "{v}");
        assert_eq!(
            v["bytes"].as_u64(),
            Some(sizes[path.as_str()] as u64),
            "{v}"
        );
        assert_eq!(v["upstream"], if miss { "-" } else { "app" }, "{v}");
        let server = up.addr.to_string();
        assert_eq!(v["server"], if miss { "-" } else { server.as_str() }, "{v}");
        let d = v["duration"].as_f64().expect("duration number");
        assert!((0.0..10.0).contains(&d), "{v}");
        assert_eq!(v["attempts"], if miss { 0 } else { 1 }, "{v}");
    }
    f.signal("TERM");
    f.expect_clean_exit(Duration::from_secs(10)).await;
}

/// `client - - [time] "METHOD PATH PROTO" status bytes key=value...`.
#[derive(Debug)]
struct CommonLine {
    client: String,
    time: String,
    method: String,
    path: String,
    protocol: String,
    status: u16,
    bytes: u64,
    fields: BTreeMap<String, String>,
}

fn parse_common(line: &str) -> CommonLine {
    let fail = |what: &str| -> ! { panic!("{what} in common log line {line:?}") };
    let (client, rest) = line
        .split_once(" - - [")
        .unwrap_or_else(|| fail("no ' - - ['"));
    let (time, rest) = rest.split_once("] \"").unwrap_or_else(|| fail("no time"));
    let (request, rest) = rest.split_once("\" ").unwrap_or_else(|| fail("no request"));
    let mut req = request.split(' ');
    let (Some(method), Some(path), Some(protocol), None) =
        (req.next(), req.next(), req.next(), req.next())
    else {
        fail("bad request line")
    };
    let mut rest = rest.split(' ');
    let status = rest
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail("bad status"));
    let bytes = rest
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail("bad bytes"));
    let fields = rest
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| fail("bad key=value"));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    CommonLine {
        client: client.to_owned(),
        time: time.to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        protocol: protocol.to_owned(),
        status,
        bytes,
        fields,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_access_log_lines_from_the_binary() {
    let up = TestUpstream::start("a").await;
    let (mut f, sizes, _dir, _) = access_log_run("common", &up).await;
    let lines = f.stdout_lines(3, Duration::from_secs(5)).await;
    let server = up.addr.to_string();
    let mut paths = Vec::new();
    for line in &lines {
        assert!(line.starts_with("127.0.0.1 - - ["), "{line:?}");
        let l = parse_common(line);
        let miss = l.path.starts_with("/missing");
        assert_eq!(l.client, "127.0.0.1");
        humantime::parse_rfc3339(&l.time).unwrap_or_else(|e| panic!("time {:?}: {e}", l.time));
        assert_eq!(
            (l.method.as_str(), l.protocol.as_str()),
            ("GET", "HTTP/1.1"),
            "{line}"
        );
        assert_eq!(l.status, if miss { 404 } else { 200 }, "{line}");
        assert_eq!(l.bytes, sizes[l.path.as_str()] as u64, "{line}");
        let field = |k: &str| l.fields.get(k).map(String::as_str);
        assert_eq!(
            field("server"),
            Some(if miss { "-" } else { server.as_str() }),
            "{line}"
        );
        assert_eq!(
            field("upstream"),
            Some(if miss { "-" } else { "app" }),
            "{line}"
        );
        assert_eq!(
            field("attempts"),
            Some(if miss { "0" } else { "1" }),
            "{line}"
        );
        let d: f64 = field("duration")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no duration in {line:?}"));
        assert!((0.0..10.0).contains(&d), "{line}");
        paths.push(l.path);
    }
    paths.sort();
    assert_eq!(paths, ["/bytes/1234", "/hello?x=1&y=two", "/missing?q=1"]);
    f.signal("TERM");
    f.expect_clean_exit(Duration::from_secs(10)).await;
}
