//! HTTPS on the client listener (CONTRACT §2 `[server] tls`, §7 `[[server.tls.certs]]`,
//! `redirect_http`, the certificate expiry gauge): a test CA, ALPN h2/http1.1, every usual
//! key type, WebSocket over TLS, SNI certificates, rotation on file change and bad
//! certificates kept out, handshake failures closing only their connection, the 308
//! redirect listener, and TLS turned off and on by a reload.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{Ca, KeyKind, LOCAL, TLS};
use common::tls::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// The proxy, with its certificate files beside its config

/// `[server]` on port 0 with `server_extra`, then `tls` (the `[server.tls]` section and any
/// `[[server.tls.certs]]`), `[admin]` on port 0, and `rest`.
fn config(server_extra: &str, tls: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\n{tls}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{rest}"
    )
}

/// `[upstreams.app]` over one server.
fn app(addr: SocketAddr) -> String {
    format!("[upstreams.app]\nservers = [\"{addr}\"]\n")
}

/// `fairway_tls_certificate_expiry_timestamp_seconds{server_name=NAME}`.
async fn expiry(p: &TestProxy, server_name: &str) -> Option<i64> {
    admin::metrics(p)
        .await
        .get(
            "fairway_tls_certificate_expiry_timestamp_seconds",
            &[("server_name", server_name)],
        )
        .map(|v| v as i64)
}

/// `fairway_config_reloads_total{result="failure"}`.
async fn reload_failures(p: &TestProxy) -> u64 {
    admin::metrics(p)
        .await
        .must("fairway_config_reloads_total", &[("result", "failure")]) as u64
}

// ---------------------------------------------------------------------------------------
// 1. HTTPS through to a plain upstream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_reaches_a_plain_upstream_as_forwarded_proto_https() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LOCAL);
    let up = TestUpstream::start("plain").await;
    let p = TestProxy::start_with_files(&leaf.files(""), &config("", TLS, &app(up.addr))).await;

    let s = connect(p.addr, "localhost", &trusting(&ca, &["http/1.1"]))
        .await
        .expect("a client trusting the test CA completes the handshake");
    assert_eq!(peer_cert(&s), leaf.der);
    let mut c = http1(s).await;
    let r = c.get("/hello?x=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), "plain");
    assert_eq!(r.json()["uri"], "/hello?x=1");
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );
    assert_eq!(r.seen_header("host"), Some(vec!["localhost".into()]));

    // A client cannot pass itself off as plain HTTP; and the connection is kept alive.
    let forged = c
        .request("/again")
        .header("x-forwarded-proto", "http")
        .body(Full::default())
        .unwrap();
    let r = c.send(forged).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );
    assert_eq!(up.hits(), 2);

    // A client that does not trust the test CA refuses the certificate.
    let stranger = Ca::new("another CA");
    let refused = connect(p.addr, "localhost", &trusting(&stranger, &["http/1.1"])).await;
    assert!(refused.is_err(), "a certificate from an unknown CA passed");
}

