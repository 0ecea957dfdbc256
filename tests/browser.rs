//! The dashboard (CONTRACT §9) in a real browser: headless Chromium, driven over the DevTools
//! protocol, loads `GET /` from the admin listener and must run it without a console error or
//! a Content-Security-Policy violation, list every server of the config, show a server whose
//! health check fails as down (red, and labelled) within a few seconds, and drain a server
//! with its button once the admin token is entered in the page.
//!
//! A second test loads a single-page app (a page, a script bundle of about 1 MiB, JSON it
//! fetches) through fairway with `[compression]` on: the browser must run the whole bundle
//! and show what it computes, receive each response in the coding fairway chose from the
//! browser's `Accept-Encoding` (zstd, br, then gzip, each alone, as far as the browser accepts
//! them), without `Content-Length`, with `Vary: Accept-Encoding` and a weak ETag, in far
//! fewer bytes than the bundle has, and decode the bundle byte for byte.
//!
//! It needs a browser, so it is ignored by default: `cargo test --test browser -- --ignored`
//! (`.ci/run` installs Debian's `chromium-headless-shell` when no browser is found). The
//! browser is the first of `chromium`, `chromium-headless-shell`, `google-chrome` and
//! `chromium-browser` on `PATH`, or the one `FAIRWAY_CHROMIUM` names. With
//! `FAIRWAY_SCREENSHOT=PATH`, a PNG of the page at the end of the test is written there.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The browsers looked for on `PATH`, in this order.
const BROWSERS: [&str; 4] = [
    "chromium",
    "chromium-headless-shell",
    "google-chrome",
    "chromium-browser",
];

/// How long the browser may take to start and a DevTools command to answer.
const STARTUP: Duration = Duration::from_secs(30);
const COMMAND: Duration = Duration::from_secs(10);

/// How long the page may take to show a change: a health check of 200 ms fails, the page
/// reads `/stats` every 2 s, and a loaded machine is slow.
const SHOWN: Duration = Duration::from_secs(8);

/// The console message the test writes itself, to know that messages reach it.
const PROBE: &str = "fairway-browser-test-probe";

// --- the browser --------------------------------------------------------------------------

/// The browser to run: `FAIRWAY_CHROMIUM`, or the first of [`BROWSERS`] on `PATH`.
fn find_browser() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FAIRWAY_CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    BROWSERS.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Finds and launches the browser and connects to it over DevTools, naming it and its
/// version; panics, saying how to get one, without a browser.
async fn start_browser() -> (Browser, Cdp) {
    let program = find_browser().unwrap_or_else(|| {
        panic!(
            "no browser: install Debian's chromium or chromium-headless-shell, or set \
             FAIRWAY_CHROMIUM (looked for {BROWSERS:?} on PATH)"
        )
    });
    let browser = Browser::launch(&program).await;
    let cdp = Cdp::connect(&browser.ws_url).await;
    let version = cdp.call("Browser.getVersion", json!({})).await;
    eprintln!(
        "browser: {} ({})",
        program.display(),
        version["product"].as_str().unwrap_or("?")
    );
    (browser, cdp)
}

/// A headless browser with a fresh profile, in a process group of its own (Debian's
/// launchers are shell scripts, one of which does not `exec`), killed with its helper
/// processes when dropped.
struct Browser {
    child: Child,
    /// The browser's DevTools WebSocket URL.
    ws_url: String,
    stderr: Arc<Mutex<String>>,
    /// Reads stderr until every process of the browser has closed it.
    reader: std::thread::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(program: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut c = Command::new(program);
        c.args([
            "--headless",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--metrics-recording-only",
            "--mute-audio",
            "--password-store=basic",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
        // Chromium refuses to start as root with its sandbox on (`/proc/self` belongs to
        // the effective user).
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            c.arg("--no-sandbox");
        }
        c.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));

