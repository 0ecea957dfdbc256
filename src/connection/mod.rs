//! One client connection from accept to close: the accept loop, the PROXY protocol and TLS,
//! then fairway's own HTTP/1.1 server (`h1.rs`) calling `proxy::handle` per request. A client
//! that opens with the HTTP/2 preface, or picks `h2` by ALPN, is served by hyper's HTTP/2
//! server instead, with a watchdog beside it (`watchdog.rs`) for `header_read_timeout`,
//! `idle_timeout` and `send_timeout`, the IO hyper sees (`watched.rs`), and the answers as
//! the connection holds them (`response.rs`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod h1;
mod response;
mod watchdog;
mod watched;

use response::{ConnBody, Pending, Sent};
use watchdog::{ConnState, Timeouts, Verdict};
use watched::WatchedIo;

use crate::body::Body;
use crate::context::{ConnInfo, Context};
use crate::proxy::{self, ClientRequest};
use crate::proxy_protocol;
use crate::runtime::Settings;
use crate::timing::OneReading;
use crate::upload::Inbound;
use crate::wire::Wire;
use bytes::BytesMut;

/// Accepts connections until `stop` fires (the listener was removed, or shutdown), serving
/// each on its own tracked task.
pub async fn accept_loop(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    let Some(mut acceptor) = Acceptor::new(listener, stop, "client") else {
        return;
    };
    let local = match acceptor.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    while let Some((stream, peer)) = acceptor.next().await {
        // Past max_connections: accepted and closed at once, with no answer
        // (CONTRACT §7), so the backlog does not fill with clients left waiting.
        let max = ctx.runtime.load().settings.max_connections;
        if ctx.metrics.connections_active.get() >= max as i64 {
            ctx.metrics.connections_rejected.inc();
            drop(stream);
            continue;
        }
        let info = ConnInfo {
            peer,
            local,
            proto: "http",
            bytes_read: None,
        };
        let here = crate::workers::index();
        let counted = Counted::new(&ctx, here);
        let worker = counted.worker;
        // Registered with the reactor of the worker that serves it (a less loaded one, if
        // this worker serves more). Boxed: the connection's state (about 1.5 KiB) goes into
        // its task as a pointer, where it would be copied whole at each step of the spawn
        // and three times more by the task itself.
        let serve = Box::pin(OneReading::new(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve_accepted(stream, info, &counted.ctx).await,
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "cannot register the connection")
                }
            }
            drop(counted);
        }));
        if worker == here {
            ctx.tracker(here).spawn(serve);
        } else {
            ctx.tracker(worker)
                .spawn_on(serve, &ctx.workers.handles()[worker]);
        }
    }
    tracing::debug!(listen = %local, "stopped accepting");
}

/// The limits a client connection holds, taken from the snapshot it was accepted under
/// (a long connection must not pin an old config).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) header: Duration,
    pub(super) idle: Duration,
    pub(super) send: Duration,
    pub(super) body_pause: Duration,
    pub(super) max_head: usize,
}

impl Limits {
    fn of(s: &Settings) -> Limits {
        Limits {
            header: s.header_read_timeout,
            idle: s.idle_timeout,
            send: s.send_timeout,
            body_pause: s.body_read_timeout,
            max_head: s.max_header_bytes,
        }
    }
}

