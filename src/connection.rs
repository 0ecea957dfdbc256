//! The client listener: accept loop → per-connection task running hyper-util's auto server
//! (HTTP/1.1 keep-alive and h2c) → `proxy::handle`, with a small watchdog beside each
//! connection that enforces `header_read_timeout` and `idle_timeout` as two separate limits
//! (hyper alone conflates them, and has none while it sniffs the protocol).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{self, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access::Entry;
use crate::body::{Body, BoxError};
use crate::config::AccessFormat;
use crate::context::{ConnInfo, Context};
use crate::proxy;
use crate::proxy_protocol;
use crate::runtime::Settings;

/// Accepts connections until `stop` fires (the listener was removed, or shutdown), serving
/// each on its own tracked task.
pub async fn accept_loop(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    while let Some((stream, peer)) = accept(&listener, &stop, "client").await {
        // Past max_connections: accepted and closed at once, with no answer
        // (CONTRACT §7), so the backlog does not fill with clients left waiting.
        let max = ctx.runtime.load().settings.max_connections;
        if ctx.metrics.connections_active.get() >= max as i64 {
            ctx.metrics.connections_rejected.inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            peer,
            local,
            proto: "http",
            bytes_read: None,
        };
        let count = ConnCount::new(&ctx);
        let ctx2 = Arc::clone(&ctx);
        ctx.tracker.spawn(async move {
            serve_accepted(stream, info, ctx2).await;
            drop(count);
        });
    }
    tracing::debug!(listen = %local, "stopped accepting");
}

const NONE: u64 = u64::MAX;

/// Reads the PROXY protocol header if the listener expects one, then serves the connection,
/// over TLS when `[server.tls]` is set. The connection takes its settings and certificates
/// from one load of the current snapshot, and keeps a copy of the settings rather than the
/// snapshot itself (a long connection must not pin an old config).
async fn serve_accepted(mut stream: tokio::net::TcpStream, mut info: ConnInfo, ctx: Arc<Context>) {
    let (settings, tls) = {
        let rt = ctx.runtime.load();
        if rt.settings.proxy_protocol && !crate::headers::is_trusted(info.peer.ip(), &rt.trusted) {
            tracing::debug!(peer = %info.peer, "refused: PROXY protocol is accepted only from trusted_proxies");
            return;
        }
        (rt.settings.clone(), rt.tls.clone())
    };
    if settings.proxy_protocol {
        let limit = settings.header_read_timeout;
        match tokio::time::timeout(limit, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(proxy_protocol::Header::Proxied(client))) => info.peer = client,
            Ok(Ok(proxy_protocol::Header::Local)) => {}
            Ok(Err(e)) => {
                tracing::debug!(peer = %info.peer, error = %e, "refused: bad PROXY protocol header");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %info.peer, "refused: no PROXY protocol header in time");
                return;
            }
        }
    }
    let Some(tls) = tls else {
        return serve_connection(stream, info, ctx, &settings).await;
    };
    // Completed within header_read_timeout; a failure closes this connection only.
    info.proto = "https";
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, info, ctx, &settings).await,
        Ok(Err(e)) => tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(peer = %info.peer, "TLS handshake timed out"),
    }
}