        // Read continuously (a full pipe would block the browser) until the pipe closes; the
        // URL is sent on as soon as the browser prints it.
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = oneshot::channel();
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("DevTools listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_owned());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut browser = Browser {
            child,
            ws_url: String::new(),
            stderr,
            reader,
            _profile: profile,
        };
        match tokio::time::timeout(STARTUP, rx).await {
            Ok(Ok(url)) => browser.ws_url = url,
            Ok(Err(_)) => panic!(
                "{} exited ({:?}) without a DevTools URL:\n{}",
                program.display(),
                browser.child.try_wait(),
                browser.stderr()
            ),
            Err(_) => panic!(
                "no DevTools URL from {} within {STARTUP:?}:\n{}",
                program.display(),
                browser.stderr()
            ),
        }
        browser
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asks the browser to quit, which it does with its helper processes, and waits a few
    /// seconds for all of them to be gone; [`Drop`] kills what is left.
    async fn close(self, cdp: &Cdp) {
        cdp.send_to_browser("Browser.close");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.reader.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the launcher, the browser and its renderer and helper processes.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- the DevTools protocol ----------------------------------------------------------------

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One WebSocket to the browser, commands sent to one page (a flat-mode session), and every
/// event the browser sends kept in order.
struct Cdp {
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    events: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
    session: Option<String>,
}

impl Cdp {
    async fn connect(ws_url: &str) -> Cdp {
        let (ws, _) = tokio::time::timeout(COMMAND, tokio_tungstenite::connect_async(ws_url))
            .await
            .expect("DevTools WebSocket handshake timed out")
            .unwrap_or_else(|e| panic!("cannot open the DevTools WebSocket {ws_url}: {e}"));
        let (mut sink, mut stream) = ws.split();
        let (out, mut queue) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = queue.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, e) = (Arc::clone(&pending), Arc::clone(&events));
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Ok(text) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else if v["method"].is_string() {
                    e.lock().unwrap().push(v);
                }
            }
        });
        Cdp {
            out,
            pending,
            events,
            next_id: AtomicU64::new(1),
            session: None,
        }
    }

    /// Sends `method` (to the page once attached) and returns its `result`; panics on an
    /// error answer.
    async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::text(msg.to_string()))
            .expect("the DevTools connection is closed");
        let answer = tokio::time::timeout(COMMAND, rx)
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} within {COMMAND:?}"))
            .unwrap_or_else(|_| panic!("the DevTools connection closed during {method}"));
        if !answer["error"].is_null() {
            panic!("{method} failed: {}", answer["error"]);
        }
        answer["result"].clone()
    }

    /// Sends `method` to the browser itself, without waiting for an answer.
    fn send_to_browser(&self, method: &str) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let msg = json!({ "id": id, "method": method, "params": {} });
        let _ = self.out.send(Message::text(msg.to_string()));
    }

    /// Opens a new page and sends the next commands to it.
    async fn open_page(&mut self) {
        let target = self
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        self.session = Some(
            attached["sessionId"]
                .as_str()
                .expect("sessionId")
                .to_owned(),
        );
    }

    /// The value of the JavaScript `expression` in the page (awaited if a promise); panics
    /// if it throws.
    async fn eval(&self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if !r["exceptionDetails"].is_null() {
            panic!("{expression}\nthrew: {:#}", r["exceptionDetails"]);
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until `cond` holds for its value, or panics after `limit`
    /// with `what` and the last value.
    async fn eval_until(
        &self,
        limit: Duration,
        what: &str,
        expression: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expression).await;
            if cond(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("not true within {limit:?}: {what}\nlast value: {v:#}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Turns on the events of each of `domains` (`Page`, `Runtime`, ...) in the page.
    async fn enable(&self, domains: &[&str]) {
        for domain in domains {
            self.call(&format!("{domain}.enable"), json!({})).await;
        }
    }

    /// Navigates the page to `url` and waits up to `limit` for its load event.
    async fn navigate(&self, url: &str, limit: Duration) {
        let nav = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(nav["errorText"].is_null(), "navigating to {url}: {nav}");
        let deadline = Instant::now() + limit;
        while !self.seen("Page.loadEventFired") {
            assert!(
                Instant::now() < deadline,
                "{url} did not load within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `event` comes from the page commands go to (the browser itself before one
    /// is opened).
    fn is_from_page(&self, event: &Value) -> bool {
        match &self.session {
            Some(s) => event["sessionId"] == s.as_str(),
            None => event["sessionId"].is_null(),
        }
    }

    /// The events `method` that the page has sent so far, in order.
    fn page_events(&self, method: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["method"] == method && self.is_from_page(e))
            .cloned()
            .collect()
    }

    /// Whether the page has sent an event `method`.
    fn seen(&self, method: &str) -> bool {
        !self.page_events(method).is_empty()
    }

    /// Every console error, uncaught exception and error the browser reported (a refused
    /// script, style, image or connection, a failed request) so far, one line each.
    fn errors(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(error_of)
            .collect()
    }

    /// The errors so far, once a console error the test writes has come back: errors are
    /// known to reach the test, and what the page reported before has had time to arrive.
    async fn errors_so_far(&self) -> Vec<String> {
        self.eval(&format!("console.error('{PROBE}')")).await;
        let deadline = Instant::now() + COMMAND;
        loop {
            let errors = self.errors();
            if errors.iter().any(|e| e.contains(PROBE)) {
                self.events
                    .lock()
                    .unwrap()
                    .retain(|e| e["params"]["args"][0]["value"] != PROBE);
                return errors.into_iter().filter(|e| !e.contains(PROBE)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "a console.error written in the page never reached the test"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The error an event reports, if it reports one.
fn error_of(event: &Value) -> Option<String> {
    let p = &event["params"];
    match event["method"].as_str()? {
        "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => {
            let args: Vec<String> = p["args"]
                .as_array()?
                .iter()
                .map(|a| match &a["value"] {
                    Value::Null => plain(&a["description"]),
                    v => plain(v),
                })
                .collect();
            Some(format!("console.{}: {}", plain(&p["type"]), args.join(" ")))
        }
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            Some(format!(
                "{}: {} (line {}, column {})",
                plain(&d["text"]),
                plain(&d["exception"]["description"]),
                d["lineNumber"].as_u64().map_or(0, |n| n + 1),
                d["columnNumber"].as_u64().map_or(0, |n| n + 1),
            ))
        }
        "Log.entryAdded" if p["entry"]["level"] == "error" => {
            let e = &p["entry"];
            Some(format!(
                "{} error: {} ({})",
                plain(&e["source"]),
                plain(&e["text"]),
                plain(&e["url"])
            ))
        }
        _ => None,
    }
}

/// A JSON string as its text, anything else as JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

// --- the page -----------------------------------------------------------------------------

/// What the page shows for server `addr`: its row's data attributes and class, the text and
/// colour of its state cell, and its drain button's action; `null` without such a row.
fn row_of(addr: &str) -> String {
    format!(
        r#"(() => {{
  const addr = {addr};
  const row = [...document.querySelectorAll('main#upstreams tr.server')]
    .find((r) => r.dataset.server === addr);
  if (!row) return null;
  const cell = row.querySelector('.state');
  const button = row.querySelector('button.drain-button');
  return {{
    state: row.dataset.state,
    upstream: row.dataset.upstream,
    classes: [...row.classList],
    addr_text: row.querySelector('.addr-text').textContent,
    state_text: cell ? cell.textContent : null,
    color: cell ? getComputedStyle(cell).color : null,
    action: button ? button.dataset.action : null,
  }};
}})()"#,
        addr = json!(addr)
    )
}

/// `rgb(R, G, B)` or `rgba(R, G, B, A)` as its three channels.
fn rgb(css: &Value) -> (f64, f64, f64) {
    let s = css.as_str().unwrap_or_default();
    let n: Vec<f64> = s
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .trim_matches(|c| c == '(' || c == ')')
        .split([',', ' ', '/'])
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    assert!(n.len() >= 3, "not an rgb() colour: {css}");
    (n[0], n[1], n[2])
}

/// Red clearly dominates: the page's "down" colours (#b8400b, #ff9f70 in dark mode).
fn reddish(css: &Value) -> bool {
    let (r, g, b) = rgb(css);
    r >= 120.0 && r > g * 1.4 && r > b * 1.4
}

fn has_class(row: &Value, class: &str) -> bool {
    row["classes"]
        .as_array()
        .is_some_and(|c| c.iter().any(|x| x == class))
}

/// Standard base64 (with padding, as DevTools sends screenshots) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        acc = acc << 6 | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Chromium browser: run with --ignored (CI installs one)"]
async fn the_dashboard_in_a_real_browser() {
    let started = Instant::now();
    let a = TestUpstream::start("a").await;
    let b = TestUpstream::start("b").await;
    let p = TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"secret\"\n\n\
         [upstreams.app]\nservers = [{}]\n\n\
         [upstreams.app.health_check]\npath = \"/health\"\ninterval = \"200ms\"\n\
         timeout = \"200ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n",
        quoted(&[&a, &b])
    ))
    .await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let page_url = admin::url(&p, "/");

    let (browser, mut cdp) = start_browser().await;
    cdp.open_page().await;
    cdp.enable(&["Page", "Runtime", "Log"]).await;

    // The page loads, its script runs (it draws the rows) and its style applies, and nothing
    // is reported: no exception, no console error, no refused script or style.
    cdp.navigate(&page_url, SHOWN).await;
    let rows = cdp
        .eval_until(
            SHOWN,
            "both servers have a row",
            "[...document.querySelectorAll('main#upstreams tr.server')].map((r) => r.dataset.server)",
            |v| v.as_array().is_some_and(|a| a.len() == 2),
        )
        .await;
    let mut listed: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    listed.sort_unstable();
    let mut expected = vec![a_addr.as_str(), b_addr.as_str()];
    expected.sort_unstable();
    assert_eq!(listed, expected, "the rows are not the config's servers");
    for addr in [&a_addr, &b_addr] {
        let row = cdp.eval(&row_of(addr)).await;
        assert_eq!(row["state"], "up", "{row:#}");
        assert_eq!(row["upstream"], "app", "{row:#}");
        assert_eq!(row["addr_text"], addr.as_str(), "{row:#}");
        assert!(has_class(&row, "state-up"), "{row:#}");
        assert!(
            row["state_text"]
                .as_str()
                .unwrap_or_default()
                .contains("up"),
            "{row:#}"
        );
        assert!(!reddish(&row["color"]), "an up server in red: {row:#}");
        assert_eq!(row["action"], "drain", "{row:#}");
    }
    // The page reads /stats by itself (first after 2 s) and says it is live.
    cdp.eval_until(
        SHOWN,
        "the page reads /stats and says it is live",
        "performance.getEntriesByType('resource').some((e) => e.name.endsWith('/stats')) \
         && document.getElementById('connection').textContent",
        |v| v.as_str().is_some_and(|s| s.contains("live")),
    )
    .await;
    let errors = cdp.errors_so_far().await;
    assert!(
        errors.is_empty(),
        "reported while loading the page:\n{}",
        errors.join("\n")
    );
    eprintln!(
        "loaded, both servers shown and refreshed: {:?}",
        started.elapsed()
    );

    // b's health check fails: its row turns red and says "down", within a few seconds.
    let failed = Instant::now();
    b.set_healthy(false);
    let row = cdp
        .eval_until(SHOWN, "b's row shows down", &row_of(&b_addr), |r| {
            r["state"] == "down"
                && has_class(r, "state-down")
                && r["state_text"].as_str().is_some_and(|t| t.contains("down"))
                && reddish(&r["color"])
        })
        .await;
    eprintln!(
        "down shown {:?} after the health check started failing: {row}",
        failed.elapsed()
    );
    let healthy = cdp
        .eval("document.querySelector('section[data-upstream=\"app\"] .healthy-count').textContent")
        .await;
    assert_eq!(healthy, "1 of 2 healthy");
    let other = cdp.eval(&row_of(&a_addr)).await;
    assert_eq!(
        other["state"], "up",
        "a healthy server is not shown up: {other:#}"
    );
    let status = admin::status(&p).await;
    assert_eq!(
        admin::server_entry(&status, "app", &a_addr)["draining"],
        false,
        "{status:#}"
    );

    // The admin token, entered in the page, then a's Drain button: /status says draining.
    cdp.eval(
        "(() => { document.getElementById('token').value = 'secret'; \
         document.getElementById('token-save').click(); })()",
    )
    .await;
    let stored = cdp
        .eval("sessionStorage.getItem('fairway-admin-token')")
        .await;
    assert_eq!(stored, "secret", "the token is not kept in sessionStorage");
    let clicked = cdp
        .eval(&format!(
            r#"(() => {{
  const addr = {};
  const row = [...document.querySelectorAll('main#upstreams tr.server')]
    .find((r) => r.dataset.server === addr);
  const button = row && row.querySelector('[data-action="drain"]');
  if (!button) return false;
  button.click();
  return true;
}})()"#,
            json!(a_addr)
        ))
        .await;
    assert_eq!(clicked, true, "no Drain button in a's row");
    let deadline = Instant::now() + SHOWN;
    loop {
        let status = admin::status(&p).await;
        if admin::server_entry(&status, "app", &a_addr)["draining"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a is not draining {SHOWN:?} after its Drain button was clicked: {status:#}\n\
             the page says: {}",
            cdp.eval("document.getElementById('message').textContent")
                .await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The page says so, and shows it.
    cdp.eval_until(
        SHOWN,
        "the page reports the drain",
        "(() => { const m = document.getElementById('message'); \
         return m.className + ' ' + m.textContent; })()",
        |v| {
            v.as_str()
                .is_some_and(|s| s.starts_with("ok ") && s.contains("done"))
        },
    )
    .await;
    cdp.eval_until(SHOWN, "a's row shows draining", &row_of(&a_addr), |r| {
        r["state"] == "draining"
            && has_class(r, "state-draining")
            && r["state_text"]
                .as_str()
                .is_some_and(|t| t.contains("draining"))
            && r["action"] == "undrain"
    })
    .await;
    assert_eq!(
        admin::server_entry(&admin::status(&p).await, "app", &b_addr)["draining"],
        false
    );
    // And it has been reading /stats all along.
    let connection = cdp
        .eval(
            "(() => { const c = document.getElementById('connection'); \
             return [c.className, c.textContent, document.querySelector('main').className]; })()",
        )
        .await;
    assert_eq!(connection[0], "online", "{connection}");
    assert_eq!(
        connection[2], "",
        "the page is shown as stale: {connection}"
    );

    if let Some(path) = std::env::var_os("FAIRWAY_SCREENSHOT").filter(|p| !p.is_empty()) {
        let shot = cdp
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", Path::new(&path).display());
    }

    // Nothing was reported over the whole run.
    let errors = cdp.errors_so_far().await;
    assert!(
        errors.is_empty(),
        "reported by the page:\n{}",
        errors.join("\n")
    );
    browser.close(&cdp).await;
    eprintln!("done in {:?}", started.elapsed());
}

// --- a single-page app behind fairway's compression ------------------------------------------

/// fairway's codings in its default order (`[compression] algorithms`).
const CODINGS: [&str; 3] = ["zstd", "br", "gzip"];

/// A single-page app: a page, the script bundle it loads and the JSON the bundle fetches,
/// with what the page shows once the bundle has run whole.
struct Spa {
    page: Bytes,
    bundle: Bytes,
    /// The bundle's strong ETag.
    etag: String,
    data: Bytes,
    /// What `#result` shows: the sum of what every function of the bundle returns, so a
    /// bundle that arrives cut short or altered shows something else, or nothing.
    total: u64,
    /// What `#data` shows: the sum of the `value`s in the JSON.
    data_sum: u64,
}

impl Spa {
    fn new() -> Spa {
        // About 1 MiB of functions, each called once, then the code that shows the result
        // and fetches the data.
        let mut js = String::from("\"use strict\";\nlet total = 0;\n");
        let (mut total, mut i) = (0u64, 0u64);
        while js.len() < 1 << 20 {
            let (a, m, k) = (i % 13, i % 97, i * 7919 % 1000);
            let b = format!("item-{k}");
            writeln!(
                js,
                "function f{i}(a, b) {{ return a * {m} + b.length + {k}; }} total += f{i}({a}, \"{b}\");"
            )
            .unwrap();
            total += a * m + b.len() as u64 + k;
            i += 1;
        }
        js.push_str(
            "document.getElementById('result').textContent = String(total);\n\
             fetch('/api/data')\n\
             \x20 .then((r) => { if (!r.ok) throw new Error('/api/data: ' + r.status); return r.json(); })\n\
             \x20 .then((d) => {\n\
             \x20   const sum = d.items.reduce((s, x) => s + x.value, 0);\n\
             \x20   document.getElementById('data').textContent = String(sum);\n\
             \x20   document.title = 'ready';\n\
             \x20 })\n\
             \x20 .catch((e) => console.error('the data did not load: ' + e));\n",
        );
        let items: Vec<Value> = (0..100u64)
            .map(|i| json!({ "id": i, "name": format!("item-{i}"), "value": i * i % 101 }))
            .collect();
        let data_sum = (0..100u64).map(|i| i * i % 101).sum();
        let mut page = String::from(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>loading</title>\n<link rel=\"icon\" href=\"data:,\">\n</head>\n<body>\n\
             <h1>A single-page app</h1>\n<p>Result: <span id=\"result\"></span></p>\n\
             <p>Data: <span id=\"data\"></span></p>\n<ul>\n",
        );
        for i in 0..40 {
            writeln!(
                page,
                "<li>Static line {i} of the page, there to make it worth compressing.</li>"
            )
            .unwrap();
        }
        page.push_str("</ul>\n<script src=\"/app.js\"></script>\n</body>\n</html>\n");
        Spa {
            page: Bytes::from(page),
            etag: format!("\"bundle-{i}-{total}\""),
            bundle: Bytes::from(js),
            data: Bytes::from(json!({ "items": items }).to_string()),
            total,
            data_sum,
        }
    }

    /// The answer to `GET path`: with `Content-Length`, as an application server sends it.
    fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match path {
            "/" => (200, "text/html; charset=utf-8", &self.page),
            "/app.js" => (200, "application/javascript", &self.bundle),
            "/api/data" => (200, "application/json", &self.data),
            _ => (404, "text/plain", &Bytes::from_static(b"not found\n")),
        };
        let mut b = Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len());
        if path == "/app.js" {
            b = b.header("etag", &self.etag);
        }
        b.body(Full::new(body.clone())).unwrap()
    }
}

/// Serves `spa` on a port of its own.
async fn serve(spa: Arc<Spa>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let spa = Arc::clone(&spa);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let answer = spa.answer(req.uri().path());
                    async move { Ok::<_, Infallible>(answer) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Header `name` of a DevTools header object, whatever the case of its name.
fn header<'a>(headers: &'a Value, name: &str) -> Option<&'a str> {
    headers
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

/// Whether an `Accept-Encoding` value accepts `coding` (named, with a q-value above 0).
fn accepts(accept_encoding: &str, coding: &str) -> bool {
    accept_encoding.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        parts.next().is_some_and(|c| c.eq_ignore_ascii_case(coding))
            && parts.all(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_none_or(|q| q > 0.0)
            })
    })
}

