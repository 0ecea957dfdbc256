//! Active health checks, passive failure detection, failover, backups, slow start and
//! least_request, over real sockets.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::admin::ADMIN;
use common::*;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

const FAST_CHECKS: &str = r#"
[upstreams.app.health_check]
path = "/health"
interval = "100ms"
timeout = "80ms"
healthy_threshold = 2
unhealthy_threshold = 2
"#;

fn server_healthy(status: &serde_json::Value, addr: &str) -> Option<bool> {
    admin::find_server(status, "app", addr)?["healthy"].as_bool()
}

fn with_admin(cfg: String) -> String {
    cfg + ADMIN
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_endpoint_takes_a_server_out_and_back() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&a, &b], FAST_CHECKS))).await;
    let b_addr = b.addr.to_string();
    eventually(Duration::from_secs(2), "checks run", || async {
        b.knobs.health_hits.load(Ordering::SeqCst) >= 2
    })
    .await;

    b.set_healthy(false);
    let t0 = Instant::now();
    eventually(Duration::from_secs(3), "b marked down", || async {
        server_healthy(&admin::status(&p).await, &b_addr) == Some(false)
    })
    .await;
    // interval × unhealthy_threshold + one interval, plus jitter and scheduling slack.
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "took {:?}",
        t0.elapsed()
    );
    let before = b.hits();
    for _ in 0..20 {
        assert_eq!(get(&p.url("/")).await.upstream(), "a");
    }
    assert_eq!(b.hits(), before);
    let ready = get(&admin::url(&p, "/readyz")).await;
    assert_eq!(ready.status, 200, "a is still up");
    let metrics = admin::metrics(&p).await;
    assert_eq!(
        metrics.get(
            "fairway_upstream_server_healthy",
            &[("upstream", "app"), ("server", &b_addr)]
        ),
        Some(0.0),
        "{metrics:?}"
    );

    b.set_healthy(true);
    eventually(Duration::from_secs(3), "b back up", || async {
        server_healthy(&admin::status(&p).await, &b_addr) == Some(true)
    })
    .await;
    let mut seen_b = false;
    for _ in 0..10 {
        seen_b |= get(&p.url("/")).await.upstream() == "b";
    }
    assert!(seen_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_an_upstream_has_no_healthy_server() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&a], FAST_CHECKS))).await;
    let readyz = admin::url(&p, "/readyz");
    assert_eq!(get(&readyz).await.status, 200);
    a.set_healthy(false);
    eventually(Duration::from_secs(3), "readyz 503", || async {
        get(&readyz).await.status == 503
    })
    .await;
    let r = get(&readyz).await;
    assert!(r.text().contains("app"), "{}", r.text());
    // No healthy server: 503 from the proxy, counted with server="none".
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, 503);
    let metrics = admin::metrics(&p).await;
    assert_eq!(
        metrics.get(
            "fairway_requests_total",
            &[("upstream", "app"), ("server", "none"), ("code", "503")]
        ),
        Some(1.0),
        "{metrics:?}"
    );
    assert!(
        metrics
            .get(
                "fairway_health_checks_total",
                &[
                    ("upstream", "app"),
                    ("server", &a.addr.to_string()),
                    ("result", "failure")
                ]
            )
            .is_some()
    );
    a.set_healthy(true);
    eventually(Duration::from_secs(3), "readyz 200", || async {
        get(&readyz).await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_costs_no_failed_gets() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c = TestUpstream::start("c").await;
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&a, &b, &c], FAST_CHECKS))).await;
    let b_addr = b.addr.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (stop, failures, done, url) = (
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&done),
            p.url("/"),
        );
        tasks.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let r = send(&c, Request::get(&url).body(Default::default()).unwrap()).await;
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(Duration::from_secs(5), "traffic flowing", || async {
        done.load(Ordering::SeqCst) > 50
    })
    .await;
    b.stop();
    let killed = Instant::now();
    let at_kill = done.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), "b marked down", || async {
        server_healthy(&admin::status(&p).await, &b_addr) == Some(false)
    })
    .await;
    // From then on no request is routed to b: the time from its death to the last
    // request routed to it.
    println!(
        "killed server taken out of rotation {:?} after its death (passive detection, checks every 100 ms)",
        killed.elapsed()
    );
    eventually(
        Duration::from_secs(10),
        "traffic after the kill",
        || async { done.load(Ordering::SeqCst) > at_kill + 300 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "requests during the kill: {}, failed: {}",
        done.load(Ordering::SeqCst) - at_kill,
        failures.load(Ordering::SeqCst)
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "of {} requests",
        done.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_resets_connections_is_retried_for_gets() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    b.set_reset(true);
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&a, &b], ""))).await;
    for _ in 0..10 {
        let r = get(&p.url("/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.upstream(), "a");
    }
    let metrics = admin::metrics(&p).await;
    let retries = metrics.must("fairway_retries_total", &[("upstream", "app")]);
    assert!(retries >= 1.0, "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_post_is_not_retried() {
    let a = TestUpstream::start("a").await;
    a.set_reset(true);
    let b = TestUpstream::start("b").await;
    b.set_reset(true);
    let p = TestProxy::start(&TestProxy::config(&[&a, &b], "")).await;
    type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
    let c: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let chunks = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'p'; 1024])))),
    );
    let req = Request::post(p.url("/upload"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        a.hits() + b.hits(),
        1,
        "the POST reached exactly one server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_take_over_and_hand_back() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let backup = TestUpstream::start("backup").await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{}\", \"{}\", {{ addr = \"{}\", backup = true }}]\n{FAST_CHECKS}",
        a.addr, b.addr, backup.addr
    );
    let p = TestProxy::start(&cfg).await;
    for _ in 0..10 {
        assert_ne!(get(&p.url("/")).await.upstream(), "backup");
    }
    a.set_healthy(false);
    b.set_healthy(false);
    eventually(Duration::from_secs(3), "backup serving", || async {
        get(&p.url("/")).await.upstream() == "backup"
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(&p.url("/")).await.upstream(), "backup");
    }
    a.set_healthy(true);
    eventually(Duration::from_secs(3), "a back", || async {
        get(&p.url("/")).await.upstream() == "a"
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(&p.url("/")).await.upstream(), "a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_servers_down_is_503_unless_fail_open() {
    let a = TestUpstream::start("a").await;
    a.set_healthy(false);
    let p = TestProxy::start(&TestProxy::config(&[&a], FAST_CHECKS)).await;
    eventually(Duration::from_secs(3), "503", || async {
        get(&p.url("/")).await.status == 503
    })
    .await;

    let b = TestUpstream::start("b").await;
    b.set_healthy(false);
    let open = format!("{FAST_CHECKS}\n").replace(
        "[upstreams.app.health_check]",
        "fail_open = true\n[upstreams.app.health_check]",
    );
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&b], &open))).await;
    let addr = b.addr.to_string();
    eventually(Duration::from_secs(3), "b down", || async {
        server_healthy(&admin::status(&p).await, &addr) == Some(false)
    })
    .await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, 200, "fail_open routes to a down server");
    assert_eq!(r.upstream(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_clients_of_a_dead_server_move_and_return() {
    let ups = [
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
        TestUpstream::start("c").await,
    ];
    let extra = format!("balance = \"ip_hash\"\n{FAST_CHECKS}");
    let cfg = TestProxy::config(&[&ups[0], &ups[1], &ups[2]], &extra).replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        "[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let p = TestProxy::start(&with_admin(cfg)).await;
    let c = client();
    let ask = |ip: String| {
        let (c, url) = (c.clone(), p.url("/"));
        async move {
            send(
                &c,
                Request::get(url)
                    .header("x-forwarded-for", ip)
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .upstream()
        }
    };
    let ips: Vec<String> = (0..120)
        .map(|i| format!("198.51.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let mut before = HashMap::new();
    for ip in &ips {
        before.insert(ip.clone(), ask(ip.clone()).await);
    }
    ups[1].set_healthy(false);
    let b_addr = ups[1].addr.to_string();
    eventually(Duration::from_secs(3), "b down", || async {
        server_healthy(&admin::status(&p).await, &b_addr) == Some(false)
    })
    .await;
    let mut moved_to = HashMap::<String, usize>::new();
    for ip in &ips {
        let now = ask(ip.clone()).await;
        if before[ip] == "b" {
            assert_ne!(now, "b");
            *moved_to.entry(now).or_default() += 1;
        } else {
            assert_eq!(now, before[ip], "a client of a live server moved");
        }
    }
    assert_eq!(
        moved_to.len(),
        2,
        "b's clients spread over both others: {moved_to:?}"
    );
    ups[1].set_healthy(true);
    eventually(Duration::from_secs(3), "b up", || async {
        server_healthy(&admin::status(&p).await, &b_addr) == Some(true)
    })
    .await;
    for ip in &ips {
        assert_eq!(
            ask(ip.clone()).await,
            before[ip],
            "every client is back where it was"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_mark_a_server_down_and_fail_timeout_brings_it_back() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let b_addr = b.addr;
    let extra = "[upstreams.app.passive]\nmax_fails = 2\nfail_timeout = \"500ms\"\n";
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&a, &b], extra))).await;
    b.stop();
    drop(b);
    for _ in 0..6 {
        assert_eq!(get(&p.url("/")).await.status, 200);
    }
    let st = admin::status(&p).await;
    assert_eq!(
        server_healthy(&st, &b_addr.to_string()),
        Some(false),
        "{st}"
    );
    // Back on its port: after fail_timeout it gets traffic again.
    let b = TestUpstream::start_at("b", b_addr).await;
    eventually(Duration::from_secs(3), "b tried again", || async {
        get(&p.url("/")).await;
        b.hits() > 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_fewer_requests_to_a_slow_server() {
    let fast = TestUpstream::start("fast").await;
    let slow = TestUpstream::start("slow").await;
    slow.set_delay(Duration::from_millis(150));
    let p = TestProxy::start(&TestProxy::config(
        &[&fast, &slow],
        "balance = \"least_request\"\n",
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = p.url("/");
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..15 {
                send(&c, Request::get(&url).body(Default::default()).unwrap()).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (f, s) = (fast.hits(), slow.hits());
    assert_eq!(f + s, 120);
    assert!(s * 3 < f, "slow got {s}, fast got {f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_server_added_by_reload() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&with_admin(TestProxy::config(
        &[&a],
        "slow_start = \"2s\"\n",
    )))
    .await;
    std::fs::write(
        &p.config_path,
        with_admin(TestProxy::config(&[&a, &b], "slow_start = \"2s\"\n")),
    )
    .unwrap();
    p.handle().reload().unwrap();
    let t0 = Instant::now();
    let share = |n: usize| {
        let url = p.url("/");
        async move {
            let c = client();
            let mut b_hits = 0;
            for _ in 0..n {
                if send(&c, Request::get(&url).body(Default::default()).unwrap())
                    .await
                    .upstream()
                    == "b"
                {
                    b_hits += 1;
                }
            }
            b_hits as f64 / n as f64
        }
    };
    let early = share(200).await;
    let early_elapsed = t0.elapsed();
    tokio::time::sleep_until(t0 + Duration::from_millis(2100)).await;
    let late = share(200).await;
    println!(
        "slow start: share of b {early:.2} in the first {early_elapsed:?}, {late:.2} after 2.1 s"
    );
    assert!(early < 0.35, "early share {early}");
    assert!(late > 0.4, "late share {late}");
}

/// CONTRACT §2: a `timeout` longer than `interval` is valid, and the next check starts
/// `interval` after the previous one ended, so checks of one server never overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_slower_than_the_interval_never_overlap() {
    let a = TestUpstream::start("a").await;
    a.set_health_delay(Duration::from_millis(300));
    let checks = "\n[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\n\
                  timeout = \"2s\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n";
    let p = TestProxy::start(&with_admin(TestProxy::config(&[&a], checks))).await;
    eventually(Duration::from_secs(10), "five checks", || async {
        a.knobs.health_hits.load(Ordering::SeqCst) >= 5
    })
    .await;
    assert_eq!(
        a.knobs.health_most_in_flight.load(Ordering::SeqCst),
        1,
        "health checks of one server overlapped"
    );
    let addr = a.addr.to_string();
    assert_eq!(server_healthy(&admin::status(&p).await, &addr), Some(true));
    let metrics = admin::metrics(&p).await;
    let count = |result: &str| {
        metrics
            .get(
                "fairway_health_checks_total",
                &[("upstream", "app"), ("server", &addr), ("result", result)],
            )
            .unwrap_or(0.0)
    };
    assert!(count("success") >= 4.0, "{metrics:?}");
    assert_eq!(count("failure"), 0.0, "{metrics:?}");
    assert_eq!(get(&p.url("/")).await.status, 200);
}