// ---------------------------------------------------------------------------------------
// 2. ALPN

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_or_http11() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("alpn").await;
    let p = TestProxy::start_with_files(&ca.leaf(LOCAL).files(""), &config("", TLS, &app(up.addr)))
        .await;

    // h2 preferred: two requests multiplexed on one connection, HTTP/1.1 to the upstream.
    let s = connect(p.addr, "localhost", &trusting(&ca, &["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut a = http2(s).await;
    let mut b = a.clone_h2();
    let (ra, rb) = tokio::join!(a.get("/h2/a"), b.get("/h2/b"));
    for (r, uri) in [(ra, "/h2/a"), (rb, "/h2/b")] {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["uri"], uri);
        assert_eq!(r.json()["version"], "HTTP/1.1");
        assert_eq!(
            r.seen_header("x-forwarded-proto"),
            Some(vec!["https".into()])
        );
        assert_eq!(r.seen_header("host"), Some(vec!["localhost".into()]));
    }

    // Only http/1.1 offered.
    let s = connect(p.addr, "localhost", &trusting(&ca, &["http/1.1"]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = http1(s).await.get("/h1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/1.1");

    // No ALPN at all (curl --no-alpn, old clients): HTTP/1.1.
    let s = connect(p.addr, "localhost", &trusting(&ca, &[]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    let r = http1(s).await.get("/no-alpn").await;
    assert_eq!(r.status, 200);

    // A protocol the proxy does not speak is refused rather than mis-served.
    let refused = connect(p.addr, "localhost", &trusting(&ca, &["spdy/3"])).await;
    assert!(
        refused.is_err(),
        "a handshake offering only an unknown ALPN protocol succeeded"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Key types

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_usual_key_type_serves() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("keys").await;
    let kinds = [
        KeyKind::EcdsaP256,
        KeyKind::EcdsaP256Sec1,
        KeyKind::EcdsaP384,
        KeyKind::Ed25519,
        KeyKind::Rsa,
        KeyKind::RsaPkcs1,
    ];
    for kind in kinds {
        let leaf = ca.issue(LOCAL, kind, (2020, 1, 1), (2040, 1, 1));
        let label = match kind {
            KeyKind::EcdsaP256Sec1 => "EC PRIVATE KEY",
            KeyKind::RsaPkcs1 => "RSA PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        assert!(
            leaf.key_pem
                .starts_with(&format!("-----BEGIN {label}-----\n")),
            "{kind:?}: {}",
            leaf.key_pem
        );
        let p = TestProxy::start_with_files(&leaf.files(""), &config("", TLS, &app(up.addr))).await;
        let s = connect(p.addr, "localhost", &trusting(&ca, &["h2", "http/1.1"]))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: handshake failed: {e}"));
        assert_eq!(peer_cert(&s), leaf.der, "{kind:?}");
        let r = http2(s).await.get(&format!("/{kind:?}")).await;
        assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    }
}

// ---------------------------------------------------------------------------------------
// 4. WebSocket over TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("wss").await;
    let p = TestProxy::start_with_files(&ca.leaf(LOCAL).files(""), &config("", TLS, &app(up.addr)))
        .await;

    let s = connect(p.addr, "localhost", &trusting(&ca, &["http/1.1"]))
        .await
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async("wss://localhost/ws", s),
    )
    .await
    .expect("WebSocket handshake hung")
    .expect("WebSocket handshake failed");
    assert_eq!(resp.status(), 101);
    for text in ["hi", "again"] {
        ws.send(Message::text(text)).await.unwrap();
        let reply = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no echo")
            .expect("tunnel closed")
            .unwrap();
        assert_eq!(reply.to_text().unwrap(), format!("wss: {text}"));
    }
    ws.close(None).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. SNI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate() {
    let ca = Ca::new("test CA");
    let default = ca.leaf(LOCAL);
    let api = ca.issue(
        &["api.test", "*.apps.test"],
        KeyKind::EcdsaP256,
        (2020, 1, 1),
        (2038, 3, 4),
    );
    // An exact name inside the wildcard, and a longer wildcard, in a later entry.
    let deep = ca.issue(
        &["special.apps.test", "*.eu.apps.test"],
        KeyKind::Ed25519,
        (2020, 1, 1),
        (2039, 5, 6),
    );
    let up = TestUpstream::start("sni").await;
    let mut files = default.files("");
    files.push(("api.pem".into(), api.cert_pem.clone()));
    files.push(("api-key.pem".into(), api.key_pem.clone()));
    files.push(("deep.pem".into(), deep.cert_pem.clone()));
    files.push(("deep-key.pem".into(), deep.key_pem.clone()));
    let tls = format!(
        "{TLS}\n[[server.tls.certs]]\nserver_names = [\"api.test\", \"*.apps.test\"]\n\
         cert = \"api.pem\"\nkey = \"api-key.pem\"\n\n\
         [[server.tls.certs]]\nserver_names = [\"special.apps.test\", \"*.eu.apps.test\"]\n\
         cert = \"deep.pem\"\nkey = \"deep-key.pem\"\n"
    );
    let p = TestProxy::start_with_files(&files, &config("", &tls, &app(up.addr))).await;

    // Verifying clients: each name gets a certificate valid for it.
    let verify = trusting(&ca, &["http/1.1"]);
    for (name, want) in [
        ("api.test", &api),
        ("x.apps.test", &api),
        ("special.apps.test", &deep),
        ("x.eu.apps.test", &deep),
        ("localhost", &default),
        // An IP address: rustls sends no SNI at all.
        ("127.0.0.1", &default),
    ] {
        let s = connect(p.addr, name, &verify)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(peer_cert(&s) == want.der, "{name}: wrong certificate");
        let r = http1(s).await.get("/").await;
        assert_eq!(r.status, 200, "{name}");
    }

    // Names no SNI certificate covers get the default (seen without verification); names
    // match case-insensitively.
    let any = trusting_anything();
    for (name, want) in [
        ("other.test", &default),
        ("apps.test", &default),
        ("api.test.evil", &default),
        ("API.test", &api),
        ("y.APPS.test", &api),
    ] {
        let got = served_cert(p.addr, name, &any).await;
        assert!(got.as_ref() == Some(&want.der), "{name}: wrong certificate");
    }

    // The expiry gauge has one series per name.
    assert_eq!(expiry(&p, "default").await, Some(default.not_after));
    assert_eq!(expiry(&p, "api.test").await, Some(api.not_after));
    assert_eq!(expiry(&p, "*.apps.test").await, Some(api.not_after));
    assert_eq!(expiry(&p, "special.apps.test").await, Some(deep.not_after));
    assert_eq!(expiry(&p, "*.eu.apps.test").await, Some(deep.not_after));

    // A reload without the SNI entries: those names fall back to the default, and their
    // series leave the gauge.
    replace(&p.file("fairway.toml"), &config("", TLS, &app(up.addr)));
    p.handle().reload().expect("reload");
    assert_eq!(
        served_cert(p.addr, "api.test", &any).await,
        Some(default.der.clone())
    );
    assert_eq!(expiry(&p, "api.test").await, None);
    assert_eq!(expiry(&p, "*.eu.apps.test").await, None);
    assert_eq!(expiry(&p, "default").await, Some(default.not_after));
}

// ---------------------------------------------------------------------------------------
// 6. Rotation on file change

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_within_2s_and_open_connections_live_on() {
    let ca = Ca::new("test CA");
    let old = ca.issue(LOCAL, KeyKind::EcdsaP256, (2020, 1, 1), (2040, 1, 1));
    let new = ca.issue(LOCAL, KeyKind::EcdsaP256, (2024, 1, 1), (2041, 6, 15));
    let up = TestUpstream::start("rotate").await;
    // The certificates live in a directory of their own, named relative to the config.
    let tls = "[server.tls]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n";
    let p =
        TestProxy::start_with_files(&old.files("certs/"), &config("", tls, &app(up.addr))).await;
    assert_eq!(expiry(&p, "default").await, Some(old.not_after));

    let verify = trusting(&ca, &["http/1.1"]);
    let s = connect(p.addr, "localhost", &verify).await.unwrap();
    assert_eq!(peer_cert(&s), old.der);
    let mut open = http1(s).await;
    assert_eq!(open.get("/before").await.status, 200);

    replace(&p.file("certs/key.pem"), &new.key_pem);
    replace(&p.file("certs/cert.pem"), &new.cert_pem);
    let t0 = Instant::now();
    eventually(
        WITHIN,
        "new handshakes present the renewed certificate",
        || {
            let verify = Arc::clone(&verify);
            let (addr, want) = (p.addr, new.der.clone());
            async move { served_cert(addr, "localhost", &verify).await == Some(want) }
        },
    )
    .await;
    eprintln!("renewed certificate served after {:?}", t0.elapsed());

    // The connection opened with the old certificate keeps working.
    let r = open.get("/after").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/after");
    assert_eq!(https_get(p.addr, &ca, "/fresh").await.status, 200);
    assert_eq!(expiry(&p, "default").await, Some(new.not_after));
}

// ---------------------------------------------------------------------------------------
// 7. A bad certificate is kept out

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_fails_the_reload_and_the_old_one_stays() {
    let ca = Ca::new("test CA");
    let good = ca.leaf(LOCAL);
    let up = TestUpstream::start("bad").await;
    let p = TestProxy::start_with_files(&good.files(""), &config("", TLS, &app(up.addr))).await;
    let verify = trusting(&ca, &["http/1.1"]);
    let mut open = http1(connect(p.addr, "localhost", &verify).await.unwrap()).await;
    assert_eq!(open.get("/").await.status, 200);

    // Garbage in the certificate file.
    let failures = reload_failures(&p).await;
    replace(&p.file("cert.pem"), "this is not a certificate\n");
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("server.tls.cert"), "{}", r.text());
    assert!(r.text().contains("cert.pem"), "{}", r.text());
    assert!(reload_failures(&p).await > failures);
    assert_eq!(
        admin::metrics(&p)
            .await
            .get("fairway_config_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(
        served_cert(p.addr, "localhost", &verify).await,
        Some(good.der.clone())
    );
    assert_eq!(open.get("/still").await.status, 200);

    // A valid certificate that does not go with the key.
    let failures = reload_failures(&p).await;
    let stranger = ca.leaf(LOCAL);
    replace(&p.file("cert.pem"), &stranger.cert_pem);
    let e = p
        .handle()
        .reload()
        .expect_err("a certificate that does not match its key was accepted");
    assert!(e.to_string().contains("does not belong"), "{e}");
    assert!(reload_failures(&p).await > failures);
    assert_eq!(
        served_cert(p.addr, "localhost", &verify).await,
        Some(good.der.clone())
    );
    assert_eq!(expiry(&p, "default").await, Some(good.not_after));
    assert_eq!(open.get("/still").await.status, 200);

    // Putting the good file back is a successful reload.
    replace(&p.file("cert.pem"), &good.cert_pem);
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(https_get(p.addr, &ca, "/").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 8. Handshake failures close that connection only

/// Connects, writes `bytes`, and reads until the proxy closes; returns what came back
/// (`None`: the connection was reset) and how long it took.
async fn until_closed(addr: SocketAddr, bytes: &'static [u8]) -> (Option<Vec<u8>>, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    if !bytes.is_empty() {
        s.write_all(bytes).await.unwrap();
    }
    let mut out = Vec::new();
    let r = tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("the proxy kept the connection open");
    (r.ok().map(|_| out), t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_close_only_their_connection() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("steady").await;
    let p = TestProxy::start_with_files(
        &ca.leaf(LOCAL).files(""),
        &config("header_read_timeout = \"300ms\"", TLS, &app(up.addr)),
    )
    .await;
    let verify = trusting(&ca, &["http/1.1"]);
    let mut good = http1(connect(p.addr, "localhost", &verify).await.unwrap()).await;
    assert_eq!(good.get("/").await.status, 200);

    let addr = p.addr;
    // Plain HTTP on the TLS port.
    let plain = tokio::spawn(until_closed(
        addr,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ));
    // A TLS record header announcing a handshake, then nonsense.
    let junk = tokio::spawn(until_closed(addr, b"\x16\x03\x01\x00\x10garbagegarbage!!"));
    // A client that connects and says nothing.
    let silent = tokio::spawn(until_closed(addr, b""));
    // A client that completes the handshake and then says nothing.
    let v2 = Arc::clone(&verify);
    let quiet = tokio::spawn(async move {
        let mut s = connect(addr, "localhost", &v2).await.unwrap();
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(STEP, s.read_to_end(&mut buf))
            .await
            .expect("the proxy kept a silent TLS connection open");
        (r.ok().map(|_| buf), t0.elapsed())
    });

    // Meanwhile the good client keeps being served.
    let mut served = 0;
    while !(plain.is_finished()
        && junk.is_finished()
        && silent.is_finished()
        && quiet.is_finished())
    {
        let r = good.get(&format!("/meanwhile/{served}")).await;
        assert_eq!(r.status, 200);
        served += 1;
    }
    assert!(served > 0);

    let (answer, _) = plain.await.unwrap();
    let answer = String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into_owned();
    assert!(
        !answer.contains("HTTP/1.1"),
        "plain HTTP on the TLS port was answered in plain HTTP: {answer:?}"
    );
    let (_, took) = junk.await.unwrap();
    assert!(took < WITHIN, "junk handshake closed after {took:?}");
    let (answer, took) = silent.await.unwrap();
    assert!(
        answer.is_none_or(|b| b.is_empty()),
        "a silent client got bytes"
    );
    assert!(
        took >= Duration::from_millis(250) && took < WITHIN,
        "a silent client was closed after {took:?} (header_read_timeout 300ms)"
    );
    let (answer, took) = quiet.await.unwrap();
    assert!(
        answer.is_none_or(|b| b.is_empty()),
        "a silent TLS client got bytes"
    );
    assert!(
        took >= Duration::from_millis(250) && took < WITHIN,
        "a silent TLS client was closed after {took:?} (header_read_timeout 300ms)"
    );

    // Still fine afterwards, old connection and new.
    assert_eq!(good.get("/after").await.status, 200);
    assert_eq!(https_get(addr, &ca, "/new").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 9. redirect_http

/// The `Location` header of a raw HTTP/1.1 answer.
fn location(answer: &str) -> Option<&str> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location").then_some(v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_answers_308_to_https() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("redirect").await;
    let p = TestProxy::start_with_files(
        &ca.leaf(LOCAL).files(""),
        &config("redirect_http = \"127.0.0.1:0\"", TLS, &app(up.addr)),
    )
    .await;
    let redirect = p.handle().redirect_addr().expect("redirect_http is bound");
    assert_ne!(redirect, p.addr);

    for (head, want) in [
        (
            "GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\n",
            "https://example.com/path?q=1",
        ),
        // The plain port is not the https one: it is dropped, like Nginx's $host.
        (
            "GET /a/b HTTP/1.1\r\nHost: example.com:8080\r\n",
            "https://example.com/a/b",
        ),
        // 308 keeps the method and body: a POST is redirected too.
        (
            "POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n",
            "https://example.com/upload",
        ),
    ] {
        let req = format!("{head}Connection: close\r\n\r\n");
        let body = if head.starts_with("POST") { "hi" } else { "" };
        let answer = raw(
            redirect,
            format!("{req}{body}").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(raw_status(&answer), Some(308), "{answer}");
        assert_eq!(location(&answer), Some(want), "{answer}");
    }
    assert_eq!(up.hits(), 0, "a redirected request reached the upstream");
    // The TLS listener itself is not redirecting.
    assert_eq!(https_get(p.addr, &ca, "/").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 10. TLS turned on and off by a reload, on the same port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_turned_off_and_on_by_a_reload_on_the_same_port() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LOCAL);
    let up = TestUpstream::start("toggle").await;
    let p = TestProxy::start_with_files(&leaf.files(""), &config("", TLS, &app(up.addr))).await;
    let verify = trusting(&ca, &["http/1.1"]);
    let mut open = http1(connect(p.addr, "localhost", &verify).await.unwrap()).await;
    assert_eq!(open.get("/").await.status, 200);

    // Off: new connections are plain HTTP; the open TLS connection lives on.
    replace(&p.file("fairway.toml"), &config("", "", &app(up.addr)));
    p.handle().reload().expect("reload without TLS");
    assert_eq!(p.handle().client_addrs(), vec![p.addr]);
    let r = get(&format!("http://{}/plain", p.addr)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["http".into()])
    );
    assert!(connect(p.addr, "localhost", &verify).await.is_err());
    let r = open.get("/still-tls").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );

    // On again.
    replace(&p.file("fairway.toml"), &config("", TLS, &app(up.addr)));
    p.handle().reload().expect("reload with TLS");
    let r = https_get(p.addr, &ca, "/tls-again").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );
}
