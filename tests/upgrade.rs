//! Upgrading fairway itself (CONTRACT §9): `SIGUSR2` under traffic hands every listening
//! socket to a new process from the same executable, which serves before the old one drains;
//! no connection is refused and no request fails. A new process that cannot start leaves the
//! old one serving. And systemd socket activation: sockets passed the way systemd passes
//! them (`LISTEN_FDS`, `LISTEN_PID`) are used instead of binding, with the connections
//! already queued on them.
mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::process::{BIN, Proc, fairway, log_level};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A process that is not the test's child (the new fairway, adopted by init once the old
/// one exits): stopped with SIGTERM when the test ends, however it ends.
struct Adopted(u32);

impl Adopted {
    fn alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.0)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.0))
                .is_ok_and(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
    }

    async fn stop(&self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.0.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!self.alive(), "the new process {} did not stop", self.0);
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

/// The old process's exit, polled without waiting for its stderr pipe, which the new
/// process holds open.
async fn exited(p: &mut Proc, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid after `pid=` on the stderr line with `message`.
/// Sends `SIGUSR2` to `old` and waits for the failed upgrade to be logged; `old` still runs
/// and serves on `addr`. Returns its log.
async fn upgrade_fails(old: &mut Proc, addr: std::net::SocketAddr) -> String {
    old.signal("USR2");
    eventually(
        Duration::from_secs(10),
        "the failed upgrade logged",
        || async {
            old.stderr()
                .contains("upgrade failed; this process keeps serving")
        },
    )
    .await;
    assert!(old.child.try_wait().unwrap().is_none(), "{}", old.stderr());
    for _ in 0..20 {
        assert_eq!(get(format!("http://{addr}/")).await.status, 200);
    }
    old.stderr()
}

fn logged_pid(stderr: &str, message: &str) -> Option<u32> {
    let line = stderr.lines().find(|l| l.contains(message))?;
    line.split("pid=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn healthy(status: &serde_json::Value, addr: &str) -> Option<bool> {
    common::admin::find_server(status, "app", addr)?["healthy"].as_bool()
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let r = get(format!("http://{admin}/metrics")).await;
    common::prometheus::parse(&r.text()).ok()?.get(name, &[])
}

#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
    /// GETs sent again on a new connection after a kept-alive one closed under them (as
    /// browsers do, RFC 9112 §9.3.1).
    retried: AtomicUsize,
}

impl Counts {
    fn line(&self, what: &str) -> String {
        format!(
            "{what}: ok {}, refused {}, failed {}, retried {}",
            self.ok.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.retried.load(Ordering::SeqCst)
        )
    }
}

/// One request on a new connection, read to the end: `Err(true)` when the connection was
/// refused.
async fn one_shot(addr: std::net::SocketAddr, req: &[u8]) -> Result<u16, bool> {
    let mut s = TcpStream::connect(addr).await.map_err(|_| true)?;
    s.write_all(req).await.map_err(|_| false)?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| false)?
        .map_err(|_| false)?;
    let text = String::from_utf8_lossy(&out);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or(false)?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_traffic_refuses_nothing_and_fails_nothing() {
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    b.set_healthy(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fairway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"3s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [upstreams.app]\nservers = [\"{}\", \"{}\"]\n\
             [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"200ms\"\n\
             timeout = \"500ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n",
            a.addr, b.addr
        ),
    )
    .unwrap();
    let mut cmd = fairway(&["run", "--config", path.to_str().unwrap()]);
    // Three workers: the client address is a group of three sockets, all handed over.
    cmd.env("RUST_LOG", log_level("info"))
        .env("TOKIO_WORKER_THREADS", "3");
    let mut old = Proc::spawn(cmd);
    let addr = old.client_addr().await;
    let admin = old.admin_addr().await;
    let started = metric(admin, "fairway_process_start_time_seconds")
        .await
        .expect("start time");
    let status = || async move { get(format!("http://{admin}/status")).await.json() };
    eventually(Duration::from_secs(5), "b marked down", || async move {
        let s = status().await;
        healthy(&s, &b.addr.to_string()) == Some(false)
    })
    .await;

    // A WebSocket tunnel through the old process.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::text("a: before")
    );

    // Traffic: kept-alive GETs, a new connection per GET, POST uploads.
    let stop = Arc::new(AtomicBool::new(false));
    let keep_alive = Arc::new(Counts::default());
    let fresh = Arc::new(Counts::default());
    let uploads = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&keep_alive));
        tasks.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let req = || Request::get(format!("http://{addr}/ka")).body(Full::default());
                let r = match c.request(req().unwrap()).await {
                    Ok(r) => Ok(r),
                    Err(e) if e.is_connect() => {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    // A kept-alive connection closed by the draining process as the
                    // request went out: once more on a new connection.
                    Err(_) => {
                        counts.retried.fetch_add(1, Ordering::SeqCst);
                        client().request(req().unwrap()).await
                    }
                };
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        counts.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        counts.failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    for _ in 0..2 {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&fresh));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match one_shot(
                    addr,
                    b"GET /new HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .await
                {
                    Ok(200) => counts.ok.fetch_add(1, Ordering::SeqCst),
                    Err(true) => counts.refused.fetch_add(1, Ordering::SeqCst),
                    _ => counts.failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&uploads));
        tasks.push(tokio::spawn(async move {
            let body = vec![b'u'; 64 * 1024];
            let mut req = format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            while !stop.load(Ordering::SeqCst) {
                match one_shot(addr, &req).await {
                    Ok(200) => counts.ok.fetch_add(1, Ordering::SeqCst),
                    Err(true) => counts.refused.fetch_add(1, Ordering::SeqCst),
                    _ => counts.failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    let served = || keep_alive.ok.load(Ordering::SeqCst) + fresh.ok.load(Ordering::SeqCst);
    let before = served();
    eventually(Duration::from_secs(10), "traffic flowing", || async {
        served() > before + 50
    })
    .await;

    // The upgrade. A second SIGUSR2 while the old process drains (held open by the tunnel
    // until its close) changes nothing. (Two signals sent back to back may reach a process as
    // one, so the second waits for the hand-over.)
    old.signal("USR2");
    eventually(Duration::from_secs(20), "the hand-over", || async {
        old.stderr().contains("the new process serves")
    })
    .await;
    old.signal("USR2");
    eventually(
        Duration::from_secs(5),
        "the second SIGUSR2 ignored",
        || async { old.stderr().contains("SIGUSR2 ignored") },
    )
    .await;
    let status_old = exited(&mut old, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("the old process did not exit: {}", old.stderr()));
    assert_eq!(status_old.code(), Some(0), "{}", old.stderr());
    let stderr = old.stderr();
    let pid = logged_pid(&stderr, "the new process serves").unwrap_or_else(|| panic!("{stderr}"));
    let new = Adopted(pid);
    assert!(new.alive());
    assert!(stderr.contains("SIGUSR2 ignored"), "{stderr}");
    assert_eq!(
        stderr.matches("upgrade: started a new process").count(),
        1,
        "{stderr}"
    );
    let adopted = stderr
        .lines()
        .find(|l| l.contains("using sockets handed over at start"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(adopted.contains("sockets=3"), "{adopted}");

    // The tunnel on the old process ended with 1001 (at a frame boundary, once the drain
    // began).
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| f.code),
                Some(Ok(_)) => continue,
                other => panic!("tunnel ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("no close frame");
    assert_eq!(close, Some(CloseCode::Away));

    // The new process serves on the same addresses, and traffic goes on.
    let after = served();
    eventually(
        Duration::from_secs(10),
        "traffic on the new process",
        || async { served() > after + 50 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let report = [
        keep_alive.line("kept-alive GETs"),
        fresh.line("GETs on new connections"),
        uploads.line("POST uploads"),
    ];
    println!("{}", report.join("\n"));
    for c in [&keep_alive, &fresh, &uploads] {
        assert_eq!(c.refused.load(Ordering::SeqCst), 0, "{report:?}");
        assert_eq!(c.failed.load(Ordering::SeqCst), 0, "{report:?}");
    }
    assert!(uploads.ok.load(Ordering::SeqCst) > 0, "{report:?}");

    // A new process: a new start time, the same health view once its checks ran.
    let now = metric(admin, "fairway_process_start_time_seconds")
        .await
        .unwrap();
    assert!(now > started, "{now} vs {started}");
    eventually(
        Duration::from_secs(5),
        "b down in the new process",
        || async move {
            let s = status().await;
            let servers = common::admin::servers(&s, "app");
            servers.len() == 2
                && healthy(&s, &b.addr.to_string()) == Some(false)
                && healthy(&s, &a.addr.to_string()) == Some(true)
        },
    )
    .await;
    new.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_cannot_start_leaves_the_old_one_serving() {
    let a = TestUpstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fairway.toml");
    let good = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{}\"]\n",
        a.addr
    );
    std::fs::write(&path, &good).unwrap();
    let mut cmd = fairway(&["run", "--config", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", log_level("info"));
    let mut old = Proc::spawn(cmd);
    let addr = old.client_addr().await;
    std::fs::write(
        &path,
        format!("{good}\n[upstreams.app.health_check]\ninterval = 5\n"),
    )
    .unwrap();
    upgrade_fails(&mut old, addr).await;
    // Once the file is good again, an upgrade goes through.
    std::fs::write(&path, &good).unwrap();
    old.signal("USR2");
    let s = exited(&mut old, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("{}", old.stderr()));
    assert_eq!(s.code(), Some(0));
    let new = Adopted(logged_pid(&old.stderr(), "the new process serves").unwrap());
    assert_eq!(get(format!("http://{addr}/")).await.status, 200);
    new.stop().await;
}

/// A new process that is not ready within `shutdown_timeout` is stopped and waited for (none
/// is left running or as a zombie), and the old one serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_not_ready_in_time_is_stopped_and_the_old_one_serves_on() {
    let a = TestUpstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fairway.toml");
    // No new process is ready within a millisecond of its start.
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"1ms\"\n\
             [upstreams.app]\nservers = [\"{}\"]\n",
            a.addr
        ),
    )
    .unwrap();
    let mut cmd = fairway(&["run", "--config", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", log_level("info"));
    let mut old = Proc::spawn(cmd);
    let addr = old.client_addr().await;
    let log = upgrade_fails(&mut old, addr).await;
    assert!(log.contains("was not ready within"), "{log}");
    // Logged only once the new process is stopped and reaped: gone from the process table.
    let pid = logged_pid(&log, "upgrade: started a new process").unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the new process {pid} is still there\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activation_serves_the_sockets_it_is_given() {
    use command_fds::{CommandFdExt, FdMapping};
    let a = TestUpstream::start("a").await;
    // The socket, bound and listening before fairway exists, with a client already queued.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = TcpStream::connect(addr).await.unwrap();
    queued
        .write_all(b"GET /queued HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fairway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{addr}\"\n[upstreams.app]\nservers = [\"{}\"]\n",
            a.addr
        ),
    )
    .unwrap();
    // As systemd does: the sockets from fd 3 on, and LISTEN_PID naming the service's own
    // process (the shell execs fairway, keeping its pid).
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "fairway.socket")
        .env("RUST_LOG", log_level("info"))
        .env_remove("FAIRWAY_CONFIG");
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: OwnedFd::from(listener),
        child_fd: 3,
    }])
    .unwrap();
    let mut p = Proc::spawn(cmd);
    assert_eq!(p.client_addr().await, addr);
    assert!(
        p.stderr().contains("using a socket handed over at start"),
        "{}",
        p.stderr()
    );
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), queued.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        send(
            &client(),
            Request::get(format!("http://{addr}/"))
                .body(Full::<Bytes>::default())
                .unwrap()
        )
        .await
        .status,
        200
    );
    p.signal("TERM");
    p.expect_clean_exit(Duration::from_secs(10)).await;
}

/// The TLS, `redirect_http` and PROXY protocol listeners are handed over too: the new process
/// answers on the same ports, over TLS behind the PROXY protocol (which applies to `listen`
/// addresses), and with the 308.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redirect_and_proxy_protocol_listeners_are_handed_over() {
    let ca = common::pki::Ca::new("upgrade CA");
    let a = TestUpstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in ca.leaf(&["localhost"]).files("") {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("fairway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\nredirect_http = \"127.0.0.1:0\"\n\
             proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]\nshutdown_timeout = \"2s\"\n\
             [server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [upstreams.app]\nservers = [\"{}\"]\n",
            a.addr
        ),
    )
    .unwrap();
    let mut cmd = fairway(&["run", "--config", path.to_str().unwrap()]);
    cmd.env("RUST_LOG", log_level("info"))
        .env("TOKIO_WORKER_THREADS", "2");
    let mut old = Proc::spawn(cmd);
    let tls = old.client_addr().await;
    let redirect = old.bound("redirecting plain HTTP to https").await;
    let check = |client_ip: &'static str| {
        let ca = &ca;
        async move {
            // TLS behind a PROXY protocol v1 header naming the client.
            let mut tcp = TcpStream::connect(tls).await.unwrap();
            tcp.write_all(format!("PROXY TCP4 {client_ip} 127.0.0.1 50000 443\r\n").as_bytes())
                .await
                .unwrap();
            let s = tokio_rustls::TlsConnector::from(common::tls::trusting(ca, &["http/1.1"]))
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            let r = common::tls::http1(s).await.get("/").await;
            assert_eq!(r.status, 200);
            assert_eq!(r.seen_one("x-real-ip").unwrap(), client_ip);
            let answer = raw(
                redirect,
                b"GET /x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(raw_status(&answer), Some(308), "{answer}");
        }
    };
    check("10.1.2.3").await;
    old.signal("USR2");
    let s = exited(&mut old, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("{}", old.stderr()));
    assert_eq!(s.code(), Some(0), "{}", old.stderr());
    let stderr = old.stderr();
    let new = Adopted(logged_pid(&stderr, "the new process serves").unwrap());
    // Every socket was handed over: none was bound anew (the redirect socket alone, each
    // client address as its group of one socket per worker).
    assert_eq!(
        stderr
            .matches("using a socket handed over at start")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("using sockets handed over at start").count(),
        2,
        "{stderr}"
    );
    assert_eq!(stderr.matches("sockets=2").count(), 2, "{stderr}");
    check("10.4.5.6").await;
    new.stop().await;
}
