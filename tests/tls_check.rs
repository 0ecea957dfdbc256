//! `fairway check` on TLS settings (CONTRACT §1, §7): good certificates pass; a missing
//! file, a key that does not belong, an expired or not yet valid certificate, a bad SNI
//! entry or upstream CA, and upstream TLS keys without `tls = true` are refused with the
//! key and the file named; `--probe` reaches a TLS upstream.

mod common;

use std::sync::atomic::Ordering;

use common::pki::{Ca, KeyKind, LOCAL, TLS};
use common::process::{Output, fairway, output};
use common::tls::*;

/// `fairway check [extra] -c DIR/fairway.toml` with `toml` and `files` in a new directory.
fn check(files: &[(String, String)], toml: &str, extra: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("fairway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut args = vec!["check"];
    args.extend_from_slice(extra);
    args.extend(["-c", path.to_str().unwrap()]);
    (output(fairway(&args)), dir)
}

/// A config for `check` (nothing is bound) with `tls` as its `[server.tls]` part.
fn check_config(tls: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8443\"\n\n{tls}\n\
         [upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n"
    )
}

/// Runs `check`, expects exit 1 and each of `want` on stderr (`{dir}` is the directory).
fn check_fails(files: &[(String, String)], tls: &str, want: &[&str]) {
    let (o, dir) = check(files, &check_config(tls), &[]);
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
    for w in want {
        let w = w.replace("{dir}", dir.path().to_str().unwrap());
        assert!(o.stderr.contains(&w), "{w:?} not in stderr: {}", o.stderr);
    }
}

#[test]
fn check_accepts_good_certificates() {
    let ca = Ca::new("test CA");
    let mut files = ca.leaf(LOCAL).files("");
    let sni = ca.issue(&["api.test"], KeyKind::Ed25519, (2020, 1, 1), (2040, 1, 1));
    files.push(("api.pem".into(), sni.cert_pem));
    files.push(("api-key.pem".into(), sni.key_pem));
    let tls = format!(
        "{TLS}\n[[server.tls.certs]]\nserver_names = [\"api.test\"]\n\
         cert = \"api.pem\"\nkey = \"api-key.pem\"\n"
    );
    let (o, _dir) = check(&files, &check_config(&tls), &[]);
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
    assert!(o.stdout.contains("TLS"), "{}", o.stdout);
}

#[test]
fn check_names_a_missing_certificate_file() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LOCAL);
    check_fails(
        &[("key.pem".into(), leaf.key_pem)],
        TLS,
        &["server.tls.cert", "{dir}/cert.pem"],
    );
}

#[test]
fn check_names_a_key_that_does_not_belong() {
    let ca = Ca::new("test CA");
    let (a, b) = (ca.leaf(LOCAL), ca.leaf(LOCAL));
    check_fails(
        &[
            ("cert.pem".into(), a.cert_pem),
            ("key.pem".into(), b.key_pem),
        ],
        TLS,
        &["does not belong", "{dir}/key.pem", "{dir}/cert.pem"],
    );
}

#[test]
fn check_refuses_an_expired_certificate() {
    let ca = Ca::new("test CA");
    let leaf = ca.issue(LOCAL, KeyKind::EcdsaP256, (2000, 1, 1), (2001, 1, 1));
    check_fails(
        &leaf.files(""),
        TLS,
        &["server.tls.cert", "expired", "2001-01-01"],
    );
}

#[test]
fn check_refuses_a_certificate_not_yet_valid() {
    let ca = Ca::new("test CA");
    let leaf = ca.issue(LOCAL, KeyKind::EcdsaP256, (2090, 1, 1), (2095, 1, 1));
    check_fails(
        &leaf.files(""),
        TLS,
        &["server.tls.cert", "not valid before", "2090-01-01"],
    );
}

#[test]
fn check_names_the_sni_entry_and_the_upstream_ca() {
    let ca = Ca::new("test CA");
    let mut files = ca.leaf(LOCAL).files("");
    let expired = ca.issue(
        &["api.test"],
        KeyKind::EcdsaP256,
        (2000, 1, 1),
        (2001, 1, 1),
    );
    files.push(("api.pem".into(), expired.cert_pem));
    files.push(("api-key.pem".into(), expired.key_pem));
    let tls = format!(
        "{TLS}\n[[server.tls.certs]]\nserver_names = [\"api.test\"]\n\
         cert = \"api.pem\"\nkey = \"api-key.pem\"\n"
    );
    check_fails(&files, &tls, &["server.tls.certs[0].cert", "expired"]);

    let toml = "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\n\
                servers = [\"127.0.0.1:13000\"]\ntls = true\nca = \"missing-ca.pem\"\n";
    let (o, _dir) = check(&[], toml, &[]);
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
    assert!(o.stderr.contains("upstreams.app.ca"), "{}", o.stderr);
    assert!(o.stderr.contains("missing-ca.pem"), "{}", o.stderr);
}

#[test]
fn check_refuses_upstream_tls_keys_without_tls() {
    for key in [
        "ca = \"ca.pem\"",
        "server_name = \"app.internal\"",
        "insecure_skip_verify = true",
    ] {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\n\
             servers = [\"127.0.0.1:13000\"]\n{key}\n"
        );
        let (o, _dir) = check(&[], &toml, &[]);
        assert_eq!(
            o.code,
            Some(1),
            "{key}: stdout: {} stderr: {}",
            o.stdout,
            o.stderr
        );
        let name = key.split(' ').next().unwrap();
        assert!(
            o.stderr.contains(&format!("upstreams.app.{name}")) && o.stderr.contains("tls = true"),
            "{key}: {}",
            o.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_probe_reaches_a_tls_upstream() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;
    let files = vec![("ca.pem".to_owned(), ca.pem())];
    let toml = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\nservers = [\"{}\"]\n\
             tls = true\nca = \"ca.pem\"\n{extra}\n\
             [upstreams.app.health_check]\npath = \"/health\"\n",
            up.addr
        )
    };
    let (good, bad) = (toml(""), toml("server_name = \"wrong.test\""));
    let f2 = files.clone();
    let (o, _dir) = tokio::task::spawn_blocking(move || check(&f2, &good, &["--probe"]))
        .await
        .unwrap();
    assert_eq!(o.code, Some(0), "stdout: {} stderr: {}", o.stdout, o.stderr);
    assert!(up.health_hits.load(Ordering::SeqCst) >= 1);
    let (o, _dir) = tokio::task::spawn_blocking(move || check(&files, &bad, &["--probe"]))
        .await
        .unwrap();
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
}