/// Reads the PROXY protocol header if the listener expects one, then serves the connection,
/// over TLS when `[server.tls]` is set. The connection takes its limits and certificates
/// from one load of the current snapshot.
async fn serve_accepted(mut stream: tokio::net::TcpStream, mut info: ConnInfo, ctx: &Arc<Context>) {
    let (limits, proxy_protocol, tls, per_ip) = {
        let rt = ctx.runtime.load();
        if rt.settings.proxy_protocol && !crate::headers::is_trusted(info.peer.ip(), &rt.trusted) {
            tracing::debug!(peer = %info.peer, "refused: PROXY protocol is accepted only from trusted_proxies");
            return;
        }
        (
            Limits::of(&rt.settings),
            rt.settings.proxy_protocol,
            rt.tls.clone(),
            rt.settings.max_connections_per_ip,
        )
    };
    if proxy_protocol {
        let read = proxy_protocol::read_header(&mut stream);
        match tokio::time::timeout(limits.header, read).await {
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
    // Past max_connections_per_ip (CONTRACT §8), counted by the address the PROXY protocol
    // gave: closed at once with no answer, as past max_connections.
    let Some(_counted) = ctx.per_ip.try_acquire(info.peer.ip(), per_ip) else {
        ctx.metrics.connections_rejected.inc();
        tracing::debug!(peer = %info.peer, "refused: max_connections_per_ip reached");
        return;
    };
    // `TCP_NODELAY`: at once for TLS (the handshake and HTTP/2 write in pieces); a plain
    // connection sets it before its second write (`Wire::before_write`).
    if tls.is_some() {
        let _ = stream.set_nodelay(true);
    }
    match tls {
        None => {
            let wire = Wire::new(tokio_util::either::Either::Left(stream), BytesMut::new());
            h1::serve(wire, info, Arc::clone(ctx), limits).await;
        }
        // Boxed: the TLS state is large, and every connection's task would otherwise keep
        // room for it (and be copied whole when spawned), plain or not.
        Some(tls) => Box::pin(serve_tls(stream, tls, info, Arc::clone(ctx), limits)).await,
    }
}

/// The TLS handshake, completed within `header_read_timeout` (a failure closes this
/// connection only), then the connection: HTTP/2 when the client chose it by ALPN.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    mut info: ConnInfo,
    ctx: Arc<Context>,
    limits: Limits,
) {
    info.proto = "https";
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    match tokio::time::timeout(limits.header, acceptor.accept(stream)).await {
        Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
            serve_h2(stream, info, ctx, limits).await;
        }
        Ok(Ok(stream)) => {
            let wire = Wire::new(
                tokio_util::either::Either::Right(Box::new(stream)),
                BytesMut::new(),
            );
            h1::serve(wire, info, ctx, limits).await;
        }
        Ok(Err(e)) => tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(peer = %info.peer, "TLS handshake timed out"),
    }
}

/// A listener and the signal that stops it: [`Acceptor::next`] waits for the next
/// connection. The signal is waited on by one future for the listener's life, not one per
/// connection (each registered in and removed from the signal's list of waiters, under its
/// lock), and no connection is accepted once it fired.
///
/// A connection comes out as a standard socket, registered with no reactor yet: it is
/// registered once, by the worker that serves it, and its first read waits for the
/// reactor's word that the request is there. (tokio's own `accept` registers it where it
/// was accepted and assumes it readable: a connection handed to another worker is
/// registered twice, and under load the first read of most connections finds nothing.)
pub struct Acceptor {
    listener: tokio::io::unix::AsyncFd<std::net::TcpListener>,
    stopped: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    what: &'static str,
}

impl Acceptor {
    /// Accepts on `listener` until `stop` fires; `what` names it in the log. `None`, logged,
    /// if the listener cannot be watched.
    pub fn new(
        listener: TcpListener,
        stop: CancellationToken,
        what: &'static str,
    ) -> Option<Acceptor> {
        match Self::watch(listener, stop, what) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = %e, listener = what, "cannot accept on this listener");
                None
            }
        }
    }

    fn watch(
        listener: TcpListener,
        stop: CancellationToken,
        what: &'static str,
    ) -> std::io::Result<Acceptor> {
        // `with_interest` is deprecated because an `AsyncFd` must not outlive the descriptor
        // it registered, which a type that does not own its descriptor cannot promise (tokio
        // #8587). A `std::net::TcpListener` owns its descriptor until it is dropped, with the
        // `AsyncFd`, so the condition holds.
        #[allow(deprecated)]
        let listener = tokio::io::unix::AsyncFd::with_interest(
            listener.into_std()?,
            tokio::io::Interest::READABLE,
        )?;
        Ok(Acceptor {
            listener,
            stopped: Box::pin(stop.cancelled_owned()),
            what,
        })
    }

    /// The listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.get_ref().local_addr()
    }

    /// The next connection, registered with the calling thread's reactor (one that cannot
    /// be is closed), or `None` once the stop signal fired.
    pub async fn next_here(&mut self) -> Option<(tokio::net::TcpStream, SocketAddr)> {
        loop {
            let (stream, peer) = self.next().await?;
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => return Some((stream, peer)),
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "cannot register the connection")
                }
            }
        }
    }

    /// The next connection, non-blocking, or `None` once the stop signal fired. Accept
    /// errors (EMFILE and friends) are logged and backed off from instead of spinning.
    pub async fn next(&mut self) -> Option<(std::net::TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.stopped.as_mut() => return None,
                r = accept_one(&self.listener) => r,
            };
            match accepted {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, listener = self.what, "accept failed");
                    tokio::select! {
                        _ = self.stopped.as_mut() => return None,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }
}

