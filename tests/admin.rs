//! The admin listener (CONTRACT §4 and the admin rows of §7): `/status` with the contract's
//! fields and types, `/readyz` following the health of every upstream, the admin token on
//! every non-GET request, unknown paths and wrong methods, drain/undrain (also under
//! `ip_hash`), and the maintenance switch with its page. Metrics are in `metrics.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::admin::ADMIN;
use common::prometheus;
use common::*;
use http::{Method, Request};
use http_body_util::Full;

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
// 1. /status

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
// 2. /readyz

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
// 3. Admin token, unknown paths and methods

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
// 4. Drain and undrain

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

    // Unknown names, each named in the answer, and the wrong method.
    let r = admin::post(&p, &drain_path("127.0.0.1:1", "drain"), "").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        r#"no server "127.0.0.1:1" in upstream "app""#
    );
    let r = admin::post(&p, &format!("/upstreams/nope/servers/{aa}/drain"), "").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], r#"no upstream named "nope""#);
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
// 5. Maintenance

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
