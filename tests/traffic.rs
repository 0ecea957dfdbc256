//! The traffic features of CONTRACT §8 over real sockets: request IDs, header rules, sticky
//! cookies, rate limits and connections per client IP. (Compression has its own file.)
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::admin::metrics;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Request IDs

fn is_new_id(v: &str) -> bool {
    v.len() == 32
        && v.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

#[tokio::test]
async fn every_request_carries_one_new_id_to_the_upstream_and_back() {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&up], "")).await;
    let c = client();
    // The client's own ID is not believed: 127.0.0.1 is not a trusted proxy.
    let r = get_with(&c, &p.url("/"), &[("x-request-id", "forged")]).await;
    let sent = r.seen_one("x-request-id").unwrap();
    assert!(is_new_id(&sent), "{sent}");
    assert_eq!(r.headers["x-request-id"], sent.as_str());
    let again = get(p.url("/")).await.seen_one("x-request-id").unwrap();
    assert_ne!(again, sent);
}

#[tokio::test]
async fn an_id_from_a_trusted_proxy_is_kept_when_well_formed() {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &[&up],
    ))
    .await;
    let c = client();
    let r = get_with(&c, &p.url("/"), &[("x-request-id", "lb-4711")]).await;
    assert_eq!(r.seen_one("x-request-id").unwrap(), "lb-4711");
    assert_eq!(r.headers["x-request-id"], "lb-4711");
    let long = "x".repeat(129);
    let r = get_with(&c, &p.url("/"), &[("x-request-id", &long)]).await;
    assert!(is_new_id(&r.seen_one("x-request-id").unwrap()));
}

#[tokio::test]
async fn fairways_own_error_answers_name_the_id() {
    let up = TestUpstream::start("a").await;
    let addr = up.addr;
    up.stop();
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{addr}\"]\nretries = 0\n"
    ))
    .await;
    let r = get(p.url("/")).await;
    assert_eq!(r.status, 502);
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(is_new_id(&id));
    assert!(
        r.text().contains(&format!("request id: {id}")),
        "{}",
        r.text()
    );
}

/// An upstream that answers every request on its connection with its own `X-Request-Id`.
async fn upstream_with_its_own_id() -> SocketAddr {
    let (addr, _) = common::raw::raw_upstream(|mut s: TcpStream| async move {
        // The requests are GETs without a body: one head, one answer.
        while common::raw::read_head(&mut s).await.is_some() {
            let answer = "HTTP/1.1 200 OK\r\nX-Request-Id: upstream-id\r\n\
                          Content-Length: 2\r\n\r\nok";
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    addr
}

#[tokio::test]
async fn the_id_replaces_the_upstreams_own_in_the_answer_with_and_without_response_rules() {
    let up = upstream_with_its_own_id().await;
    let plain =
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{up}\"]\n");
    // With response rules the head is written from a header map, not from the lines.
    let ruled = format!(
        "{plain}[[routes]]\nupstream = \"app\"\n\
         response_headers = {{ set = {{ \"X-Frame-Options\" = \"DENY\" }} }}\n"
    );
    for toml in [plain, ruled] {
        let p = TestProxy::start(&toml).await;
        let answer = raw(
            p.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(raw_status(&answer), Some(200), "{answer}");
        let head = answer.split("\r\n\r\n").next().unwrap();
        let ids: Vec<&str> = head
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("x-request-id")
                    .then(|| value.trim())
            })
            .collect();
        assert_eq!(ids.len(), 1, "{head}");
        assert!(is_new_id(ids[0]), "{head}");
    }
}

#[tokio::test]
async fn request_id_off_adds_nothing() {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&proxy_config("request_id = false", &[&up])).await;
    let r = get_with(&client(), &p.url("/"), &[("x-request-id", "mine")]).await;
    assert!(!r.headers.contains_key("x-request-id"));
    // The client's own passes through untouched, as any other field.
    assert_eq!(r.seen_one("x-request-id").unwrap(), "mine");
}

#[tokio::test]
async fn trace_context_passes_through_untouched() {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&up], "")).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get_with(
        &client(),
        &p.url("/"),
        &[("traceparent", tp), ("tracestate", "congo=t61rcWkgMzE")],
    )
    .await;
    assert_eq!(r.seen_one("traceparent").unwrap(), tp);
    assert_eq!(r.seen_one("tracestate").unwrap(), "congo=t61rcWkgMzE");
}

// ---------------------------------------------------------------------------------------
// Header rules