/// Waits for the next connection, or `None` once `stop` fires. Accept errors (EMFILE and
/// friends) are logged and backed off from instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// `redirect_http`: answers every request with 308 to the same host and path over https.
pub async fn redirect_loop(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    while let Some((stream, _)) = accept(&listener, &stop, "redirect_http").await {
        let ctx = Arc::clone(&ctx);
        ctx.tracker.clone().spawn(async move {
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(ctx.runtime.load().settings.header_read_timeout);
            let service = service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(redirect_response(&req))
            });
            let conn = b.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = ctx.stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// 308 to `https://HOST/PATH?QUERY` (the host without its port, as Nginx's
/// `return 308 https://$host$request_uri`).
pub fn redirect_response<B>(req: &Request<B>) -> http::Response<Body> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(crate::route::host_only)
        .unwrap_or("");
    if host.is_empty() || host.bytes().any(|b| b <= b' ' || b == b'/' || b == b'@') {
        return crate::body::plain_response(
            http::StatusCode::BAD_REQUEST,
            "400 bad request: no usable Host\n",
        );
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{path}");
    let mut r = crate::body::plain_response(
        http::StatusCode::PERMANENT_REDIRECT,
        "308 permanent redirect\n",
    );
    if let Ok(v) = http::HeaderValue::from_str(&location) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

/// Context between a connection's IO, its requests and its watchdog.
struct ConnState {
    start: Instant,
    in_flight: AtomicUsize,
    served: AtomicUsize,
    /// Milliseconds since `start` at which the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `start` at which bytes arrived on an idle connection (a request
    /// head has begun), or `NONE`.
    head_since: AtomicU64,
    is_h2: AtomicBool,
    first_read: AtomicBool,
    /// Set while the watchdog sleeps towards the idle deadline: only then does a head
    /// that starts need to wake it (otherwise it looks again within `header_read_timeout`
    /// anyway), so a busy keep-alive connection costs no wake-up per request.
    armed: AtomicBool,
    wake: Notify,
    /// Milliseconds since `start` since which a write to the client has been waiting for
    /// the socket to take a byte, or `NONE` (CONTRACT §7 `send_timeout`).
    write_blocked_since: AtomicU64,
    /// The HTTP/2 responses being sent, each cut off on its own when its stream is left
    /// unread for `send_timeout`.
    streams: std::sync::Mutex<Vec<Arc<StreamWatch>>>,
    /// Set while the watchdog looks again within `send_timeout` anyway (a request is in
    /// flight), so that a new stream to watch need not wake it.
    watching: AtomicBool,
    /// Bytes read from the client so far.
    read_total: Arc<AtomicU64>,
    /// `read_total` where the current request head began.
    head_start: AtomicU64,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection owes a request head from its first moment (a silent client
            // is a slow-loris too).
            head_since: AtomicU64::new(0),
            is_h2: AtomicBool::new(false),
            first_read: AtomicBool::new(true),
            armed: AtomicBool::new(false),
            wake: Notify::new(),
            write_blocked_since: AtomicU64::new(NONE),
            streams: std::sync::Mutex::new(Vec::new()),
            watching: AtomicBool::new(false),
            read_total: Arc::new(AtomicU64::new(0)),
            head_start: AtomicU64::new(0),
        }
    }

    /// A write returned: `blocked` if the socket took nothing.
    fn on_write(&self, blocked: bool) {
        let since = self.write_blocked_since.load(Ordering::Relaxed);
        if !blocked {
            if since != NONE {
                self.write_blocked_since.store(NONE, Ordering::Relaxed);
            }
            return;
        }
        if since == NONE {
            self.write_blocked_since
                .store(self.now_ms(), Ordering::SeqCst);
            // The watchdog may sleep towards a later deadline: it looks at this one now
            // (writes run on the connection's own task, so this costs no thread switch).
            self.wake.notify_one();
        }
    }

    /// When the client's socket has not taken a byte for `send_timeout`: `Ok(())` if that
    /// has happened, else when it will if nothing moves (or `None` if no write waits).
    fn send_deadline(&self, send: Duration) -> Result<Option<Instant>, ()> {
        let since = self.write_blocked_since.load(Ordering::SeqCst);
        if since == NONE {
            return Ok(None);
        }
        let deadline = self.at(since) + send;
        if deadline <= Instant::now() {
            return Err(());
        }
        Ok(Some(deadline))
    }

    /// Watches an HTTP/2 response for `send_timeout`.
    fn watch_stream(&self, body: Body) -> Arc<StreamWatch> {
        let w = Arc::new(StreamWatch {
            handed: AtomicU64::new(NONE),
            body: std::sync::Mutex::new(Some(body)),
        });
        if let Ok(mut list) = self.streams.lock() {
            if list.len() >= 64 {
                // Responses whose body hyper has dropped.
                list.retain(|w| Arc::strong_count(w) > 1);
            }
            list.push(Arc::clone(&w));
        }
        if !self.watching.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
        w
    }

    /// Cuts off every HTTP/2 response whose stream has taken nothing for `send`; returns
    /// when the next one would be due if nothing moves.
    fn cut_stalled_streams(&self, send: Duration) -> Option<Instant> {
        let now = self.now_ms();
        let send_ms = send.as_millis() as u64;
        let mut next: Option<u64> = None;
        let mut cut: Vec<Body> = Vec::new();
        if let Ok(mut list) = self.streams.lock() {
            list.retain(|w| Arc::strong_count(w) > 1);
            for w in list.iter() {
                let handed = w.handed.load(Ordering::Relaxed);
                if handed == NONE {
                    continue;
                }
                if now.saturating_sub(handed) >= send_ms {
                    if let Some(b) = w.body.lock().ok().and_then(|mut b| b.take()) {
                        cut.push(b);
                    }
                } else {
                    next = Some(next.map_or(handed + send_ms, |n| n.min(handed + send_ms)));
                }
            }
        }
        if !cut.is_empty() {
            tracing::debug!(
                streams = cut.len(),
                "send_timeout: unread HTTP/2 responses cut off"
            );
        }
        // Dropped outside the lock: each releases its upstream connection and its slot.
        drop(cut);
        next.map(|ms| self.at(ms))
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn on_read(&self, bytes: &[u8]) {
        if self.first_read.swap(false, Ordering::Relaxed) && bytes.starts_with(b"PRI * HTTP/2") {
            self.is_h2.store(true, Ordering::Relaxed);
        }
        let before = self
            .read_total
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
        {
            self.head_start.store(before, Ordering::Relaxed);
            // SeqCst pairs with the watchdog's arming below (a store then a load on each
            // side: either it sees the head, or this sees it armed).
            self.head_since.store(self.now_ms(), Ordering::SeqCst);
            if self.armed.swap(false, Ordering::SeqCst) {
                self.wake.notify_one();
            }
        }
    }

    /// A request head has been parsed; `wire` is its size on the wire with its body's,
    /// where known (HTTP/1.1 without chunked coding).
    fn begin_request(self: &Arc<Self>, wire: Option<u64>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        RequestGuard {
            state: Arc::clone(self),
            wire,
        }
    }

    /// When the watchdog must look again, and what it will find if nothing changes.
    fn next_check(&self, t: &Timeouts) -> (Instant, Verdict) {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // Look again within the shortest limit: by then this request may be done and
            // the connection idle, the next head begun, or a response left unread.
            return (
                Instant::now() + t.header.min(t.idle).min(t.send),
                Verdict::Busy,
            );
        }
        let head = self.head_since.load(Ordering::Relaxed);
        let h2_served =
            self.is_h2.load(Ordering::Relaxed) && self.served.load(Ordering::Relaxed) > 0;
        if head != NONE && !h2_served {
            // Also look again within the shorter limit: the head may complete, its request
            // be served and the connection go idle well before this deadline.
            let deadline = (self.at(head) + t.header).min(Instant::now() + t.header.min(t.idle));
            return (deadline, Verdict::HeadTimeout);
        }
        self.armed.store(true, Ordering::SeqCst);
        // A head that began between the loads above and arming is caught here.
        if self.head_since.load(Ordering::SeqCst) != NONE && !h2_served {
            self.armed.store(false, Ordering::Relaxed);
            return (Instant::now(), Verdict::Busy);
        }
        (
            self.at(self.idle_since.load(Ordering::Relaxed)) + t.idle,
            Verdict::Idle,
        )
    }

    /// Whether, looked at again now, the connection has run past the limit `verdict` names.
    fn is_expired(&self, t: &Timeouts, verdict: Verdict) -> bool {
        let (deadline, v) = self.next_check(t);
        v == verdict && deadline <= Instant::now()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Busy,
    HeadTimeout,
    Idle,
}

struct Timeouts {
    header: Duration,
    idle: Duration,
    send: Duration,
}

/// One HTTP/2 response on its way to the client, as the connection's watchdog sees it.
struct StreamWatch {
    /// Milliseconds since the connection's start at which hyper took a frame of the body
    /// without asking for the next one yet (the stream is waiting for the client's
    /// window), or `NONE`.
    handed: AtomicU64,
    /// The body; taken by the watchdog to cut the stream off, which drops the upstream
    /// connection and the server's in-flight count with it.
    body: std::sync::Mutex<Option<Body>>,
}

/// The client left its HTTP/2 stream unread longer than `send_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client left its response unread longer than send_timeout")]
struct SendTimeout;

/// A request in flight on a connection; dropped with the response body.
struct RequestGuard {
    state: Arc<ConnState>,
    /// The request's head and body size on the wire, where known.
    wire: Option<u64>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &self.state;
        if s.in_flight.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        s.idle_since.store(s.now_ms(), Ordering::Relaxed);
        // Bytes read past this request's end are the next head, begun already: held to
        // header_read_timeout like any head (a client that sends a body and the start of
        // a next head, then nothing, is a slow-loris too), not to idle_timeout.
        let surplus = self.wire.is_some_and(|wire| {
            let end = s.head_start.load(Ordering::Relaxed) + wire;
            let more = s.read_total.load(Ordering::Relaxed) > end;
            if more {
                s.head_start.store(end, Ordering::Relaxed);
            }
            more
        });
        let head = if surplus { s.now_ms() } else { NONE };
        s.head_since.store(head, Ordering::Relaxed);
    }
}

/// The client's IO, noting when a request head starts.
struct WatchedIo<S> {
    inner: S,
    state: Arc<ConnState>,
    ctx: Arc<Context>,
    /// fairway's answer in place of hyper's own (see [`own_answer`]), and how much of it is
    /// written.
    answer: Option<(Vec<u8>, usize)>,
}

/// hyper answers a request head it cannot parse by itself, with an empty body, before any
/// request reaches the proxy. Such an answer is the only thing written while no request is in
/// flight on an HTTP/1.1 connection; it is replaced with the same status and fairway's short
/// text body (CONTRACT §3), and counted like a request no route matched.
fn own_answer(hyper_head: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head = hyper_head.strip_prefix(b"HTTP/1.1 ")?;
    let code: u16 = std::str::from_utf8(head.get(..3)?).ok()?.parse().ok()?;
    let text = match code {
        400 => crate::error::ProxyError::BadRequest("malformed request").text(),
        431 => crate::error::ProxyError::HeadTooLarge.text(),
        414 => "414 uri too long\n",
        _ => return None,
    };
    let line_end = hyper_head.windows(2).position(|w| w == b"\r\n")?;
    let mut out = Vec::with_capacity(160 + text.len());
    out.extend_from_slice(&hyper_head[..line_end + 2]);
    // hyper's other header lines (date), without its length and connection.
    let rest = &hyper_head[line_end + 2..];
    for line in rest.split(|&b| b == b'\n') {
        let lower = line.to_ascii_lowercase();
        if line.len() > 1
            && !lower.starts_with(b"content-length:")
            && !lower.starts_with(b"connection:")
        {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", text.len()).as_bytes());
    out.extend_from_slice(text.as_bytes());
    Some((code, out))
}

impl<S: AsyncWrite + Unpin> WatchedIo<S> {
    /// Writes what is left of fairway's own answer.
    fn poll_answer(&mut self, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = self.answer.as_mut() {
            if *done == bytes.len() {
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether `data` (a whole write) is hyper's own answer: written while no request is in
    /// flight, and a bare head with `content-length: 0` and `connection: close`. If so, it is
    /// replaced and counted, and the write is reported done.
    fn replaced(&mut self, data: &[u8]) -> bool {
        if self.answer.is_some()
            || self.state.in_flight.load(Ordering::Relaxed) > 0
            || self.state.is_h2.load(Ordering::Relaxed)
            || !data.starts_with(b"HTTP/1.1 4")
            || !data.ends_with(b"\r\n\r\n")
        {
            return false;
        }
        let lower = data.to_ascii_lowercase();
        let has = |line: &[u8]| lower.windows(line.len()).any(|w| w == line);
        if !has(b"\r\ncontent-length: 0\r\n") || !has(b"\r\nconnection: close\r\n") {
            return false;
        }
        let Some((code, bytes)) = own_answer(data) else {
            return false;
        };
        self.ctx.runtime.load().no_route.inc(code);
        self.answer = Some((bytes, 0));
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        if this.replaced(data) {
            let _ = this.poll_answer(cx)?;
            return Poll::Ready(Ok(data.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.state.on_write(r.is_pending());
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        // A flush that is done says nothing of progress (a TCP socket has nothing to
        // flush); one that waits is a blocked write (TLS records not taken).
        if r.is_pending() {
            this.state.on_write(true);
        }
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        let whole = match (parts.next(), parts.next()) {
            (Some(only), None) => &only[..],
            _ => &[][..],
        };
        if this.replaced(whole) {
            let _ = this.poll_answer(cx)?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.state.on_write(r.is_pending());
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The size of an HTTP/1.x request on the wire, head and body, as a client writes it
/// (`Name: value` lines); `None` for HTTP/2 and for a chunked body, whose framing is not
/// known in advance.
fn wire_size<B>(req: &Request<B>) -> Option<u64> {
    if req.version() == http::Version::HTTP_2
        || req.headers().contains_key(http::header::TRANSFER_ENCODING)
    {
        return None;
    }
    let body = match req.headers().get(http::header::CONTENT_LENGTH) {
        Some(v) => v.to_str().ok()?.trim().parse::<u64>().ok()?,
        None => 0,
    };
    Some(proxy::head_size(req) as u64 + body)
}

/// A request being answered. If hyper drops it before the answer is ready (the client
/// closed its connection, or reset its HTTP/2 stream), it is counted and logged as the
/// client's: status 499, as Nginx logs a client that went away.
struct Pending {
    entry: Option<Box<Entry>>,
    trace: proxy::Trace,
    start: Instant,
    rt: Arc<crate::runtime::Runtime>,
    ctx: Arc<Context>,
}

impl Pending {
    /// The answer is ready with `status` (already counted by `proxy::handle`): the access
    /// log entry, completed, to go with the response body.
    fn finish(&mut self, status: u16) -> Option<(Box<Entry>, Arc<Context>)> {
        let mut e = self.entry.take()?;
        self.fill(&mut e, status);
        Some((e, Arc::clone(&self.ctx)))
    }

    fn fill(&self, e: &mut Entry, status: u16) {
        e.status = status;
        e.attempts = self.trace.attempts;
        if let Some(ip) = self.trace.client_ip {
            e.client = ip;
        }
        e.upstream = self
            .trace
            .upstream
            .map(|i| Arc::clone(&self.rt.upstreams[i].name));
        e.server = self.trace.server.as_ref().map(|s| Arc::clone(&s.addr));
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.trace.answered {
            return;
        }
        let code = crate::error::CLIENT_CLOSED_REQUEST;
        proxy::count(&self.rt, &self.trace, code, self.start);
        if let Some(mut e) = self.entry.take() {
            self.fill(&mut e, code);
            self.ctx.access_log.send(&e, &self.ctx.metrics);
        }
    }
}

/// The body sent to a client: the response body plus the guard that marks the request done
/// on this connection when hyper drops it.
pub struct ConnBody {
    inner: Sent,
    access: Option<(Box<Entry>, Arc<Context>)>,
    guard: RequestGuard,
}

/// A response body as the client connection holds it.
enum Sent {
    /// Held here (HTTP/1.1, where a client that reads nothing blocks the whole connection
    /// and the connection is cut off for it; and the proxy's own short answers).
    Own(Body),
    /// Context with the connection's watchdog, which cuts this stream alone off when the
    /// client leaves it unread (HTTP/2).
    Watched(Arc<StreamWatch>),
}

impl Drop for ConnBody {
    fn drop(&mut self) {
        if let Some((entry, ctx)) = self.access.take() {
            ctx.access_log.send(&entry, &ctx.metrics);
        }
    }
}

impl ConnBody {
    fn poll_inner(
        &mut self,
        cx: &mut task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let w = match &mut self.inner {
            Sent::Own(b) => return Pin::new(b).poll_frame(cx),
            Sent::Watched(w) => w,
        };
        let Ok(mut slot) = w.body.lock() else {
            return Poll::Ready(Some(Err(Box::new(SendTimeout))));
        };
        let Some(body) = slot.as_mut() else {
            // Cut off by the watchdog: hyper resets the stream.
            return Poll::Ready(Some(Err(Box::new(SendTimeout))));
        };
        let r = Pin::new(body).poll_frame(cx);
        // A data frame handed over starts the clock until hyper asks for the next one.
        let handed = match &r {
            Poll::Ready(Some(Ok(f))) if f.is_data() => self.guard.state.now_ms(),
            _ => NONE,
        };
        w.handed.store(handed, Ordering::Relaxed);
        r
    }
}

impl http_body::Body for ConnBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = this.poll_inner(cx);
        if let (Some((entry, _)), Poll::Ready(Some(Ok(frame)))) = (&mut this.access, &r)
            && let Some(d) = frame.data_ref()
        {
            entry.bytes += d.len() as u64;
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Sent::Own(b) => b.is_end_stream(),
            Sent::Watched(w) => w
                .body
                .lock()
                .map_or(true, |b| b.as_ref().is_none_or(|b| b.is_end_stream())),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Sent::Own(b) => b.size_hint(),
            Sent::Watched(w) => w
                .body
                .lock()
                .ok()
                .and_then(|b| b.as_ref().map(|b| b.size_hint()))
                .unwrap_or_default(),
        }
    }
}

fn builder(s: &Settings) -> (auto::Builder<TokioExecutor>, Timeouts) {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // The watchdog below enforces header_read_timeout; hyper's would also cut idle
        // keep-alive connections at the same limit.
        .header_read_timeout(None)
        .keep_alive(true)
        // Room for twice max_header_bytes, so that the proxy itself sees an oversized head
        // and answers 431 with a body (CONTRACT §3); only heads past twice the limit get
        // hyper's bare 431.
        .max_buf_size(s.max_header_bytes.saturating_mul(2).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(s.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        // Bounded per connection; a client that opens and resets streams faster than
        // they can be served is cut off (the rapid-reset guard).
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256));
    let t = Timeouts {
        header: s.header_read_timeout,
        idle: s.idle_timeout,
        send: s.send_timeout,
    };
    (b, t)
}

/// Serves one client connection until it closes, times out or the proxy shuts down.
pub async fn serve_connection<S>(stream: S, info: ConnInfo, ctx: Arc<Context>, settings: &Settings)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (builder, timeouts) = builder(settings);
    let state = Arc::new(ConnState::new());
    let io = WatchedIo {
        inner: stream,
        state: Arc::clone(&state),
        ctx: Arc::clone(&ctx),
        answer: None,
    };
    let svc_state = Arc::clone(&state);
    let svc_ctx = Arc::clone(&ctx);
    let peer = info.peer;
    let info = ConnInfo {
        bytes_read: Some(Arc::clone(&state.read_total)),
        ..info
    };
    let service = service_fn(move |req: Request<Incoming>| {
        let guard = svc_state.begin_request(wire_size(&req));
        let info = info.clone();
        let ctx = Arc::clone(&svc_ctx);
        async move {
            let rt = ctx.runtime.load_full();
            let format = rt.settings.access_log;
            let h2 = req.version() == http::Version::HTTP_2;
            let mut pending = Pending {
                entry: (format != AccessFormat::Off)
                    .then(|| Box::new(Entry::begin(format, &req, info.peer.ip()))),
                trace: proxy::Trace::default(),
                start: Instant::now(),
                rt,
                ctx,
            };
            // Boxed: hyper keeps room for one in-flight future per connection, idle or
            // not; a small box there instead of the whole request state saves ~4 KiB per
            // idle keep-alive connection, for one allocation per request.
            let resp = Box::pin(proxy::handle(
                &pending.rt,
                req,
                &info,
                &pending.ctx,
                pending.start,
                &mut pending.trace,
            ))
            .await;
            let access = pending.finish(resp.status().as_u16());
            Ok::<_, Infallible>(resp.map(|inner| {
                let inner = match inner {
                    Body::Upstream(_) if h2 => Sent::Watched(guard.state.watch_stream(inner)),
                    inner => Sent::Own(inner),
                };
                ConnBody {
                    inner,
                    access,
                    guard,
                }
            }))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let (mut deadline, verdict) = if closing {
            // Draining: the shutdown timeout bounds what is left.
            (Instant::now() + Duration::from_secs(3600), Verdict::Busy)
        } else {
            state.next_check(&timeouts)
        };
        state
            .watching
            .store(verdict == Verdict::Busy && !closing, Ordering::Relaxed);
        // CONTRACT §7 send_timeout: a client whose socket takes nothing is cut off whole;
        // an HTTP/2 stream left unread, alone.
        match state.send_deadline(timeouts.send) {
            Err(()) => {
                tracing::debug!(peer = %peer, "closing connection: send_timeout");
                break;
            }
            Ok(Some(t)) => deadline = deadline.min(t),
            Ok(None) => {}
        }
        if let Some(t) = state.cut_stalled_streams(timeouts.send) {
            deadline = deadline.min(t);
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                match verdict {
                    Verdict::Busy => {}
                    Verdict::HeadTimeout => {
                        if state.is_expired(&timeouts, Verdict::HeadTimeout) {
                            tracing::debug!(peer = %peer, "closing connection: header_read_timeout");
                            break;
                        }
                    }
                    Verdict::Idle => {
                        if state.is_expired(&timeouts, Verdict::Idle) {
                            conn.as_mut().graceful_shutdown();
                            // Give the close a moment, then drop the connection.
                            let grace = tokio::time::sleep(Duration::from_secs(1));
                            tokio::select! {
                                _ = conn.as_mut() => {}
                                _ = grace => {}
                            }
                            break;
                        }
                    }
                }
            }
            _ = state.wake.notified() => {}
            _ = ctx.stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts open client connections.
struct ConnCount(Arc<Context>);

impl ConnCount {
    fn new(ctx: &Arc<Context>) -> ConnCount {
        ctx.metrics.connections_active.inc();
        ConnCount(Arc::clone(ctx))
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.metrics.connections_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_answers_get_the_proxy_text_and_keep_their_date() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                      date: Sun, 29 Nov 2026 05:29:01 GMT\r\n\r\n";
        let (code, out) = own_answer(hyper).unwrap();
        assert_eq!(code, 400);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 400 Bad Request\r\ndate: Sun, 29 Nov 2026 05:29:01 GMT\r\n\
             content-type: text/plain; charset=utf-8\r\nconnection: close\r\n\
             content-length: 16\r\n\r\n400 bad request\n"
        );
        let (code, out) = own_answer(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(code, 431);
        assert!(out.ends_with(b"\r\n\r\n431 request header fields too large\n"));
        assert!(own_answer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(own_answer(b"HTTP/1.0 400 Bad Request\r\n\r\n").is_none());
    }
}