/// A response the page received, as the browser's Network events describe it.
struct Received {
    request_id: String,
    /// `Accept-Encoding` as the browser sent it.
    accept_encoding: String,
    /// The response's header fields.
    headers: Value,
    /// The bytes that came over the connection for it, head included.
    encoded: u64,
}

impl Received {
    fn encoding(&self) -> Option<&str> {
        header(&self.headers, "content-encoding")
    }
}

/// The response to `url` in the page, once it has finished loading; panics after `limit`.
async fn received(cdp: &Cdp, url: &str, limit: Duration) -> Received {
    let deadline = Instant::now() + limit;
    loop {
        let response = cdp
            .page_events("Network.responseReceived")
            .into_iter()
            .find(|e| e["params"]["response"]["url"] == url);
        if let Some(response) = response {
            let id = &response["params"]["requestId"];
            let failed = cdp
                .page_events("Network.loadingFailed")
                .into_iter()
                .find(|e| e["params"]["requestId"] == *id);
            if let Some(failed) = failed {
                panic!("{url} failed to load: {:#}", failed["params"]);
            }
            let finished = cdp
                .page_events("Network.loadingFinished")
                .into_iter()
                .find(|e| e["params"]["requestId"] == *id);
            let sent = cdp
                .page_events("Network.requestWillBeSentExtraInfo")
                .into_iter()
                .find(|e| e["params"]["requestId"] == *id);
            if let (Some(finished), Some(sent)) = (finished, sent) {
                return Received {
                    request_id: plain(id),
                    accept_encoding: header(&sent["params"]["headers"], "accept-encoding")
                        .unwrap_or_default()
                        .to_owned(),
                    headers: response["params"]["response"]["headers"].clone(),
                    encoded: finished["params"]["encodedDataLength"]
                        .as_f64()
                        .expect("encodedDataLength") as u64,
                };
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url}: no response that finished loading within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one load of the app through fairway showed.
struct Load {
    accept_encoding: String,
    coding: String,
    /// The bytes of `/app.js` and of `/` that came over the connection, heads included.
    bundle_bytes: u64,
    page_bytes: u64,
}

/// Loads the app in a new page through a fairway in front of `upstream` with compression
/// on and `[compression]` keys `extra`, and checks that it runs whole, what each of its
/// responses looked like on the way, and fairway's metrics. `coding_of` names the coding
/// expected given the browser's `Accept-Encoding`.
async fn load_app(
    cdp: &mut Cdp,
    spa: &Spa,
    upstream: SocketAddr,
    extra: &str,
    coding_of: impl Fn(&str) -> Option<&'static str>,
) -> Load {
    let p = TestProxy::start(&admin::config(&format!(
        "[compression]\nenabled = true\n{extra}\n\n[upstreams.app]\nservers = [\"{upstream}\"]\n"
    )))
    .await;
    cdp.open_page().await;
    cdp.enable(&["Page", "Runtime", "Log", "Network"]).await;
    cdp.call("Network.setCacheDisabled", json!({ "cacheDisabled": true }))
        .await;
    let page_url = p.url("/");
    cdp.navigate(&page_url, SHOWN).await;

    // The bundle ran to its end and the data came: the page shows both sums.
    let want = json!(["ready", spa.total.to_string(), spa.data_sum.to_string()]);
    let deadline = Instant::now() + SHOWN;
    loop {
        let shown = cdp
            .eval(
                "[document.title, document.getElementById('result')?.textContent ?? null, \
                 document.getElementById('data')?.textContent ?? null]",
            )
            .await;
        if shown == want {
            break;
        }
        let errors = cdp.errors();
        assert!(
            Instant::now() < deadline && errors.is_empty(),
            "the app does not show {want} within {SHOWN:?} of loading {page_url}: {shown}\n\
             reported by the page:\n{}",
            errors.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let page = received(cdp, &page_url, COMMAND).await;
    let bundle = received(cdp, &p.url("/app.js"), COMMAND).await;
    let data = received(cdp, &p.url("/api/data"), COMMAND).await;
    let accept_encoding = bundle.accept_encoding.clone();
    let coding = coding_of(&accept_encoding).unwrap_or_else(|| {
        panic!("the browser accepts none of fairway's codings: Accept-Encoding: {accept_encoding}")
    });
    for (path, r) in [("/", &page), ("/app.js", &bundle), ("/api/data", &data)] {
        let h = &r.headers;
        assert_eq!(
            r.encoding(),
            Some(coding),
            "{path} (Accept-Encoding: {}): {h:#}",
            r.accept_encoding
        );
        assert_eq!(header(h, "content-length"), None, "{path}: {h:#}");
        let vary = header(h, "vary").unwrap_or_default().to_ascii_lowercase();
        assert!(
            vary.split([',', '\n'])
                .any(|v| v.trim() == "accept-encoding"),
            "{path}: {h:#}"
        );
    }
    assert_eq!(
        header(&bundle.headers, "etag"),
        Some(format!("W/{}", spa.etag).as_str()),
        "{:#}",
        bundle.headers
    );
    // Fewer bytes came than the bundle has, by far: it was sent compressed all the way.
    assert!(
        bundle.encoded < spa.bundle.len() as u64 / 4,
        "{coding}: {} bytes came for a bundle of {}",
        bundle.encoded,
        spa.bundle.len()
    );
    // And the browser decoded every byte of it.
    let body = cdp
        .call(
            "Network.getResponseBody",
            json!({ "requestId": bundle.request_id }),
        )
        .await;
    let text = plain(&body["body"]);
    let decoded = if body["base64Encoded"] == true {
        base64_decode(&text)
    } else {
        text.into_bytes()
    };
    if decoded != spa.bundle {
        let at = decoded
            .iter()
            .zip(spa.bundle.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(decoded.len().min(spa.bundle.len()));
        panic!(
            "{coding}: the browser decoded {} bytes of the bundle's {}, which differ from byte {at}",
            decoded.len(),
            spa.bundle.len()
        );
    }

    let errors = cdp.errors_so_far().await;
    assert!(
        errors.is_empty(),
        "{coding}: reported by the page:\n{}",
        errors.join("\n")
    );
    let compressed = admin::metrics(&p)
        .await
        .get(
            "fairway_compressed_responses_total",
            &[("algorithm", coding)],
        )
        .unwrap_or(0.0);
    assert!(
        compressed >= 3.0,
        "fairway_compressed_responses_total{{algorithm=\"{coding}\"}} is {compressed}, \
         after the page, the bundle and the data went to the browser in {coding}"
    );
    Load {
        accept_encoding,
        coding: coding.to_owned(),
        bundle_bytes: bundle.encoded,
        page_bytes: page.encoded,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Chromium browser: run with --ignored (CI installs one)"]
async fn a_real_browser_loads_a_compressed_single_page_app_through_fairway() {
    let started = Instant::now();
    let spa = Arc::new(Spa::new());
    let upstream = serve(Arc::clone(&spa)).await;
    let (browser, mut cdp) = start_browser().await;

    // With the defaults, fairway picks the first of zstd, br and gzip that the browser
    // accepts; then each other coding the browser accepts, configured alone, so that the
    // browser decodes every stream fairway makes.
    let default = |accept: &str| CODINGS.into_iter().find(|c| accepts(accept, c));
    let first = load_app(&mut cdp, &spa, upstream, "", default).await;
    let mut loads = vec![first];
    let accept = loads[0].accept_encoding.clone();
    assert!(
        accepts(&accept, "gzip"),
        "the browser does not accept gzip: Accept-Encoding: {accept}"
    );
    for coding in CODINGS {
        if coding == loads[0].coding || !accepts(&accept, coding) {
            continue;
        }
        let only = move |_: &str| Some(coding);
        let load = load_app(
            &mut cdp,
            &spa,
            upstream,
            &format!("algorithms = [\"{coding}\"]"),
            only,
        )
        .await;
        loads.push(load);
    }
    eprintln!(
        "the browser sent Accept-Encoding: {accept}; the bundle is {} bytes, the page {}",
        spa.bundle.len(),
        spa.page.len()
    );
    for (i, l) in loads.iter().enumerate() {
        eprintln!(
            "{}{}: the bundle came in {} bytes, the page in {} (heads included)",
            l.coding,
            if i == 0 { " (fairway's choice)" } else { "" },
            l.bundle_bytes,
            l.page_bytes
        );
    }
    browser.close(&cdp).await;
    eprintln!("done in {:?}", started.elapsed());
}