#[tokio::test]
async fn header_rules_set_and_remove_on_both_sides_after_fairways_own() {
    let up = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(
        &[&up],
        r#"
[[routes]]
path_prefix = "/"
upstream = "app"
request_headers = { set = { "X-Env" = "prod", "User-Agent" = "fairway-test" }, remove = ["X-Debug", "X-Forwarded-Host"] }
response_headers = { set = { "Strict-Transport-Security" = "max-age=63072000", "X-Content-Type-Options" = "nosniff" }, remove = ["X-Powered-By", "Content-Type"] }
"#,
    ))
    .await;
    let r = get_with(
        &client(),
        &p.url("/"),
        &[("x-debug", "1"), ("user-agent", "curl"), ("x-env", "dev")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_one("x-env").unwrap(), "prod");
    assert_eq!(r.seen_one("user-agent").unwrap(), "fairway-test");
    assert_eq!(r.seen_header("x-debug"), None);
    // Removing one of fairway's own fields works; the rest are still there.
    assert_eq!(r.seen_header("x-forwarded-host"), None);
    assert_eq!(r.seen_one("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(r.headers["strict-transport-security"], "max-age=63072000");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert!(!r.headers.contains_key("content-type"));
}

#[tokio::test]
async fn response_rules_apply_to_fairways_own_answers_on_the_route() {
    let up = TestUpstream::start("a").await;
    let addr = up.addr;
    up.stop();
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{addr}\"]\nretries = 0\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\
         response_headers = {{ set = {{ \"Strict-Transport-Security\" = \"max-age=1\" }} }}\n"
    ))
    .await;
    let r = get(p.url("/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["strict-transport-security"], "max-age=1");
}

#[tokio::test]
async fn a_rule_cannot_forge_forwarded_fields() {
    for (name, side) in [
        ("X-Forwarded-For", "request_headers"),
        ("x-real-ip", "request_headers"),
        ("Host", "request_headers"),
        ("X-Request-Id", "request_headers"),
        ("Connection", "request_headers"),
        ("Content-Length", "response_headers"),
        ("Transfer-Encoding", "response_headers"),
    ] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"127.0.0.1:1\"]\n\
             [[routes]]\nupstream = \"app\"\n{side} = {{ set = {{ \"{name}\" = \"x\" }} }}\n"
        );
        let e = fairway::config::parse(std::path::Path::new("f.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.toml:7:")
                && e.contains(&format!("routes[0].{side}.set.{name}: a rule may not set")),
            "{name}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Sticky cookies

fn cookie_of(r: &Reply) -> Option<String> {
    let v = r.headers.get("set-cookie")?.to_str().unwrap();
    let pair = v.split(';').next().unwrap();
    Some(pair.trim().to_owned())
}

async fn get_cookie(c: &HttpClient, url: &str, cookie: Option<&str>) -> Reply {
    let mut h = vec![];
    if let Some(cookie) = cookie {
        h.push(("cookie", cookie));
    }
    let r = get_with(c, url, &h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

#[tokio::test]
async fn a_sticky_cookie_pins_a_client_to_its_server_until_it_cannot_take_it() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c3 = TestUpstream::start("c").await;
    let p = TestProxy::start(&common::admin::config(&format!(
        "[upstreams.app]\nservers = [{}]\n[upstreams.app.sticky]\nmax_age = \"2h\"\n",
        quoted(&[&a, &b, &c3])
    )))
    .await;
    let c = client();
    let first = get_cookie(&c, &p.url("/"), None).await;
    let cookie = cookie_of(&first).expect("the first response sets the cookie");
    let set = first.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("fairway_sticky="), "{set}");
    assert!(
        set.contains("Path=/") && set.contains("Max-Age=7200") && set.contains("HttpOnly"),
        "{set}"
    );
    assert!(
        set.contains("SameSite=Lax") && !set.contains("Secure"),
        "{set}"
    );
    // Never the address.
    for s in [&a, &b, &c3] {
        assert!(!set.contains(&s.addr.to_string()) && !set.contains(&s.addr.port().to_string()));
    }
    let pinned = first.upstream();
    for _ in 0..10 {
        let r = get_cookie(&c, &p.url("/"), Some(&format!("other=1; {cookie}"))).await;
        assert_eq!(r.upstream(), pinned);
        assert!(!r.headers.contains_key("set-cookie"), "set again");
    }
    // Draining the server moves the client, counted, with a new cookie.
    let server = [&a, &b, &c3]
        .into_iter()
        .find(|s| s.name == pinned)
        .unwrap();
    let r = common::admin::post(
        &p,
        &format!("/upstreams/app/servers/{}/drain", server.addr),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let moved = get_cookie(&c, &p.url("/"), Some(&cookie)).await;
    assert_ne!(moved.upstream(), pinned);
    let new_cookie = cookie_of(&moved).expect("re-issued");
    assert_ne!(new_cookie, cookie);
    let m = metrics(&p).await;
    assert_eq!(
        m.get("fairway_sticky_reassignments_total", &[("upstream", "app")]),
        Some(1.0)
    );
    let again = get_cookie(&c, &p.url("/"), Some(&new_cookie)).await;
    assert_eq!(again.upstream(), moved.upstream());
}

#[tokio::test]
async fn sticky_ids_agree_between_replicas_with_different_listeners() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let cfg = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[upstreams.app]\nservers = [{}]\n[upstreams.app.sticky]\ncookie = \"srv\"\n",
            quoted(&[&a, &b])
        )
    };
    let one = TestProxy::start(&cfg("")).await;
    let two = TestProxy::start(&cfg("idle_timeout = \"30s\"")).await;
    let c = client();
    for _ in 0..2 {
        let r = get_cookie(&c, &one.url("/"), None).await;
        let cookie = cookie_of(&r).unwrap();
        assert!(cookie.starts_with("srv="));
        for _ in 0..3 {
            let r2 = get_cookie(&c, &two.url("/"), Some(&cookie)).await;
            assert_eq!(r2.upstream(), r.upstream());
            assert!(!r2.headers.contains_key("set-cookie"));
        }
    }
}

#[tokio::test]
async fn an_unknown_sticky_cookie_gets_a_new_pick_and_a_new_cookie() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(
        &[&a],
        &format!("[upstreams.app.sticky]\n{}", common::admin::ADMIN),
    ))
    .await;
    let r = get_cookie(
        &client(),
        &p.url("/"),
        Some("fairway_sticky=0000000000000000"),
    )
    .await;
    assert!(cookie_of(&r).is_some());
    let m = metrics(&p).await;
    assert_eq!(
        m.get("fairway_sticky_reassignments_total", &[("upstream", "app")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_websocket_upgrade_sets_the_sticky_cookie_on_its_101() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], "[upstreams.app.sticky]\n")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("set-cookie: fairway_sticky="), "{head}");
}