/// Accepts one connection once the listener is readable.
async fn accept_one(
    listener: &tokio::io::unix::AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(r) = ready.try_io(|l| accept_nonblocking(l.get_ref())) {
            return r;
        }
    }
}

/// `accept4` with the new socket non-blocking and close-on-exec from the start.
#[cfg(target_os = "linux")]
fn accept_nonblocking(
    l: &std::net::TcpListener,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (s, addr) = socket2::SockRef::from(l).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| std::io::Error::other("a peer without an IP address"))?;
    Ok((s.into(), addr))
}

#[cfg(not(target_os = "linux"))]
fn accept_nonblocking(
    l: &std::net::TcpListener,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (s, addr) = l.accept()?;
    s.set_nonblocking(true)?;
    Ok((s, addr))
}

/// `redirect_http`: answers every request with 308 to the same host and path over https.
pub async fn redirect_loop(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    let Some(mut acceptor) = Acceptor::new(listener, stop, "redirect_http") else {
        return;
    };
    while let Some((stream, _)) = acceptor.next_here().await {
        let tracker = ctx.tracker(crate::workers::index()).clone();
        let ctx = Arc::clone(&ctx);
        tracker.spawn(async move {
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
                _ = ctx.stop_here().cancelled() => {
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

fn builder(s: &Limits) -> (auto::Builder<TokioExecutor>, Timeouts) {
    let mut b = auto::Builder::new(TokioExecutor::new()).http2_only();
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_head.saturating_mul(2)).unwrap_or(u32::MAX))
        // Bounded per connection; a client that opens and resets streams faster than
        // they can be served is cut off (the rapid-reset guard).
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256));
    let t = Timeouts {
        header: s.header,
        idle: s.idle,
        send: s.send,
    };
    (b, t)
}

/// Serves one HTTP/2 client connection until it closes, times out or the proxy shuts down.
async fn serve_h2<S>(stream: S, info: ConnInfo, ctx: Arc<Context>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (builder, timeouts) = builder(&limits);
    let state = Arc::new(ConnState::new());
    let io = WatchedIo {
        inner: stream,
        state: Arc::clone(&state),
    };
    let svc_state = Arc::clone(&state);
    let svc_ctx = Arc::clone(&ctx);
    let peer = info.peer;
    let service = service_fn(move |req: Request<Incoming>| {
        let head = proxy::head_size(&req);
        let guard = svc_state.begin_request();
        let info = info.clone();
        let ctx = Arc::clone(&svc_ctx);
        async move {
            let (parts, body) = req.into_parts();
            let mut req = ClientRequest::from_h2(parts, Inbound::H2(body));
            let trace = proxy::Trace::default();
            let mut pending = Pending::begin(&ctx, &req, info.peer.ip(), trace, Instant::now());
            // Boxed: hyper keeps room for one in-flight future per connection, idle or
            // not; a small box there instead of the whole request state saves ~4 KiB per
            // idle keep-alive connection, for one allocation per request. Allocated
            // first, so that the future is made in the box instead of copied into it.
            let handle = Box::write(
                Box::new_uninit(),
                proxy::handle(
                    &pending.rt,
                    &mut req,
                    head,
                    &info,
                    pending.ctx,
                    pending.start,
                    &mut pending.trace,
                ),
            );
            let resp = Box::into_pin(handle).await;
            let access = pending.finish(resp.status().as_u16());
            Ok::<_, Infallible>(resp.map(|inner| {
                let inner = match inner {
                    Body::Upstream(_) | Body::Compressed(_) => {
                        Sent::Watched(guard.state.watch_stream(inner))
                    }
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
            _ = ctx.stop_here().cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A client connection while it is open: counted in `fairway_client_connections_active`
/// and in the load of the worker that serves it. One hold of the context serves both.
struct Counted {
    ctx: Arc<Context>,
    worker: usize,
}

impl Counted {
    /// Counts a connection accepted on worker `here`, and picks the worker that serves it.
    fn new(ctx: &Arc<Context>, here: usize) -> Counted {
        ctx.metrics.connections_active.inc();
        Counted {
            worker: ctx.workers.assign(here),
            ctx: Arc::clone(ctx),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.ctx.metrics.connections_active.dec();
        self.ctx.workers.release(self.worker);
    }
}
