//! Shared helpers for the integration tests, one per job: real upstream servers
//! ([`TestUpstream`]) and a real proxy ([`TestProxy`]) on ephemeral loopback ports, config
//! builders, a small HTTP client, and [`eventually`] to poll for a condition. The modules
//! hold the rest: `admin` (the admin listener), `prometheus` (the exposition parser),
//! `process` (the real binary as a child process), `raw` (exact bytes on the wire), `steady`
//! (a well-behaved client beside a misbehaving case), `pki` and `tls` (certificates, a TLS
//! client and a TLS upstream) and `usage` (memory and descriptors).
#![allow(dead_code)]

pub mod admin;
pub mod h2raw;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod raw;
pub mod steady;
pub mod tls;
pub mod usage;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

/// CONTRACT §6: a change (a config file, a renewed certificate) takes effect within 2 seconds.
pub const WITHIN: Duration = Duration::from_secs(2);

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Knobs of a test upstream, changeable while it runs.
#[derive(Debug, Default)]
pub struct Knobs {
    /// Answer every request with this status (0: normal behaviour).
    pub status: AtomicU16,
    /// Wait this long before answering (milliseconds).
    pub delay_ms: AtomicU64,
    /// `/health` answers 503 when set.
    pub unhealthy: AtomicBool,
    /// Close each connection as soon as a request head arrives, without answering.
    pub reset: AtomicBool,
    /// Requests seen (excluding `/health`).
    pub hits: AtomicUsize,
    /// Requests being answered right now (excluding `/health`).
    pub in_flight: AtomicUsize,
    /// The most requests ever answered at once.
    pub most_in_flight: AtomicUsize,
    /// Health checks seen.
    pub health_hits: AtomicUsize,
    /// `/health` waits this long before answering (milliseconds).
    pub health_delay_ms: AtomicU64,
    /// Health checks being answered right now.
    pub health_in_flight: AtomicUsize,
    /// The most health checks ever answered at once.
    pub health_most_in_flight: AtomicUsize,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
}

/// A real HTTP server on `127.0.0.1:0` that answers with JSON describing what it received:
/// `{"name", "method", "uri", "version", "headers": {name: [values]}, "body_len"}`.
///
/// Special paths: `/health` (200, or 503 when `unhealthy`), `/bytes/N` (streams N bytes),
/// `/status/N` (answers N), `/delay/MS` (waits), `/ws` (WebSocket echo after a 101),
/// `/close` (answers with `Connection: close`).
pub struct TestUpstream {
    pub name: String,
    pub addr: SocketAddr,
    pub knobs: Arc<Knobs>,
    stop: CancellationToken,
}

impl TestUpstream {
    pub async fn start(name: &str) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    /// Starts on a given address (to bring a stopped upstream back on its port).
    pub async fn start_at(name: &str, addr: SocketAddr) -> TestUpstream {
        let listener = crate::common::eventually_ok(Duration::from_secs(5), || async move {
            TcpListener::bind(addr).await
        })
        .await;
        Self::serve(name, listener)
    }

    /// Starts on a listener the test has bound (to choose its address and port).
    pub fn start_on(name: &str, listener: std::net::TcpListener) -> TestUpstream {
        listener.set_nonblocking(true).unwrap();
        Self::serve(name, TcpListener::from_std(listener).unwrap())
    }

