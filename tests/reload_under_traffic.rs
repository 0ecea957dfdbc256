//! Reloads under traffic lose nothing (CONTRACT §6): fifty reloads while requests flow fail
//! none of them; a slow request to a server the reload removed completes; a kept server
//! keeps its health state; pooled connections, and a WebSocket whose server was removed,
//! outlive a reload.
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::admin::ADMIN;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// 1. Fifty reloads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_traffic_fail_no_request() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    // Alternately a alone (weight 2) and a with b: b is added and removed under traffic.
    let only_a = admin::config(&weighted("app", &[(&a, 2)]));
    let a_and_b = admin::config(&weighted("app", &[(&a, 1), (&b, 1)]));
    let p = TestProxy::start(&a_and_b).await;
    let url = p.url("/");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, failures, url) = (
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&failures),
                url.clone(),
            );
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::SeqCst) {
                    let req = Request::get(&url).body(Full::default()).unwrap();
                    let outcome =
                        match tokio::time::timeout(Duration::from_secs(10), c.request(req)).await {
                            Err(_) => Err("timed out".to_owned()),
                            Ok(Err(e)) => Err(format!("request error: {e:?}")),
                            Ok(Ok(resp)) => {
                                let code = resp.status();
                                match resp.into_body().collect().await {
                                    Err(e) => Err(format!("body error: {e:?}")),
                                    Ok(_) if code != 200 => Err(format!("status {code}")),
                                    Ok(_) => Ok(()),
                                }
                            }
                        };
                    if let Err(e) = outcome {
                        failures.lock().unwrap().push(e);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    eventually(Duration::from_secs(5), "traffic flowing", || async {
        done.load(Ordering::SeqCst) >= 20
    })
    .await;
    let mut results = Vec::new();
    for i in 0..50 {
        // Let some requests pass between two reloads.
        let at = done.load(Ordering::SeqCst);
        eventually(WITHIN, "requests between reloads", || async {
            done.load(Ordering::SeqCst) >= at + 4
        })
        .await;
        replace(&p.config_path, if i % 2 == 0 { &only_a } else { &a_and_b });
        results.push(p.handle().reload());
    }
    let at = done.load(Ordering::SeqCst);
    eventually(WITHIN, "requests after the last reload", || async {
        done.load(Ordering::SeqCst) >= at + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }

    let total = done.load(Ordering::SeqCst);
    let failed = failures.lock().unwrap().clone();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "50 reloads under traffic: {ok} succeeded; {total} requests, {} failed (a {}, b {})",
        failed.len(),
        a.hits(),
        b.hits()
    );
    assert_eq!(ok, 50, "{results:?}");
    let versions: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    assert!(
        versions.windows(2).all(|w| w[1] > w[0]),
        "versions not increasing: {versions:?}"
    );
    assert!(
        failed.is_empty(),
        "{} failed requests: {failed:?}",
        failed.len()
    );
    assert!(b.hits() > 0, "b never served");
}

// ---------------------------------------------------------------------------------------
// 2. What a reload must not disturb

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_to_a_removed_server_completes() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    b.set_delay(Duration::from_secs(1));
    let p = TestProxy::start(&TestProxy::config(&[&b], ADMIN)).await;
    let url = p.url("/");

    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually(WITHIN, "the slow request reached b", || async {
        b.hits() == 1
    })
    .await;

    replace(&p.config_path, &TestProxy::config(&[&a], ADMIN));
    p.handle().reload().expect("reload");
    // New requests go to a while the old one is still waiting on b.
    assert_eq!(served_by(&client(), &url).await, "a");
    assert!(!in_flight.is_finished(), "the slow request ended early");

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), "b");
    assert_eq!(served_by(&client(), &url).await, "a");
    assert_eq!(b.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_server_keeps_its_health_state() {
    let sick = TestUpstream::start("app").await;
    sick.set_healthy(false);
    let other = TestUpstream::start("other").await;
    let config = |retries: u32| {
        admin::config(&format!(
            "[upstreams.app]\nservers = [\"{}\"]\n\n\
             [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\n\
             timeout = \"100ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n\n\
             [upstreams.other]\nservers = [\"{}\"]\nretries = {retries}\n\n\
             [[routes]]\npath_prefix = \"/app\"\nupstream = \"app\"\n\n\
             [[routes]]\npath_prefix = \"/\"\nupstream = \"other\"\n",
            sick.addr, other.addr
        ))
    };
    let p = TestProxy::start(&config(2)).await;
    let healthy = |s: &serde_json::Value| {
        admin::find_server(s, "app", &sick.addr.to_string()).map(|s| s["healthy"].clone())
    };
    eventually(
        Duration::from_secs(3),
        "app server down in /status",
        || async { healthy(&admin::status(&p).await) == Some(serde_json::json!(false)) },
    )
    .await;
    assert_eq!(get(&p.url("/app")).await.status, 503);

    replace(&p.config_path, &config(0));
    p.handle().reload().expect("reload");
    let s = admin::status(&p).await;
    assert_eq!(
        s["upstreams"]["other"]["retries"], 0,
        "reload not applied: {s}"
    );
    assert_eq!(
        healthy(&s),
        Some(serde_json::json!(false)),
        "health reset by the reload: {s}"
    );
    assert_eq!(get(&p.url("/app")).await.status, 503);
    assert_eq!(get(&p.url("/")).await.upstream(), "other");
    let metrics = admin::metrics(&p).await;
    assert_eq!(
        metrics.get(
            "fairway_upstream_server_healthy",
            &[("upstream", "app"), ("server", &sick.addr.to_string())]
        ),
        Some(0.0),
        "{metrics:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_survive_a_reload() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&admin::config(&weighted("app", &[(&a, 1)]))).await;
    let c = client();
    let url = p.url("/");
    for _ in 0..10 {
        assert_eq!(served_by(&c, &url).await, "a");
    }
    let n = a.knobs.connections.load(Ordering::SeqCst);
    assert!((1..=10).contains(&n), "{n} connections");

    replace(&p.config_path, &admin::config(&weighted("app", &[(&a, 3)])));
    p.handle().reload().expect("reload");
    assert_eq!(
        admin::find_server(&admin::status(&p).await, "app", &a.addr.to_string())
            .map(|s| s["weight"].clone()),
        Some(serde_json::json!(3))
    );
    for _ in 0..10 {
        assert_eq!(served_by(&c, &url).await, "a");
    }
    assert_eq!(
        a.knobs.connections.load(Ordering::SeqCst),
        n,
        "the reload dropped pooled connections"
    );
}

/// Sends `text` and returns the next text message.
async fn exchange(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no answer within 5 s")
            .expect("websocket ended")
            .expect("websocket error");
        if let Message::Text(t) = msg {
            return t.as_str().to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_outlives_a_reload_that_removes_its_server() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let mut ws = open_websocket(&p).await;
    assert_eq!(exchange(&mut ws, "before").await, "a: before");

    replace(&p.config_path, &TestProxy::config(&[&b], ADMIN));
    p.handle().reload().expect("reload");
    assert_eq!(exchange(&mut ws, "after").await, "a: after");
    assert_eq!(exchange(&mut ws, "again").await, "a: again");

    let mut fresh = open_websocket(&p).await;
    assert_eq!(exchange(&mut fresh, "new").await, "b: new");
    ws.close(None).await.unwrap();
    fresh.close(None).await.unwrap();
}