// ---------------------------------------------------------------------------------------
// Rate limits

#[tokio::test]
async fn a_client_over_its_rate_gets_429_while_another_is_served() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}[upstreams.app]\nservers = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/login\"\nupstream = \"app\"\n\
         rate_limit = {{ rate = \"1/m\", burst = 3, key = \"header:x-user\" }}\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
        common::admin::ADMIN,
        a.addr
    ))
    .await;
    let c = client();
    let as_user = |user: &'static str| {
        let c = c.clone();
        let url = p.url("/login");
        async move { get_with(&c, &url, &[("x-user", user)]).await }
    };
    for _ in 0..3 {
        assert_eq!(as_user("mallory").await.status, 200);
    }
    let r = as_user("mallory").await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(r.text().contains("429"));
    // Another key and another route are served.
    assert_eq!(as_user("alice").await.status, 200);
    assert_eq!(get(p.url("/other")).await.status, 200);
    let m = metrics(&p).await;
    assert_eq!(
        m.get("fairway_rate_limited_total", &[("upstream", "app")]),
        Some(1.0)
    );
    assert_eq!(a.hits(), 5);
}

#[tokio::test]
async fn a_rate_limited_keep_alive_connection_stays_open() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{}\"]\n\
         [[routes]]\nupstream = \"app\"\nrate_limit = {{ rate = \"1/m\", burst = 1 }}\n",
        a.addr
    ))
    .await;
    let mut conn = common::raw::RawConn::connect(p.addr).await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for want in [200, 429, 429] {
        conn.send(req).await;
        assert_eq!(conn.response().await.status, want);
    }
}

