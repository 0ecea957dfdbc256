//! TLS to upstreams (CONTRACT §7 upstream `tls`, `ca`, `server_name`,
//! `insecure_skip_verify`): verification against the configured CA and name, pooled TLS
//! connections, a replaced CA file taking effect within 2 s, and health checks over TLS.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::pki::{Ca, LOCAL};
use common::tls::*;
use common::*;

// ---------------------------------------------------------------------------------------
// Helpers

/// `/status` → `upstreams.app.servers[0].healthy`.
async fn healthy(p: &TestProxy) -> bool {
    let s = admin::status(p).await;
    s["upstreams"]["app"]["servers"][0]["healthy"]
        .as_bool()
        .unwrap_or_else(|| panic!("no healthy flag in /status: {s}"))
}

/// A plain-HTTP proxy (with admin) in front of the TLS upstream `up`, with `keys` added
/// under `[upstreams.app]` and the CA file `ca.pem` beside the config.
async fn proxy_to_tls(ca: &Ca, up: &TlsUpstream, keys: &str) -> TestProxy {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"{}\"]\n{keys}\n",
        up.addr
    );
    TestProxy::start_with_files(&[("ca.pem".into(), ca.pem())], &toml).await
}

/// GET `path` from the proxy over plain HTTP.
async fn plain_get(p: &TestProxy, path: &str) -> Reply {
    get(&format!("http://{}{path}", p.addr)).await
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_against_the_configured_ca() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;

    // Verified against ca.pem, for the address's IP (no SNI for an IP).
    let p = proxy_to_tls(&ca, &up, "tls = true\nca = \"ca.pem\"").await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(up.last_sni(), Some(None));
    // Kept alive and pooled: a second request needs no new handshake.
    let handshakes = up.handshakes();
    let r = plain_get(&p, "/y").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(
        up.handshakes(),
        handshakes,
        "the pooled TLS connection was not reused"
    );
    drop(p);

    // A host name in `addr` is the name sent and verified.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"localhost:{}\"]\ntls = true\nca = \"ca.pem\"\n",
        up.addr.port()
    );
    let p = TestProxy::start_with_files(&[("ca.pem".into(), ca.pem())], &toml).await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(up.last_sni(), Some(Some("localhost".into())));
    drop(p);

    // server_name: sent as SNI and verified.
    let p = proxy_to_tls(
        &ca,
        &up,
        "tls = true\nca = \"ca.pem\"\nserver_name = \"localhost\"",
    )
    .await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(up.last_sni(), Some(Some("localhost".into())));
    drop(p);

    // A name the certificate does not cover fails verification: 502.
    let hits = up.hits.load(Ordering::SeqCst);
    let p = proxy_to_tls(
        &ca,
        &up,
        "tls = true\nca = \"ca.pem\"\nserver_name = \"wrong.test\"",
    )
    .await;
    let r = plain_get(&p, "/x").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "a request went to an unverified server"
    );
    drop(p);

    // A certificate from a CA that ca.pem does not hold: 502.
    let other = Ca::new("other CA");
    let p = proxy_to_tls(&other, &up, "tls = true\nca = \"ca.pem\"").await;
    let r = plain_get(&p, "/x").await;
    assert_eq!(r.status, 502, "{}", r.text());
    drop(p);

    // insecure_skip_verify: any certificate, no CA needed.
    let p = proxy_to_tls(&other, &up, "tls = true\ninsecure_skip_verify = true").await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_upstream_ca_file_takes_effect_within_2s() {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;
    // Starts with the wrong CA in ca.pem: nothing verifies. (Passive marking is kept out of
    // the way: a server that failed would otherwise rest for `fail_timeout`.)
    let keys = "tls = true\nca = \"ca.pem\"\n\n[upstreams.app.passive]\nmax_fails = 1000\n";
    let p = proxy_to_tls(&other, &up, keys).await;
    assert_eq!(plain_get(&p, "/").await.status, 502);

    replace(&p.file("ca.pem"), &ca.pem());
    let addr = p.addr;
    eventually(WITHIN, "the new CA file is used", || async move {
        get(&format!("http://{addr}/")).await.status == 200
    })
    .await;
    assert_eq!(plain_get(&p, "/").await.text(), "secure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_run_over_tls() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;
    let hc = "\n[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\n\
              timeout = \"100ms\"\n";

    let p = proxy_to_tls(&ca, &up, &format!("tls = true\nca = \"ca.pem\"\n{hc}")).await;
    let start = up.health_hits.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(5),
        "three health checks over TLS",
        || {
            let h = Arc::clone(&up.health_hits);
            async move { h.load(Ordering::SeqCst) >= start + 3 }
        },
    )
    .await;
    assert!(
        healthy(&p).await,
        "checks over TLS pass: the server stays up"
    );
    let r = plain_get(&p, "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    drop(p);

    // Checks verify the certificate too: with a wrong name the server goes down.
    let p = proxy_to_tls(
        &ca,
        &up,
        &format!("tls = true\nca = \"ca.pem\"\nserver_name = \"wrong.test\"\n{hc}"),
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "an unverifiable server is marked down",
        || {
            let p = &p;
            async move { !healthy(p).await }
        },
    )
    .await;
    assert_eq!(plain_get(&p, "/").await.status, 503);
}