    fn serve(name: &str, listener: TcpListener) -> TestUpstream {
        let addr = listener.local_addr().unwrap();
        let knobs = Arc::new(Knobs::default());
        let stop = CancellationToken::new();
        let (n, k, s) = (name.to_owned(), Arc::clone(&knobs), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                k.connections.fetch_add(1, Ordering::SeqCst);
                let (n, k, s) = (n.clone(), Arc::clone(&k), s.clone());
                tokio::spawn(async move {
                    let k2 = Arc::clone(&k);
                    let reset_now = CancellationToken::new();
                    let reset2 = reset_now.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (n, k, reset) = (n.clone(), Arc::clone(&k2), reset2.clone());
                        async move { Ok::<_, Infallible>(answer(&n, &k, req, &reset).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = s.cancelled() => {}
                        _ = reset_now.cancelled() => {}
                    }
                });
            }
        });
        TestUpstream {
            name: name.to_owned(),
            addr,
            knobs,
            stop,
        }
    }

    /// Kills the server: the listener closes and every open connection is dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> usize {
        self.knobs.hits.load(Ordering::SeqCst)
    }

    pub fn set_status(&self, code: u16) {
        self.knobs.status.store(code, Ordering::SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        self.knobs
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_health_delay(&self, d: Duration) {
        self.knobs
            .health_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.knobs.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    pub fn set_reset(&self, reset: bool) {
        self.knobs.reset.store(reset, Ordering::SeqCst);
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    name: &str,
    k: &Knobs,
    mut req: Request<Incoming>,
    reset: &CancellationToken,
) -> Response<TestBody> {
    let path = req.uri().path().to_owned();
    if path == "/health" {
        k.health_hits.fetch_add(1, Ordering::SeqCst);
        let now = k.health_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        k.health_most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Counted out on drop too: a check that times out drops this future mid-wait.
        let _in_flight = InFlight(&k.health_in_flight);
        let delay = k.health_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let code = if k.unhealthy.load(Ordering::SeqCst) {
            503
        } else {
            200
        };
        return text(code, name);
    }
    k.hits.fetch_add(1, Ordering::SeqCst);
    let now = k.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    k.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&k.in_flight);
    if k.reset.load(Ordering::SeqCst) {
        reset.cancel();
        // Never answered: the connection is dropped by the select in `serve`.
        std::future::pending::<()>().await;
    }
    let delay = k.delay_ms.load(Ordering::SeqCst);
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if path == "/ws" {
        return websocket(name, &mut req);
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (h, v) in req.headers() {
        headers
            .entry(h.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let version = format!("{:?}", req.version());
    // Count the body without keeping it.
    let mut body = req.into_body();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return stream_bytes(name, n.parse().unwrap_or(0));
    }
    let forced = k.status.load(Ordering::SeqCst);
    let status = if let Some(code) = path.strip_prefix("/status/") {
        code.parse().unwrap_or(200)
    } else if forced != 0 {
        forced
    } else {
        200
    };
    let json = serde_json::json!({
        "name": name,
        "method": method,
        "uri": uri,
        "version": version,
        "headers": headers,
        "body_len": body_len,
    });
    let mut resp = Response::new(full(json.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    if path == "/close" {
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    if path == "/hop" {
        resp.headers_mut()
            .insert("connection", "x-private, keep-alive".parse().unwrap());
        resp.headers_mut()
            .insert("x-private", "secret".parse().unwrap());
        resp.headers_mut()
            .insert("keep-alive", "timeout=5".parse().unwrap());
        resp.headers_mut()
            .insert("proxy-connection", "keep-alive".parse().unwrap());
    }
    resp
}

/// Decrements its counter when dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn full(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

fn text(code: u16, s: &str) -> Response<TestBody> {
    let mut r = Response::new(full(s.to_owned()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn stream_bytes(name: &str, n: u64) -> Response<TestBody> {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64) as usize;
            Some((
                Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take))),
                left - take as u64,
            ))
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-length", n.to_string().parse().unwrap());
    r.headers_mut().insert("x-upstream", name.parse().unwrap());
    r
}

fn websocket(name: &str, req: &mut Request<Incoming>) -> Response<TestBody> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(req);
    let name = name.to_owned();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = if msg.is_text() {
                format!("{name}: {}", msg.to_text().unwrap_or("")).into()
            } else if msg.is_binary() {
                msg
            } else {
                // Nothing to echo. On a Close frame keep looping: tungstenite answers it on
                // the next read/flush, and the following `next()` ends the loop (None or an
                // error), so the client sees a clean closing handshake rather than a reset.
                continue;
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert("upgrade", "websocket".parse().unwrap());
    r.headers_mut()
        .insert("connection", "upgrade".parse().unwrap());
    r.headers_mut()
        .insert("sec-websocket-accept", key.parse().unwrap());
    r
}

/// The addresses of `servers` as the inside of a TOML array: `"127.0.0.1:1", "127.0.0.1:2"`.
pub fn quoted(servers: &[&TestUpstream]) -> String {
    let list: Vec<String> = servers.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    list.join(", ")
}

/// `[upstreams.NAME]` over `servers`, each with its weight.
pub fn weighted(name: &str, servers: &[(&TestUpstream, u32)]) -> String {
    let list: String = servers
        .iter()
        .map(|(u, w)| format!("  {{ addr = \"{}\", weight = {w} }},\n", u.addr))
        .collect();
    format!("[upstreams.{name}]\nservers = [\n{list}]\n")
}

/// A config with `server_extra` keys under `[server]` and one upstream `app` over `servers`
/// (unlike [`TestProxy::config`], whose extra TOML goes after the upstream).
pub fn proxy_config(server_extra: &str, servers: &[&TestUpstream]) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\n[upstreams.app]\nservers = [{}]\n",
        quoted(servers)
    )
}

/// A proxy in front of one upstream `app` at `addr` (a raw upstream of the test's own),
/// with `upstream_extra` keys under `[upstreams.app]`.
pub async fn proxy_to(addr: SocketAddr, upstream_extra: &str) -> TestProxy {
    TestProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.app]\nservers = [\"{addr}\"]\n{upstream_extra}\n"
    ))
    .await
}

/// A running proxy with its config in a temporary directory.
pub struct TestProxy {
    pub handle: Option<fairway::AppHandle>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestProxy {
    /// Starts the proxy with `toml`; use `127.0.0.1:0` for listen addresses.
    pub async fn start(toml: &str) -> TestProxy {
        Self::start_with_files(&[], toml).await
    }

    /// Writes `files` (paths relative to the config's directory, such as certificates),
    /// then the config `toml`, and starts the proxy.
    pub async fn start_with_files(files: &[(String, String)], toml: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let config_path = dir.path().join("fairway.toml");
        std::fs::write(&config_path, toml).unwrap();
        let handle = fairway::App::start(&config_path)
            .await
            .unwrap_or_else(|e| panic!("proxy failed to start: {e}"));
        TestProxy {
            addr: handle.client_addrs()[0],
            admin: handle.admin_addr(),
            handle: Some(handle),
            dir,
            config_path,
        }
    }

    /// A config with one upstream `app` over `servers`, plus `extra` TOML appended.
    pub fn config(servers: &[&TestUpstream], extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.app]\nservers = [{}]\n{extra}\n",
            quoted(servers)
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The path of file `name` in the config's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn handle(&self) -> &fairway::AppHandle {
        self.handle.as_ref().unwrap()
    }

    pub async fn shutdown(mut self) -> bool {
        self.handle.take().unwrap().shutdown().await
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.shared().signal_stop();
        }
    }
}

/// Replaces the file at `path` the way editors, config management, certbot and Kubernetes
/// secrets do: the new text written beside it, then renamed over it.
pub fn replace(path: &Path, text: &str) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The client the tests send requests with (plain HTTP).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client (no pooling limits, plain HTTP).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A finished response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The upstream that answered (from the echo JSON).
    pub fn upstream(&self) -> String {
        self.json()["name"].as_str().unwrap_or_default().to_owned()
    }

    /// Values of header `name` as the upstream received it.
    pub fn seen_header(&self, name: &str) -> Option<Vec<String>> {
        self.json()["headers"][name].as_array().map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
    }

    /// The single value the upstream received for header `name`.
    pub fn seen_one(&self, name: &str) -> Option<String> {
        let v = self.seen_header(name)?;
        assert_eq!(v.len(), 1, "{name} seen more than once: {v:?}");
        v.into_iter().next()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GET `url` with a fresh default client (an owned `url` makes a `'static` future, for
/// `tokio::spawn`).
pub async fn get(url: impl AsRef<str>) -> Reply {
    send(
        &client(),
        Request::get(url.as_ref()).body(Full::default()).unwrap(),
    )
    .await
}

/// GET `url` on `c` with extra request headers.
pub async fn get_with(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(c, b.body(Full::default()).unwrap()).await
}

/// GETs `url` on `c`, which must answer 200; the upstream that answered.
pub async fn served_by(c: &HttpClient, url: &str) -> String {
    let r = send(c, Request::get(url).body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 200, "GET {url}: {}", r.text());
    r.upstream()
}

/// The upstream that serves a client at `ip`, told by `X-Forwarded-For` from a trusted peer
/// (`GET /` on `c`, which must answer 200).
pub async fn served_as(c: &HttpClient, p: &TestProxy, ip: &str) -> String {
    let r = get_with(c, &p.url("/"), &[("x-forwarded-for", ip)]).await;
    assert_eq!(r.status, 200, "{ip}: {}", r.text());
    r.upstream()
}

/// Sends `req` and reads the whole response.
pub async fn send(c: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body failed")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// A WebSocket client connection.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the proxy to the upstream's `/ws` echo: the handshake must end
/// in a `101` within 5 s.
pub async fn open_websocket(p: &TestProxy) -> Ws {
    let url = format!("ws://{}/ws", p.addr);
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("websocket handshake timed out")
    .expect("websocket handshake failed");
    assert_eq!(resp.status(), 101);
    ws
}

/// A loopback address where nothing listens (a port that was bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Writes raw bytes on a new connection and reads until the peer closes or `limit` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of the first response in a raw HTTP/1.1 answer.
pub fn raw_status(answer: &str) -> Option<u16> {
    answer.split(' ').nth(1)?.parse().ok()
}

/// Polls `cond` every 20 ms until it holds or `limit` passes (then panics with `what`).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("not true within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Retries `f` until it succeeds or `limit` passes.
pub async fn eventually_ok<T, E: std::fmt::Debug, F, Fut>(limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("still failing: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