#[tokio::test]
async fn client_ip_buckets_follow_the_proxy_protocol_address_and_stay_bounded() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         rate_limit_max_keys = 64\n[upstreams.app]\nservers = [\"{}\"]\n\
         [[routes]]\nupstream = \"app\"\nrate_limit = {{ rate = \"1/m\", burst = 1 }}\n",
        a.addr
    ))
    .await;
    let send_as = |ip: String| {
        let addr = p.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "PROXY TCP4 {ip} 127.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&out)[9..12].to_owned()
        }
    };
    assert_eq!(send_as("10.0.0.1".into()).await, "200");
    assert_eq!(send_as("10.0.0.1".into()).await, "429");
    assert_eq!(send_as("10.0.0.2".into()).await, "200");
    // A flood of distinct addresses: each new one is served, and the buckets stay bounded.
    for i in 0..300u32 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        assert_eq!(send_as(ip).await, "200");
    }
    let rt = p.handle().shared().runtime.load();
    let keys = rt.policies[0].rate_limit.as_ref().unwrap().keys();
    assert!(keys <= 64, "{keys} buckets kept");
}

// ---------------------------------------------------------------------------------------
// Connections per client IP

#[tokio::test]
async fn connections_past_max_connections_per_ip_are_closed_and_counted() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(
        &common::admin::config(&format!("[upstreams.app]\nservers = [\"{}\"]\n", a.addr))
            .replace("[server]\n", "[server]\nmax_connections_per_ip = 2\n"),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = common::raw::RawConn::connect(p.addr).await;
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(conn.response().await.status, 200);
        held.push(conn);
    }
    // The third from the same address is accepted and closed without an answer.
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut out))
        .await
        .expect("closed");
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let m = metrics(&p).await;
    assert_eq!(
        m.get("fairway_client_connections_rejected_total", &[]),
        Some(1.0)
    );
    // Once one closes, a new one is let in.
    drop(held.pop());
    eventually(
        Duration::from_secs(5),
        "a connection let in again",
        || async {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                client().request(Request::get(p.url("/")).body(Full::default()).unwrap()),
            )
            .await;
            matches!(r, Ok(Ok(resp)) if resp.status() == 200)
        },
    )
    .await;
}

#[tokio::test]
async fn a_sticky_cookie_naming_a_backup_keeps_to_it_while_it_is_healthy() {
    let primary = TestUpstream::start("primary").await;
    let backup = TestUpstream::start("backup").await;
    let p = TestProxy::start(&common::admin::config(&format!(
        "[upstreams.app]\nservers = [\"{}\", {{ addr = \"{}\", backup = true }}]\nretries = 1\n\
         [upstreams.app.sticky]\n",
        primary.addr, backup.addr
    )))
    .await;
    let c = client();
    let first = get_cookie(&c, &p.url("/"), None).await;
    assert_eq!(first.upstream(), "primary");
    let to_primary = cookie_of(&first).unwrap();
    // The primary is drained: the backup takes the client, with its own cookie.
    let drain = format!("/upstreams/app/servers/{}/drain", primary.addr);
    assert_eq!(common::admin::post(&p, &drain, "").await.status, 200);
    let moved = get_cookie(&c, &p.url("/"), Some(&to_primary)).await;
    assert_eq!(moved.upstream(), "backup");
    let to_backup = cookie_of(&moved).unwrap();
    // Back in rotation, the primary gets new clients; the backup keeps its own.
    let undrain = format!("/upstreams/app/servers/{}/undrain", primary.addr);
    assert_eq!(common::admin::post(&p, &undrain, "").await.status, 200);
    assert_eq!(
        get_cookie(&c, &p.url("/"), None).await.upstream(),
        "primary"
    );
    let kept = get_cookie(&c, &p.url("/"), Some(&to_backup)).await;
    assert_eq!(kept.upstream(), "backup");
    assert!(!kept.headers.contains_key("set-cookie"));
}

#[tokio::test]
async fn a_sticky_cookie_pins_with_every_balance() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let c3 = TestUpstream::start("c").await;
    for balance in ["round_robin", "ip_hash", "least_request"] {
        let p = TestProxy::start(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nbalance = \"{balance}\"\n\
             servers = [{}]\n[upstreams.app.sticky]\n",
            quoted(&[&a, &b, &c3])
        ))
        .await;
        let c = client();
        // A cookie with each server's id pins the client to it, whatever the balancer picks.
        for server in [&a, &b, &c3] {
            let cookie = format!(
                "fairway_sticky={}",
                fairway::sticky::server_id("app", &server.addr.to_string())
            );
            for _ in 0..5 {
                let r = get_cookie(&c, &p.url("/"), Some(&cookie)).await;
                assert_eq!(r.upstream(), server.name, "{balance}");
                assert!(!r.headers.contains_key("set-cookie"), "{balance}");
            }
        }
    }
}
