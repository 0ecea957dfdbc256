//! The `fairway` command line as operators and scripts use it (CONTRACT §1): `check` exit
//! codes and located error messages, `FAIRWAY_CONFIG`, `--version`/`--help`, and the real
//! process lifecycle: start, serve, SIGHUP reload, SIGTERM/SIGINT drain and exit 0, `demo`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::process::*;
use common::*;
use tokio::time::Instant;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = r#"[server]
listen = "127.0.0.1:8080"
connect_timeout = "2s"

[upstreams.app]
balance = "round_robin"
servers = [
  { addr = "127.0.0.1:13000" },
  { addr = "127.0.0.1:13001", weight = 2 },
  { addr = "127.0.0.1:13002", backup = true },
]

[[routes]]
path_prefix = "/"
upstream = "app"
"#;

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "good.toml", GOOD);
    let o = output(fairway(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
    assert_eq!(o.stdout.lines().count(), 1, "{:?}", o.stdout);
    assert!(o.stdout.contains("ok"), "{:?}", o.stdout);
    assert!(o.stdout.contains(path.to_str().unwrap()), "{:?}", o.stdout);
}

/// Whether `text` holds `PATH:LINE:COL:` for some column.
fn is_located(text: &str, path: &str, line: usize) -> bool {
    let prefix = format!("{path}:{line}:");
    text.match_indices(&prefix).any(|(i, _)| {
        let rest = &text[i + prefix.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    })
}

/// Runs `fairway check` on `text` and expects exit 1, the error located at `PATH:line:col`,
/// and every one of `want` on stderr.
fn check_fails(text: &str, line: usize, want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.toml", text);
    let p = path.to_str().unwrap();
    let o = output(fairway(&["check", "-c", p]));
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
    assert!(
        is_located(&o.stderr, p, line),
        "no {p}:{line}:COL: in stderr: {}",
        o.stderr
    );
    for w in want {
        let w = w.replace("{path}", p);
        assert!(o.stderr.contains(&w), "{w:?} not in stderr: {}", o.stderr);
    }
    assert!(!o.stdout.contains("ok"), "stdout: {}", o.stdout);
}

#[test]
fn check_names_an_unknown_key() {
    check_fails(
        "[server]\nlisten = \"127.0.0.1:8080\"\nconect_timeout = \"1s\"\n\n\
         [upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n",
        3,
        &["{path}:3:1:", "server.conect_timeout", "unknown"],
    );
}

#[test]
fn check_names_a_zero_weight() {
    check_fails(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\nservers = [\n  \
         { addr = \"127.0.0.1:13000\" },\n  { addr = \"127.0.0.1:13001\", weight = 0 },\n]\n",
        7,
        &["upstreams.app.servers[1].weight"],
    );
}

#[test]
fn check_names_a_route_to_a_missing_upstream() {
    check_fails(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n\n\
         [[routes]]\npath_prefix = \"/api\"\nupstream = \"api\"\n",
        9,
        &["routes[0].upstream", "\"api\""],
    );
}

#[test]
fn check_names_a_bad_duration() {
    check_fails(
        "[server]\nlisten = \"127.0.0.1:8080\"\nidle_timeout = \"soon\"\n\n\
         [upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n",
        3,
        &["server.idle_timeout", "soon"],
    );
}

#[test]
fn check_accepts_a_health_check_timeout_longer_than_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{GOOD}\n[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\n"
    );
    let path = write(dir.path(), "hc.toml", &text);
    let o = output(fairway(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
    assert!(o.stdout.contains("ok"), "{:?}", o.stdout);
}

#[test]
fn check_names_a_mapped_trusted_proxy_with_a_short_prefix() {
    check_fails(
        "[server]\nlisten = \"127.0.0.1:8080\"\ntrusted_proxies = [\n  \"::ffff:10.0.0.1\",\n  \"::ffff:10.0.0.0/64\",\n]\n\n\
         [upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n",
        5,
        &[
            "{path}:5:3: server.trusted_proxies[1]: ",
            "\"::ffff:10.0.0.0/64\"",
            "prefix below 96",
        ],
    );
}

#[test]
fn check_locates_a_toml_syntax_error() {
    check_fails(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app\nservers = [\"127.0.0.1:13000\"]\n",
        4,
        &[],
    );
}

#[test]
fn check_reports_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let p = path.to_str().unwrap();
    let o = output(fairway(&["check", "-c", p]));
    assert_eq!(o.code, Some(1), "stdout: {}", o.stdout);
    assert!(o.stderr.contains(p), "{}", o.stderr);
}

#[test]
fn fairway_config_sets_the_default_path() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "from-env.toml", GOOD);
    let mut c = fairway(&["check"]);
    c.env("FAIRWAY_CONFIG", &good);
    let o = output(c);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains(good.to_str().unwrap()), "{}", o.stdout);

    let missing = dir.path().join("missing.toml");
    let mut c = fairway(&["check"]);
    c.env("FAIRWAY_CONFIG", &missing);
    let o = output(c);
    assert_eq!(o.code, Some(1));
    assert!(o.stderr.contains(missing.to_str().unwrap()), "{}", o.stderr);

    // An explicit -c wins over the environment, after the command or before it.
    let good = good.to_str().unwrap();
    for args in [["check", "-c", good], ["-c", good, "check"]] {
        let mut c = fairway(&args);
        c.env("FAIRWAY_CONFIG", &missing);
        let o = output(c);
        assert_eq!(o.code, Some(0), "{args:?}: {}", o.stderr);
    }
}

#[test]
fn version_and_help() {
    let o = output(fairway(&["--version"]));
    assert_eq!(o.code, Some(0));
    assert_eq!(o.stdout.trim(), "fairway 0.1.0");
    let o = output(fairway(&["--help"]));
    assert_eq!(o.code, Some(0));
    for word in ["run", "check", "demo", "--config"] {
        assert!(
            o.stdout.contains(word),
            "{word} not in --help: {}",
            o.stdout
        );
    }
}

#[test]
fn demo_offers_no_config_option() {
    // The demo writes its own config: `-c` would be silently ignored, so it is refused.
    let o = output(fairway(&["demo", "--help"]));
    assert_eq!(o.code, Some(0));
    assert!(!o.stdout.contains("--config"), "{}", o.stdout);
    let o = output(fairway(&["demo", "-c", "some.toml"]));
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    let o = output(fairway(&["-c", "some.toml", "demo"]));
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("does not apply"), "{}", o.stderr);
    // `run` and `check` still offer it.
    for args in [&["check", "--help"][..], &["run", "--help"]] {
        let o = output(fairway(args));
        assert!(o.stdout.contains("--config"), "{args:?}: {}", o.stdout);
    }
}

fn run_config(upstream: &TestUpstream) -> String {
    proxy_config("", &[upstream])
}

#[tokio::test(flavor = "multi_thread")]
async fn run_with_a_bad_config_exits_1_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\nconect_timeout = \"1s\"\n\n\
         [upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n",
    );
    let p = path.to_str().unwrap();
    let mut proc = Proc::spawn(fairway(&["run", "-c", p]));
    let status = proc
        .exit_within(Duration::from_secs(5))
        .await
        .expect("fairway run kept running with a bad config");
    assert_eq!(status.code(), Some(1));
    let err = proc.stderr();
    assert!(is_located(&err, p, 3), "{err}");
    assert!(err.contains("conect_timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_reloads_on_sighup_and_drains_on_sigterm() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "fairway.toml", &run_config(&a));

    // `fairway -c PATH`: run is the default command.
    let mut proc = Proc::spawn(fairway(&["-c", path.to_str().unwrap()]));
    let addr = proc.client_addr().await;
    let url = format!("http://{addr}/hello");
    let r = get(&url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), "a");

    // SIGHUP re-reads the file: the single server is now b.
    std::fs::write(&path, run_config(&b)).unwrap();
    proc.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "requests answered by b after SIGHUP",
        || {
            let url = url.clone();
            async move {
                let r = get(&url).await;
                r.status == 200 && r.upstream() == "b"
            }
        },
    )
    .await;

    // SIGTERM with a request in flight: the request finishes, then the process exits 0.
    b.set_delay(Duration::from_millis(700));
    let before = b.hits();
    let slow = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually(Duration::from_secs(5), "the slow request reached b", || {
        let n = b.hits();
        async move { n > before }
    })
    .await;
    proc.signal("TERM");
    let r = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the in-flight request did not finish")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), "b");
    proc.expect_clean_exit(Duration::from_secs(5)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_shuts_down_cleanly() {
    let a = TestUpstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "fairway.toml", &run_config(&a));
    let mut proc = Proc::spawn(fairway(&["run", "-c", path.to_str().unwrap()]));
    proc.client_addr().await;
    proc.signal("INT");
    proc.expect_clean_exit(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_three_nodes_in_turn() {
    let mut cmd = fairway(&["demo"]);
    cmd.stdout(Stdio::piped());
    let mut proc = Proc::spawn(cmd);

    // The URL lines look like `  proxy            http://127.0.0.1:8080/` and
    // `  admin            http://127.0.0.1:9901/healthz`.
    let mut proxy = None;
    let mut admin = None;
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.is_none() || admin.is_none() {
        let line = proc
            .stdout_line(deadline.saturating_duration_since(Instant::now()))
            .await;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["proxy", url] if url.starts_with("http://") => proxy = Some(url.to_string()),
            ["admin", url] if url.starts_with("http://") => admin = Some(url.to_string()),
            _ => {}
        }
        printed.push(line);
    }
    let (proxy, admin) = (proxy.unwrap(), admin.unwrap());
    let base = proxy.trim_end_matches('/');

    let mut served = Vec::new();
    for _ in 0..6 {
        let r = get(&format!("{base}/hello")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let node = ["node-1", "node-2", "node-3"]
            .into_iter()
            .find(|n| text.contains(n))
            .unwrap_or_else(|| panic!("no node name in {text:?}"));
        served.push(node);
    }
    assert_eq!(
        served,
        ["node-1", "node-2", "node-3", "node-1", "node-2", "node-3"]
    );

    // The admin listener is up too (CONTRACT §1: demo starts it).
    let r = get(&format!(
        "{}/healthz",
        admin.trim_end_matches("/healthz").trim_end_matches('/')
    ))
    .await;
    assert_eq!(r.status, 200, "{admin}: {}", r.text());

    proc.signal("TERM");
    proc.expect_clean_exit(Duration::from_secs(5)).await;
}
