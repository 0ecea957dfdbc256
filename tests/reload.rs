//! Hot reload (CONTRACT §4 `POST /reload`, §5 reload metrics, §6): every trigger — an
//! in-place write, a rename over the file, the Kubernetes ConfigMap symlink swap, `reload()`
//! (what SIGHUP runs) and `POST /reload` — takes effect within 2 s; weights and membership
//! change; an invalid or missing file changes nothing and is counted; `listen` addresses are
//! bound and released; `config_version` counts successful reloads only. What a reload must
//! not disturb is in `reload_under_traffic.rs`.
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::admin::ADMIN;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Configs

/// 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {text:?}"));
    text[..at].matches('\n').count() + 1
}

// ---------------------------------------------------------------------------------------
// Requests

/// Polls with GETs on `c` until `want` answers (bounded by [`WITHIN`]); the time from `t0`.
async fn switched_to(c: &HttpClient, url: &str, want: &str, t0: Instant) -> Duration {
    eventually(WITHIN, &format!("{want} serves {url}"), || async {
        served_by(c, url).await == want
    })
    .await;
    t0.elapsed()
}

/// A keep-alive client with a connection to the admin listener already open, so that a
/// `POST /reload` sent on it right after a file change reaches the proxy well before the
/// watcher's own look at the file.
async fn admin_client(p: &TestProxy) -> HttpClient {
    let c = client();
    let r = send(
        &c,
        Request::get(admin::url(p, "/healthz"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    c
}

async fn post_reload(c: &HttpClient, p: &TestProxy) -> Reply {
    send(
        c,
        Request::post(admin::url(p, "/reload"))
            .body(Full::default())
            .unwrap(),
    )
    .await
}

/// `fairway_config_reloads_total` by result and `fairway_config_last_reload_successful`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reloads {
    success: u64,
    failure: u64,
    last_ok: u64,
}

async fn reloads(p: &TestProxy) -> Reloads {
    let metrics = admin::metrics(p).await;
    let read = |name: &str, labels: &[(&str, &str)]| metrics.must(name, labels) as u64;
    Reloads {
        success: read("fairway_config_reloads_total", &[("result", "success")]),
        failure: read("fairway_config_reloads_total", &[("result", "failure")]),
        last_ok: read("fairway_config_last_reload_successful", &[]),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Every trigger switches the serving upstream

/// Upstreams `a` and `b`, a proxy serving `a`, and a keep-alive client that has seen it.
struct Switch {
    a: TestUpstream,
    b: TestUpstream,
    p: TestProxy,
    c: HttpClient,
    url: String,
}

impl Switch {
    async fn start() -> Switch {
        let a = TestUpstream::start("a").await;
        let b = TestUpstream::start("b").await;
        let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
        let c = client();
        let url = p.url("/");
        assert_eq!(served_by(&c, &url).await, "a");
        Switch { a, b, p, c, url }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_write_takes_effect_within_2s() {
    let Switch {
        a: _a,
        b,
        p,
        c,
        url,
    } = Switch::start().await;

    let t0 = Instant::now();
    std::fs::write(&p.config_path, TestProxy::config(&[&b], ADMIN)).unwrap();
    let latency = switched_to(&c, &url, "b", t0).await;
    println!("reload latency, in-place write: {latency:?}");

    // One write, one reload, and it succeeded (no reload of a half-written file).
    assert_eq!(admin::config_version(&p).await, 2);
    let r = reloads(&p).await;
    assert_eq!((r.success, r.failure, r.last_ok), (1, 0, 1), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_over_the_file_takes_effect_within_2s() {
    let Switch {
        a: _a,
        b,
        p,
        c,
        url,
    } = Switch::start().await;

    let t0 = Instant::now();
    replace(&p.config_path, &TestProxy::config(&[&b], ADMIN));
    let latency = switched_to(&c, &url, "b", t0).await;
    println!("reload latency, rename-over: {latency:?}");

    assert_eq!(admin::config_version(&p).await, 2);
    let r = reloads(&p).await;
    assert_eq!((r.success, r.failure, r.last_ok), (1, 0, 1), "{r:?}");
}

/// Cancels the proxy's tasks on drop, as `TestProxy` does.
struct Running(fairway::AppHandle);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.shared().signal_stop();
    }
}

/// The kubelet's update of a mounted ConfigMap: the new content in a fresh timestamped
/// directory, a `..data_tmp` symlink to it renamed over `..data`, the old directory removed.
fn configmap_update(dir: &Path, old: &str, new: &str, text: &str) {
    std::fs::create_dir(dir.join(new)).unwrap();
    std::fs::write(dir.join(new).join("fairway.toml"), text).unwrap();
    std::os::unix::fs::symlink(new, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_takes_effect_within_2s() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // fairway.toml -> ..data/fairway.toml, ..data -> ..2026_a
    std::fs::create_dir(d.join("..2026_a")).unwrap();
    std::fs::write(
        d.join("..2026_a").join("fairway.toml"),
        TestProxy::config(&[&a], ADMIN),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_a", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/fairway.toml", d.join("fairway.toml")).unwrap();

    let proxy = Running(
        fairway::App::start(d.join("fairway.toml"))
            .await
            .unwrap_or_else(|e| panic!("proxy failed to start: {e}")),
    );
    let url = format!("http://{}/", proxy.0.client_addrs()[0]);
    let c = client();
    assert_eq!(served_by(&c, &url).await, "a");

    let t0 = Instant::now();
    configmap_update(d, "..2026_a", "..2026_b", &TestProxy::config(&[&b], ADMIN));
    let latency = switched_to(&c, &url, "b", t0).await;
    println!("reload latency, ConfigMap symlink swap: {latency:?}");
    assert_eq!(proxy.0.runtime().version, 2);

    // The watch survives the swap: a second update is seen as well.
    let t0 = Instant::now();
    configmap_update(d, "..2026_b", "..2026_c", &TestProxy::config(&[&a], ADMIN));
    let latency = switched_to(&c, &url, "a", t0).await;
    println!("reload latency, second ConfigMap symlink swap: {latency:?}");
    assert_eq!(proxy.0.runtime().version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_as_sighup_runs_it_bumps_the_version_by_one() {
    let Switch {
        a: _a,
        b,
        p,
        c,
        url,
    } = Switch::start().await;

    let before = p.handle().runtime().version;
    replace(&p.config_path, &TestProxy::config(&[&b], ADMIN));
    let v = p.handle().reload().expect("reload");
    assert_eq!(v, before + 1);
    // In effect when reload() returns: the very next request, on the same keep-alive
    // connection, goes to b.
    assert_eq!(served_by(&c, &url).await, "b");
    assert_eq!(admin::config_version(&p).await, v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_answers_the_new_config_version() {
    let Switch {
        a: _a,
        b,
        p,
        c,
        url,
    } = Switch::start().await;
    let admin = admin_client(&p).await;

    let before = admin::config_version(&p).await;
    replace(&p.config_path, &TestProxy::config(&[&b], ADMIN));
    let r = post_reload(&admin, &p).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/json")
    );
    assert_eq!(
        r.json()["config_version"].as_u64(),
        Some(before + 1),
        "{}",
        r.text()
    );
    assert_eq!(served_by(&c, &url).await, "b");
    assert_eq!(admin::config_version(&p).await, before + 1);
}

// ---------------------------------------------------------------------------------------
// 2. Weights and membership

/// GETs `url` `n` times in sequence on `c`; how often each upstream answered.
async fn counts(c: &HttpClient, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        *out.entry(served_by(c, url).await).or_default() += 1;
    }
    out
}

fn expected(want: &[(&str, usize)]) -> BTreeMap<String, usize> {
    want.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_weights_take_effect_within_2s() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c = TestUpstream::start("c").await;
    let p = TestProxy::start(&admin::config(&weighted(
        "app",
        &[(&a, 1), (&b, 1), (&c, 1)],
    )))
    .await;
    let cl = client();
    let url = p.url("/");
    assert_eq!(
        counts(&cl, &url, 30).await,
        expected(&[("a", 10), ("b", 10), ("c", 10)])
    );

    let t0 = Instant::now();
    replace(
        &p.config_path,
        &admin::config(&weighted("app", &[(&a, 5), (&b, 1), (&c, 1)])),
    );
    // Watched on /status, which does not move the balancer.
    eventually(WITHIN, "a has weight 5 in /status", || async {
        admin::find_server(&admin::status(&p).await, "app", &a.addr.to_string())
            .map(|s| s["weight"].clone())
            == Some(serde_json::json!(5))
    })
    .await;
    println!(
        "reload latency, weights (rename-over, seen in /status): {:?}",
        t0.elapsed()
    );
    assert_eq!(
        counts(&cl, &url, 70).await,
        expected(&[("a", 50), ("b", 10), ("c", 10)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_removed_servers_take_effect_within_2s() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c = TestUpstream::start("c").await;
    let p = TestProxy::start(&TestProxy::config(&[&a, &b], ADMIN)).await;
    let cl = client();
    let url = p.url("/");
    assert_eq!(counts(&cl, &url, 4).await, expected(&[("a", 2), ("b", 2)]));

    // Added: c gets traffic.
    replace(&p.config_path, &TestProxy::config(&[&a, &b, &c], ADMIN));
    eventually(WITHIN, "the added server c gets traffic", || async {
        served_by(&cl, &url).await == "c"
    })
    .await;

    // Removed: a gets nothing more.
    replace(&p.config_path, &TestProxy::config(&[&b, &c], ADMIN));
    eventually(WITHIN, "a gone from /status", || async {
        admin::find_server(&admin::status(&p).await, "app", &a.addr.to_string()).is_none()
    })
    .await;
    let a_hits = a.hits();
    assert_eq!(
        counts(&cl, &url, 20).await,
        expected(&[("b", 10), ("c", 10)])
    );
    assert_eq!(a.hits(), a_hits, "the removed server a got requests");
}

// ---------------------------------------------------------------------------------------
// 3. Invalid files change nothing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_keeps_the_old_config_and_is_reported() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let admin = admin_client(&p).await;
    let path = p.config_path.to_str().unwrap().to_owned();
    let c = client();
    let url = p.url("/");
    let good = weighted("app", &[(&a, 1)]);

    let syntax = admin::config(&good.replace("[upstreams.app]", "[upstreams.app"));
    let unknown_key = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nconect_timeout = \"1s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{good}"
    );
    let missing_upstream = admin::config(&format!(
        "{good}\n[[routes]]\npath_prefix = \"/\"\nupstream = \"nope\"\n"
    ));
    let cases: [(&str, &str, usize, &[&str]); 3] = [
        (
            "bad TOML syntax",
            &syntax,
            line_of(&syntax, "[upstreams.app"),
            &[],
        ),
        (
            "an unknown key",
            &unknown_key,
            line_of(&unknown_key, "conect_timeout"),
            &["server.conect_timeout", "unknown"],
        ),
        (
            "a route to a missing upstream",
            &missing_upstream,
            line_of(&missing_upstream, "upstream = \"nope\""),
            &["routes[0].upstream", "nope"],
        ),
    ];
    for (what, text, line, keys) in cases {
        let before = reloads(&p).await;
        replace(&p.config_path, text);
        let r = post_reload(&admin, &p).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let error = r.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no \"error\" string in {}", r.text()))
            .to_owned();
        assert!(
            error.contains(&format!("{path}:{line}:")),
            "{what}: error does not name {path}:{line}: {error}"
        );
        for k in keys {
            assert!(error.contains(k), "{what}: {k:?} not in the error: {error}");
        }
        for _ in 0..3 {
            assert_eq!(served_by(&c, &url).await, "a", "{what}");
        }
        let after = reloads(&p).await;
        assert_eq!(
            after,
            Reloads {
                success: before.success,
                failure: before.failure + 1,
                last_ok: 0
            },
            "{what}: before {before:?}"
        );
        assert_eq!(admin::config_version(&p).await, 1, "{what}");
    }

    let before = reloads(&p).await;
    replace(&p.config_path, &TestProxy::config(&[&b], ADMIN));
    let r = post_reload(&admin, &p).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["config_version"].as_u64(), Some(2));
    assert_eq!(served_by(&c, &url).await, "b");
    assert_eq!(
        reloads(&p).await,
        Reloads {
            success: before.success + 1,
            failure: before.failure,
            last_ok: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_fails_the_watcher_reload_and_keeps_serving() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let c = client();
    let url = p.url("/");
    let before = reloads(&p).await;

    std::fs::remove_file(&p.config_path).unwrap();
    eventually(WITHIN, "a failed reload counted", || async {
        reloads(&p).await.failure > before.failure
    })
    .await;
    for _ in 0..3 {
        assert_eq!(served_by(&c, &url).await, "a");
    }
    let r = reloads(&p).await;
    assert_eq!(
        r,
        Reloads {
            success: before.success,
            failure: before.failure + 1,
            last_ok: 0
        }
    );

    std::fs::write(&p.config_path, TestProxy::config(&[&b], ADMIN)).unwrap();
    switched_to(&c, &url, "b", Instant::now()).await;
    assert_eq!(
        reloads(&p).await,
        Reloads {
            success: before.success + 1,
            failure: before.failure + 1,
            last_ok: 1
        }
    );
    assert_eq!(admin::config_version(&p).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_toml_written_in_place_is_counted_by_the_watcher() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let c = client();
    let url = p.url("/");
    let before = reloads(&p).await;

    std::fs::write(&p.config_path, "[server\nlisten = \"127.0.0.1:0\"\n").unwrap();
    eventually(WITHIN, "a failed reload counted", || async {
        reloads(&p).await.failure > before.failure
    })
    .await;
    assert_eq!(
        reloads(&p).await,
        Reloads {
            success: before.success,
            failure: before.failure + 1,
            last_ok: 0
        }
    );
    for _ in 0..3 {
        assert_eq!(served_by(&c, &url).await, "a");
    }
    assert_eq!(admin::config_version(&p).await, 1);
}

// ---------------------------------------------------------------------------------------
// 4. Listen addresses

/// One HTTP/1.1 connection to `addr`, kept for later requests.
async fn connection(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// GET / on `conn`; the status and the upstream that answered.
async fn get_on(
    conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
) -> (u16, String) {
    conn.ready().await.expect("connection closed");
    let req = Request::get("/")
        .header("host", addr.to_string())
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), conn.send_request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (status, v["name"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listen_address_is_bound_and_the_old_one_released() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let old = p.addr;
    let mut kept = connection(old).await;
    assert_eq!(get_on(&mut kept, old).await, (200, "a".to_owned()));

    // Another loopback address, on port 0 too: a listen address the config did not have.
    let text = TestProxy::config(&[&a], ADMIN).replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.2:0\"",
        1,
    );
    replace(&p.config_path, &text);
    p.handle().reload().expect("reload");
    let bound = p.handle().client_addrs();
    assert_eq!(bound.len(), 1, "{bound:?}");
    let new = bound[0];
    assert_eq!(new.ip(), std::net::Ipv4Addr::new(127, 0, 0, 2), "{new}");
    assert_eq!(served_by(&client(), &format!("http://{new}/")).await, "a");
    eventually(WITHIN, "the old port refuses connections", || async {
        TcpStream::connect(old).await.is_err()
    })
    .await;
    // A reload never closes a client connection, even one accepted on a released address.
    assert_eq!(get_on(&mut kept, old).await, (200, "a".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_in_use_fails_the_reload_and_keeps_the_old_listener() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let before = reloads(&p).await;

    let text = TestProxy::config(&[&b], ADMIN).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{taken}\""),
        1,
    );
    replace(&p.config_path, &text);
    let e = p.handle().reload().expect_err("bound a port in use");
    let msg = e.to_string();
    assert!(msg.contains(&taken.to_string()), "{msg}");
    assert!(msg.contains(p.config_path.to_str().unwrap()), "{msg}");

    assert_eq!(p.handle().client_addrs(), vec![p.addr]);
    for _ in 0..3 {
        assert_eq!(served_by(&client(), &p.url("/")).await, "a");
    }
    assert_eq!(
        reloads(&p).await,
        Reloads {
            success: before.success,
            failure: before.failure + 1,
            last_ok: 0
        }
    );
    assert_eq!(admin::config_version(&p).await, 1);
    drop(held);
}

// ---------------------------------------------------------------------------------------
// 5. config_version

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_version_counts_successful_reloads_only() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], ADMIN)).await;
    let admin = admin_client(&p).await;
    assert_eq!(admin::config_version(&p).await, 1);

    // The file unchanged: POST /reload still reloads (the watcher sees nothing).
    let r = post_reload(&admin, &p).await;
    assert_eq!(r.json()["config_version"].as_u64(), Some(2), "{}", r.text());
    assert_eq!(admin::config_version(&p).await, 2);

    // Failures (by POST and by the watcher) leave it alone.
    replace(&p.config_path, "[server\n");
    assert_eq!(post_reload(&admin, &p).await.status, 400);
    assert_eq!(admin::config_version(&p).await, 2);
    let failures = reloads(&p).await.failure;
    replace(
        &p.config_path,
        &admin::config(&format!(
            "{}\n[[routes]]\nupstream = \"nope\"\n",
            weighted("app", &[(&a, 1)])
        )),
    );
    eventually(WITHIN, "the watcher's failed reload", || async {
        reloads(&p).await.failure > failures
    })
    .await;
    assert_eq!(admin::config_version(&p).await, 2);

    // A watched change: exactly one more.
    replace(&p.config_path, &TestProxy::config(&[&b], ADMIN));
    eventually(WITHIN, "the watcher's reload", || async {
        admin::config_version(&p).await > 2
    })
    .await;
    assert_eq!(admin::config_version(&p).await, 3);
    assert_eq!(get(&p.url("/")).await.upstream(), "b");

    // A bind failure leaves it alone too.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    replace(
        &p.config_path,
        &TestProxy::config(&[&b], ADMIN).replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", held.local_addr().unwrap()),
            1,
        ),
    );
    assert!(p.handle().reload().is_err());
    assert_eq!(admin::config_version(&p).await, 3);

    replace(&p.config_path, &TestProxy::config(&[&a], ADMIN));
    assert_eq!(p.handle().reload().expect("reload"), 4);
    assert_eq!(admin::config_version(&p).await, 4);
    let r = reloads(&p).await;
    assert_eq!(r.success, 3, "one success per version step: {r:?}");
    assert_eq!(r.last_ok, 1);
}
