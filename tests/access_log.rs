//! The access log written by the real binary on its stdout (CONTRACT §7 `[log] access`):
//! `json` and `common` lines for routed requests and a route miss, with the client, time,
//! method, path, status, bytes, upstream, server, duration and attempts of each.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use common::process::{Proc, fairway, log_level};
use common::*;
use http::Request;
use http_body_util::Full;

/// Starts the binary with `[log] access = format` in front of `up`, and sends its three
/// requests: two routed 200s and one route miss. Returns the child, the bodies' lengths by
/// path and the time window of the requests.
async fn access_log_run(
    format: &str,
    up: &TestUpstream,
) -> (
    Proc,
    BTreeMap<&'static str, usize>,
    tempfile::TempDir,
    (SystemTime, SystemTime),
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fairway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"{format}\"\n\n\
             [upstreams.app]\nservers = [\"{}\"]\n\n\
             [[routes]]\nhost = \"app.test\"\nupstream = \"app\"\n",
            up.addr
        ),
    )
    .unwrap();
    let mut cmd = fairway(&["run", "--config", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", log_level("warn"))
        .stdout(Stdio::piped());
    let mut f = Proc::spawn(cmd);
    let addr = f.client_addr().await;
    let t0 = SystemTime::now();
    let c = client();
    let mut sizes = BTreeMap::new();
    for (host, path, code) in [
        ("app.test", "/hello?x=1&y=two", 200),
        ("app.test", "/bytes/1234", 200),
        ("nowhere.test", "/missing?q=1", 404),
    ] {
        let r = send(
            &c,
            Request::get(format!("http://{addr}{path}"))
                .header("host", host)
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, code, "{path}: {}", r.text());
        sizes.insert(path, r.body.len());
    }
    assert_eq!(sizes["/bytes/1234"], 1234);
    let t1 = SystemTime::now();
    (f, sizes, dir, (t0, t1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_lines_from_the_binary() {
    let up = TestUpstream::start("a").await;
    let (mut f, sizes, _dir, (t0, t1)) = access_log_run("json", &up).await;
    let lines = f.stdout_lines(3, Duration::from_secs(5)).await;
    let mut by_path = BTreeMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {line:?}"));
        by_path.insert(v["path"].as_str().expect("path").to_owned(), v);
    }
    let keys: Vec<&str> = by_path.keys().map(String::as_str).collect();
    assert_eq!(keys, ["/bytes/1234", "/hello?x=1&y=two", "/missing?q=1"]);
    for (path, v) in &by_path {
        let miss = path.starts_with("/missing");
        let time = humantime::parse_rfc3339(v["time"].as_str().expect("time string"))
            .unwrap_or_else(|e| panic!("time {}: {e}", v["time"]));
        assert!(
            time + Duration::from_secs(1) >= t0 && time <= t1 + Duration::from_secs(1),
            "time {:?} outside the requests",
            v["time"]
        );
        assert_eq!(v["client"], "127.0.0.1", "{v}");
        assert_eq!(v["method"], "GET", "{v}");
        assert_eq!(v["status"], if miss { 404 } else { 200 }, "{v}");
        assert_eq!(
            v["bytes"].as_u64(),
            Some(sizes[path.as_str()] as u64),
            "{v}"
        );
        assert_eq!(v["upstream"], if miss { "-" } else { "app" }, "{v}");
        let server = up.addr.to_string();
        assert_eq!(v["server"], if miss { "-" } else { server.as_str() }, "{v}");
        let d = v["duration"].as_f64().expect("duration number");
        assert!((0.0..10.0).contains(&d), "{v}");
        assert_eq!(v["attempts"], if miss { 0 } else { 1 }, "{v}");
        // CONTRACT §8 `request_id`: a new ID per request, the route miss included.
        let id = v["request_id"].as_str().expect("request_id");
        assert!(
            id.len() == 32 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{v}"
        );
    }
    let ids: std::collections::BTreeSet<_> = by_path
        .values()
        .map(|v| v["request_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    f.signal("TERM");
    f.expect_clean_exit(Duration::from_secs(10)).await;
}

/// `client - - [time] "METHOD PATH PROTO" status bytes key=value...`.
#[derive(Debug)]
struct CommonLine {
    client: String,
    time: String,
    method: String,
    path: String,
    protocol: String,
    status: u16,
    bytes: u64,
    fields: BTreeMap<String, String>,
}

fn parse_common(line: &str) -> CommonLine {
    let fail = |what: &str| -> ! { panic!("{what} in common log line {line:?}") };
    let (client, rest) = line
        .split_once(" - - [")
        .unwrap_or_else(|| fail("no ' - - ['"));
    let (time, rest) = rest.split_once("] \"").unwrap_or_else(|| fail("no time"));
    let (request, rest) = rest.split_once("\" ").unwrap_or_else(|| fail("no request"));
    let mut req = request.split(' ');
    let (Some(method), Some(path), Some(protocol), None) =
        (req.next(), req.next(), req.next(), req.next())
    else {
        fail("bad request line")
    };
    let mut rest = rest.split(' ');
    let status = rest
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail("bad status"));
    let bytes = rest
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail("bad bytes"));
    let fields = rest
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| fail("bad key=value"));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    CommonLine {
        client: client.to_owned(),
        time: time.to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        protocol: protocol.to_owned(),
        status,
        bytes,
        fields,
    }
}

/// `10/Oct/2000:13:55:36 +0000`, the Common Log Format time (always UTC here).
fn parse_clf(time: &str) -> SystemTime {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let fail = || -> ! { panic!("time {time:?} is not DD/Mon/YYYY:HH:MM:SS +0000") };
    let Some((date, "+0000")) = time.split_once(' ') else {
        fail()
    };
    let mut parts = date.splitn(3, '/');
    let (Some(day), Some(month), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        fail()
    };
    let month = MONTHS
        .iter()
        .position(|m| *m == month)
        .unwrap_or_else(|| fail())
        + 1;
    let Some((year, clock)) = rest.split_once(':') else {
        fail()
    };
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day}T{clock}Z"))
        .unwrap_or_else(|_| fail())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_access_log_lines_from_the_binary() {
    let up = TestUpstream::start("a").await;
    let (mut f, sizes, _dir, (t0, t1)) = access_log_run("common", &up).await;
    let lines = f.stdout_lines(3, Duration::from_secs(5)).await;
    let server = up.addr.to_string();
    let mut paths = Vec::new();
    for line in &lines {
        assert!(line.starts_with("127.0.0.1 - - ["), "{line:?}");
        let l = parse_common(line);
        let miss = l.path.starts_with("/missing");
        assert_eq!(l.client, "127.0.0.1");
        let time = parse_clf(&l.time);
        assert!(
            time + Duration::from_secs(1) >= t0 && time <= t1 + Duration::from_secs(1),
            "time {:?} outside the requests",
            l.time
        );
        assert_eq!(
            (l.method.as_str(), l.protocol.as_str()),
            ("GET", "HTTP/1.1"),
            "{line}"
        );
        assert_eq!(l.status, if miss { 404 } else { 200 }, "{line}");
        assert_eq!(l.bytes, sizes[l.path.as_str()] as u64, "{line}");
        let field = |k: &str| l.fields.get(k).map(String::as_str);
        assert_eq!(
            field("server"),
            Some(if miss { "-" } else { server.as_str() }),
            "{line}"
        );
        assert_eq!(
            field("upstream"),
            Some(if miss { "-" } else { "app" }),
            "{line}"
        );
        assert_eq!(
            field("attempts"),
            Some(if miss { "0" } else { "1" }),
            "{line}"
        );
        let d: f64 = field("duration")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no duration in {line:?}"));
        assert!((0.0..10.0).contains(&d), "{line}");
        paths.push(l.path);
    }
    paths.sort();
    assert_eq!(paths, ["/bytes/1234", "/hello?x=1&y=two", "/missing?q=1"]);
    f.signal("TERM");
    f.expect_clean_exit(Duration::from_secs(10)).await;
}

/// A client that goes away before its answer is logged with status 499 (as Nginx logs it),
/// with the upstream and server its request was going to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_went_away_is_logged_499() {
    use tokio::io::AsyncWriteExt;
    let up = TestUpstream::start("a").await;
    let (mut f, _, _dir, _) = access_log_run("json", &up).await;
    let _routed = f.stdout_lines(3, Duration::from_secs(5)).await;
    let addr = f.client_addr().await;
    let hits = up.hits();
    // An upload abandoned half-way, once the server has the request.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\n\r\nhalf")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the server has the request", || {
        let n = up.hits();
        async move { n > hits }
    })
    .await;
    drop(s);
    let line = &f.stdout_lines(1, Duration::from_secs(5)).await[0];
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["status"], 499, "{line}");
    assert_eq!(v["path"], "/upload", "{line}");
    assert_eq!(v["upstream"], "app", "{line}");
    assert_eq!(v["server"], up.addr.to_string(), "{line}");
}

/// A request head refused before it could be read is logged like every other answer: its
/// status and body size, with `-` for the method and target it never had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_is_logged_with_its_status() {
    let up = TestUpstream::start("a").await;
    let (mut f, _, _dir, _) = access_log_run("json", &up).await;
    let _routed = f.stdout_lines(3, Duration::from_secs(5)).await;
    let addr = f.client_addr().await;
    let answer = raw(
        addr,
        b"GET  / HTTP/1.1\r\nHost: app.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let line = &f.stdout_lines(1, Duration::from_secs(5)).await[0];
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["status"], 400, "{line}");
    assert_eq!(v["method"], "-", "{line}");
    assert_eq!(v["path"], "-", "{line}");
    assert_eq!(v["bytes"], body.len(), "{line}");
    assert_eq!(v["upstream"], "-", "{line}");
}
