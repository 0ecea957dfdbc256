//! The admin dashboard (CONTRACT §9): `GET /` (one self-contained page that lists every
//! server and reads `/stats`), `GET /stats` (the `/status` document plus each server's request
//! rate, share of 5xx and latency percentiles over the last minute, and its history), what
//! they show when a server goes down and across a reload, their headers and methods, the
//! page's own POSTs passing the cross-site guard, and the metrics the dashboard adds.

mod common;

use std::time::Duration;

use common::admin::ADMIN;
use common::*;
use http::{Method, Request};
use http_body_util::Full;

/// How long the stats sampler (one sample per second) may take to show something.
const SAMPLED: Duration = Duration::from_secs(10);

/// The `/stats` document (which must answer 200 with JSON).
async fn stats(p: &TestProxy) -> serde_json::Value {
    let r = get(&admin::url(p, "/stats")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/json",
        "{:?}",
        r.headers
    );
    r.json()
}

/// Polls `/stats` until `cond` holds for the entry of server `addr` in upstream `app`;
/// returns that entry.
async fn stats_until(
    p: &TestProxy,
    addr: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + SAMPLED;
    loop {
        let doc = stats(p).await;
        if let Some(s) = admin::find_server(&doc, "app", addr)
            && cond(s)
        {
            return s.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not true within {SAMPLED:?}: {what}\n{doc:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn f64_of(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `count` GETs through the proxy on one keep-alive connection; the statuses seen.
async fn traffic(p: &TestProxy, count: usize) -> Vec<u16> {
    let c = client();
    let mut codes = Vec::with_capacity(count);
    for i in 0..count {
        codes.push(get_with(&c, &p.url(&format!("/t/{i}")), &[]).await.status);
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_every_server_and_reads_stats() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c = TestUpstream::start("c").await;
    let p = TestProxy::start(&admin::config(&format!(
        "[upstreams.app]\nservers = [\"{}\", {{ addr = \"{}\", backup = true }}]\n\n\
         [upstreams.other]\nservers = [\"{}\"]\n\n\
         [[routes]]\nhost = \"other.test\"\nupstream = \"other\"\n\n\
         [[routes]]\nupstream = \"app\"\n",
        a.addr, b.addr, c.addr
    )))
    .await;
    let r = get(&admin::url(&p, "/")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = |name: &str| {
        r.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name}: {:?}", r.headers))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(h("content-type"), "text/html; charset=utf-8");
    assert_eq!(h("x-content-type-options"), "nosniff");
    assert_eq!(h("cache-control"), "no-store");
    let csp = h("content-security-policy");
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
    ] {
        assert!(csp.contains(directive), "{directive} not in {csp}");
    }
    let html = r.text();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    for u in [&a, &b, &c] {
        assert!(
            html.contains(&u.addr.to_string()),
            "{} not in the page",
            u.addr
        );
    }
    assert!(html.contains("'/stats'"), "the page does not read /stats");
    // Nothing is loaded from elsewhere: no absolute URL at all, no external script or style.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "an absolute URL in the page"
    );
    assert!(!html.contains("src=\"") && !html.contains("<link rel=\"stylesheet\""));
    // What a browser test finds: the row template, the actions and the token field.
    for hook in [
        "data-action=\"drain\"",
        "data-action=\"maintenance-on\"",
        "data-action=\"reload\"",
        "id=\"token\"",
        "class=\"state\"",
        "sessionStorage",
        "row.dataset.server",
    ] {
        assert!(html.contains(hook), "{hook} not in the page");
    }

    // HEAD answers like GET, without a body; other methods get 405 like the other reads.
    let head = send(
        &client(),
        Request::head(admin::url(&p, "/"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for (method, path) in [
        (Method::POST, "/"),
        (Method::PUT, "/stats"),
        (Method::DELETE, "/"),
    ] {
        let r = admin::request(&p, method.clone(), path, None, "").await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.headers.get("allow").unwrap(), "GET, HEAD");
    }
    let r = get(&admin::url(&p, "/stats")).await;
    assert_eq!(r.headers.get("cache-control").unwrap(), "no-store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reflect_the_traffic_of_the_last_minute() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&admin::config(&format!(
        "[upstreams.app]\nservers = [\"{}\"]\nretries = 0\n",
        a.addr
    )))
    .await;
    let addr = a.addr.to_string();

    // Before any traffic: the /status fields, zero rates and no percentiles.
    let doc = stats(&p).await;
    let status = admin::status(&p).await;
    assert_eq!(doc["config_version"], status["config_version"]);
    assert_eq!(doc["upstreams"]["app"]["balance"], "round_robin");
    assert_eq!(doc["upstreams"]["app"]["maintenance"], false);
    let s = admin::server_entry(&doc, "app", &addr);
    for key in [
        "addr",
        "name",
        "healthy",
        "weight",
        "backup",
        "active_requests",
        "draining",
    ] {
        assert_eq!(
            s[key],
            admin::server_entry(&status, "app", &addr)[key],
            "{key}"
        );
    }
    assert_eq!(f64_of(&s["rps"]), 0.0);
    assert_eq!(f64_of(&s["error_ratio"]), 0.0);
    assert!(s["p50_ms"].is_null() && s["p99_ms"].is_null(), "{s}");
    assert!(s["history"].is_array(), "{s}");
    assert!(doc["last_reload"].is_null(), "{doc}");
    assert_eq!(doc["certificates"], serde_json::json!([]));
    let started = f64_of(&doc["process_start_time"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(started <= now && started > now - 3600.0, "{started}");

    // 150 answered 200, then 50 answered 500 by the upstream.
    let mut codes = traffic(&p, 150).await;
    a.set_status(500);
    codes.extend(traffic(&p, 50).await);
    assert_eq!(codes.iter().filter(|&&c| c == 500).count(), 50, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 150);

    // Once a sample after the traffic is taken, the window holds all 200 requests.
    let s = stats_until(&p, &addr, "all 200 requests in the window", |s| {
        s["rps"].as_f64().is_some_and(|r| r > 0.0)
            && s["error_ratio"]
                .as_f64()
                .is_some_and(|e| (e - 0.25).abs() < 1e-9)
    })
    .await;
    assert_eq!(s["requests_total"], 200);
    let p50 = f64_of(&s["p50_ms"]);
    let p99 = f64_of(&s["p99_ms"]);
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= 30_000.0, "{s}");
    let history = s["history"].as_array().unwrap();
    assert!(!history.is_empty() && history.len() <= 60, "{s}");
    assert!(
        history.iter().any(|h| f64_of(&h["rps"]) > 0.0),
        "no busy second in {s}"
    );
    // The rate over the window is the requests over its span, at most 60 s.
    let rps = f64_of(&s["rps"]);
    assert!(rps >= 200.0 / 61.0, "{rps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_down_shows_in_stats_and_in_the_page() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&admin::config(&format!(
        "[upstreams.app]\nservers = [\"{}\", \"{}\"]\n\n\
         [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\n\
         timeout = \"500ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n",
        a.addr, b.addr
    )))
    .await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    a.set_healthy(false);
    stats_until(&p, &aa, "a shown down", |s| s["healthy"] == false).await;
    let doc = stats(&p).await;
    assert_eq!(admin::server_entry(&doc, "app", &ba)["healthy"], true);
    assert_eq!(doc["upstreams"]["app"]["healthy_servers"], 1);
    // The page is served with the same document: a browser shows the state at once.
    let html = get(&admin::url(&p, "/")).await.text();
    let start = html.find("id=\"initial-stats\">").expect("the data block") + 19;
    let end = start + html[start..].find("</script>").unwrap();
    let initial: serde_json::Value = serde_json::from_str(&html[start..end]).unwrap();
    assert_eq!(
        admin::server_entry(&initial, "app", &aa)["healthy"],
        false,
        "{initial}"
    );
    a.set_healthy(true);
    stats_until(&p, &aa, "a back up", |s| s["healthy"] == true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_history_of_the_servers_that_stay() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let cfg = |servers: &str| admin::config(&format!("[upstreams.app]\nservers = [{servers}]\n"));
    let p = TestProxy::start(&cfg(&format!("\"{aa}\", \"{ba}\""))).await;
    traffic(&p, 40).await;
    let before = stats_until(&p, &aa, "traffic in a's history", |s| {
        s["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|x| x["rps"].as_f64() > Some(0.0)))
    })
    .await;
    let points = before["history"].as_array().unwrap().len();

    // b leaves, c joins: a keeps its ring.
    let c = TestUpstream::start("c").await;
    let ca = c.addr.to_string();
    std::fs::write(&p.config_path, cfg(&format!("\"{aa}\", \"{ca}\""))).unwrap();
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = stats(&p).await;
    assert_eq!(doc["config_version"], 2);
    assert_eq!(doc["last_reload"]["result"], "success", "{doc}");
    assert_eq!(doc["last_reload"]["config_version"], 2);
    assert!(doc["last_reload"]["error"].is_null());
    assert!(admin::find_server(&doc, "app", &ba).is_none());
    let after = admin::server_entry(&doc, "app", &aa);
    let kept = after["history"].as_array().unwrap();
    assert!(kept.len() >= points, "history lost: {before} then {after}");
    assert!(
        kept.iter().any(|x| x["rps"].as_f64() > Some(0.0)),
        "the traffic before the reload is gone: {after}"
    );
    assert!(f64_of(&after["rps"]) > 0.0, "{after}");
    let added = admin::server_entry(&doc, "app", &ca);
    assert_eq!(f64_of(&added["rps"]), 0.0);

    // A failed reload is shown with its error; the old config stays.
    std::fs::write(&p.config_path, "[server]\nlisten = 1\n").unwrap();
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let doc = stats(&p).await;
    assert_eq!(doc["config_version"], 2);
    assert_eq!(doc["last_reload"]["result"], "failure", "{doc}");
    assert!(doc["last_reload"]["config_version"].is_null());
    assert!(
        doc["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("listen")),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_own_posts_pass_the_guard_and_carry_the_token() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(
        &[&a],
        &format!("{ADMIN}token = \"s3cret\"\n"),
    ))
    .await;
    let admin_addr = p.admin.unwrap();
    let drain = format!("/upstreams/app/servers/{}/drain", a.addr).replace(':', "%3A");
    // What a browser sends for a fetch() from the page: its origin, same-origin, the token.
    let from_page = |path: &str, origin: &str, site: &str, token: Option<&str>| {
        let mut b = Request::post(admin::url(&p, path))
            .header("origin", origin)
            .header("sec-fetch-site", site)
            .header("sec-fetch-mode", "cors");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::default()).unwrap()
    };
    let own = format!("http://{admin_addr}");
    let r = send(
        &client(),
        from_page(&drain, &own, "same-origin", Some("s3cret")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["draining"], true);
    // Without the token: 401, which the page reports.
    let r = send(&client(), from_page(&drain, &own, "same-origin", None)).await;
    assert_eq!(r.status, 401);
    // Another site's page with the token still gets 403.
    let r = send(
        &client(),
        from_page(&drain, "http://evil.example", "cross-site", Some("s3cret")),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let doc = stats(&p).await;
    assert_eq!(
        admin::server_entry(&doc, "app", &a.addr.to_string())["draining"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_the_dashboard_adds() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let cfg = |servers: &str| admin::config(&format!("[upstreams.app]\nservers = [{servers}]\n"));
    let p = TestProxy::start(&cfg(&format!("\"{aa}\", \"{ba}\""))).await;
    traffic(&p, 10).await;
    let e = admin::metrics(&p).await;
    use common::prometheus::Kind;
    let family = "fairway_upstream_server_request_duration_seconds";
    assert_eq!(e.kind(family), Some(Kind::Histogram));
    let mut count = 0.0;
    for addr in [&aa, &ba] {
        let h = e
            .histogram(family, &[("upstream", "app"), ("server", addr)])
            .unwrap_or_else(|| panic!("no histogram for {addr}"));
        assert_eq!(h.buckets.last().map(|b| b.0), Some(f64::INFINITY));
        assert_eq!(h.buckets.last().map(|b| b.1), Some(h.count));
        assert!(h.sum > 0.0);
        count += h.count;
    }
    assert_eq!(count, 10.0);
    let upstream = e
        .histogram("fairway_request_duration_seconds", &[("upstream", "app")])
        .unwrap();
    assert_eq!(upstream.count, count, "the same requests, per server");
    assert_eq!(
        e.kind("fairway_process_start_time_seconds"),
        Some(Kind::Gauge)
    );
    assert_eq!(
        e.must("fairway_process_start_time_seconds", &[]),
        e.must("process_start_time_seconds", &[])
    );
    // A server that leaves the config loses its histogram.
    std::fs::write(&p.config_path, cfg(&format!("\"{aa}\""))).unwrap();
    assert_eq!(admin::post(&p, "/reload", "").await.status, 200);
    let e = admin::metrics(&p).await;
    assert!(
        e.histogram(family, &[("upstream", "app"), ("server", &ba)])
            .is_none()
    );
    assert!(
        e.histogram(family, &[("upstream", "app"), ("server", &aa)])
            .is_some()
    );
}
