//! fairway's own HTTP/1.1 server side. One loop per client connection reads a request head
//! straight from the connection's buffer (`h1::request`, every RFC 9112 rule of
//! HTTP1-RULES), hands the request to `proxy::handle` with its body read from the same
//! connection as the upstream takes it (`wire`), writes the response head and streams the
//! body, then reads the next request, or becomes a tunnel after a `101`. Its limits live in
//! the loop: `header_read_timeout` from a head's first byte, `idle_timeout` between
//! requests, `send_timeout` while a write waits. The read buffer is given back whenever the
//! connection waits with nothing read, so an idle connection is a socket and a small task.

use std::future::{Future, poll_fn};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Response, StatusCode, Version, header};
use http_body::Body as _;
use tokio::io::AsyncWrite;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::Limits;
use super::response::Pending;
use crate::access::Entry;
use crate::body::Body;
use crate::config::AccessFormat;
use crate::context::{ConnInfo, Context};
use crate::error::ProxyError;
use crate::h1::request::{RequestError, RequestHead, RequestLength, parse_request};
use crate::h1::response::{Framing, Persist, chunk_size_line, write_head};
use crate::headers::RawFields;
use crate::proxy::{self, ClientRequest};
use crate::stream::{give_back, take_buffer};
use crate::timing::{self, LazyTimer};
use crate::upload::Inbound;
use crate::wire::{CONTINUE, HeldWire, Prefixed, Remaining, Wire, WireBody, WireIo};

/// The HTTP/2 connection preface (RFC 9113 §3.4): a client that starts with it speaks h2c.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest a request body left unread by its answer is read and discarded so that the
/// connection can serve a next request.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// The longest a closing connection keeps reading (and discarding) what the client still
/// sends, so that the client reads its answer instead of a reset.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// At shutdown, how long a connection with no request begun still waits for one: long
/// enough for a request already on the wire, short enough not to hold up the drain.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// What reading a request head came to. The head is not boxed: a `Read` is never held
/// across an await, and its allocation would cost more than the move.
#[allow(clippy::large_enum_variant)]
enum Read {
    Head(RequestHead),
    Bad(RequestError),
    Http2,
    /// Closed, reset, timed out or shut down: nothing to answer.
    Gone,
}

/// The shutdown signal as a connection waits on it. Its future is polled once: that leaves
/// the task's waker with the token, which wakes the task when it fires. From then on the
/// context's flag tells (a load, where each poll of the future takes the token's lock).
struct Stop {
    fired: Pin<Box<WaitForCancellationFutureOwned>>,
    armed: bool,
}

impl Stop {
    /// Whether the shutdown has begun; the task is woken when it does.
    fn poll(&mut self, ctx: &Context, cx: &mut std::task::Context<'_>) -> bool {
        if self.armed {
            return ctx.is_stopping();
        }
        self.armed = true;
        self.fired.as_mut().poll(cx).is_ready()
    }
}

/// A write to the client failed or waited past `send_timeout`: the connection is done.
struct WriteFailed;

/// The parts of the request the response and what follows it depend on.
struct Facts {
    head: bool,
    version: Version,
    close: bool,
}

struct Conn {
    wire: HeldWire,
    info: ConnInfo,
    ctx: Arc<Context>,
    limits: Limits,
    timer: LazyTimer,
    stop: Stop,
    start: Instant,
    served: u64,
}

/// Serves HTTP/1.1 on `wire` until the connection closes; a client that opens with the
/// HTTP/2 preface is served by hyper's HTTP/2 server, the bytes read put back. The
/// connection's state is built before the future, so that its task holds it once.
pub(super) fn serve(
    wire: Wire,
    info: ConnInfo,
    ctx: Arc<Context>,
    limits: Limits,
) -> impl Future<Output = ()> + Send {
    let info = ConnInfo {
        bytes_read: Some(Arc::clone(&wire.read_total)),
        ..info
    };
    let wire = HeldWire::new(wire);
    let start = Instant::now();
    let stop = Stop {
        fired: Box::pin(ctx.stop_here().clone().cancelled_owned()),
        armed: false,
    };
    let mut c = Conn {
        wire,
        info,
        ctx,
        limits,
        timer: LazyTimer::default(),
        stop,
        start,
        served: 0,
    };
    async move {
        if !c.run().await {
            return;
        }
        let Conn {
            wire, info, ctx, ..
        } = c;
        if let Some(w) = wire.into_inner() {
            // Boxed: hyper's HTTP/2 connection state is large, and only h2c clients
            // need it.
            Box::pin(super::serve_h2(Prefixed::from(w), info, ctx, limits)).await;
        }
    }
}

impl Conn {
    /// Serves requests until the connection is done; `true` when the client speaks HTTP/2.
    async fn run(&mut self) -> bool {
        loop {
            let head = match self.read_head().await {
                Read::Head(h) => h,
                Read::Http2 => return true,
                Read::Gone => return false,
                Read::Bad(e) => {
                    // Boxed: rare, and its state would otherwise sit in every connection.
                    Box::pin(self.refuse(e)).await;
                    return false;
                }
            };
            self.served += 1;
            // Boxed: a request's state (its head, the response being relayed) lives only
            // while it is served, not in the task of every idle connection. The box is
            // allocated first and the future made in it, not made on the stack and copied
            // in whole (4.7 KiB, when its first state holds a few hundred bytes).
            let exchange = Box::write(Box::new_uninit(), self.exchange(head));
            let next = Box::into_pin(exchange).await;
            // The request's body, if it had one, is gone: the wire is the loop's alone again.
            self.wire.reclaim();
            match next {
                Next::KeepAlive => {}
                Next::Closing if self.can_close_at_once() => return false,
                Next::Close | Next::Closing => {
                    self.linger().await;
                    return false;
                }
                Next::Done => return false,
            }
        }
    }

    /// Reads the next request head: `idle_timeout` while nothing has come, then
    /// `header_read_timeout` from its first byte (from the connection's start for its first
    /// request: a silent client is a slow-loris too). Shutdown closes a connection waiting
    /// with nothing begun after [`DRAIN_GRACE`].
    async fn read_head(&mut self) -> Read {
        let first = self.served == 0;
        let idle_since = timing::now();
        let mut head_since = if first {
            Some(self.start)
        } else if !self.wire.get().buf.is_empty() {
            Some(idle_since)
        } else {
            None
        };
        // The buffer's length when a head was last found incomplete: a head trickling in
        // is parsed again only once it may have ended or has doubled.
        let mut parsed_at = 0usize;
        let limits = self.limits;
        let (wire, timer, stop, ctx) = (&mut self.wire, &mut self.timer, &mut self.stop, &self.ctx);
        let mut grace_until: Option<Instant> = None;
        poll_fn(|cx| {
            let mut w = wire.get();
            loop {
                if !w.buf.is_empty() {
                    if head_since.is_none() {
                        head_since = Some(timing::now());
                    }
                    let n = w.buf.len().min(PREFACE.len());
                    let preface = first && w.buf[..n] == PREFACE[..n];
                    if preface && n == PREFACE.len() {
                        return Poll::Ready(Read::Http2);
                    }
                    // Past the limit it is parsed at once: refused (431) without reading on.
                    let worth = w.buf.len() >= 2 * parsed_at
                        || w.buf.len() > limits.max_head
                        || crate::h1::has_empty_line(&w.buf, parsed_at.saturating_sub(3));
                    if worth && !preface {
                        match parse_request(&mut w.buf, limits.max_head) {
                            Ok(Some(h)) => return Poll::Ready(Read::Head(h)),
                            Ok(None) => parsed_at = w.buf.len(),
                            Err(e) => return Poll::Ready(Read::Bad(e)),
                        }
                    }
                }
                // Nothing buffered: the buffer is allocated only once bytes are there.
                if w.buf.is_empty() && w.buf.capacity() == 0 {
                    match w.poll_readable(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(Read::Gone),
                        Poll::Pending => break,
                    }
                }
                match w.poll_fill(cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Read::Gone),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => {
                        w.release();
                        break;
                    }
                }
            }
            let begun = !w.buf.is_empty();
            drop(w);
            let mut deadline = match head_since {
                Some(t) => t + limits.header,
                None => idle_since + limits.idle,
            };
            // At shutdown a connection with nothing begun is closed after a short grace:
            // a request already on its way (from a client that reused its connection, or
            // connected as the listener was handed to a new process) is still answered,
            // with `Connection: close`, instead of meeting a closed connection.
            if !begun && (grace_until.is_some() || stop.poll(ctx, cx)) {
                let until = *grace_until.get_or_insert_with(|| Instant::now() + DRAIN_GRACE);
                deadline = deadline.min(until);
            }
            if timer.poll_until(cx, deadline).is_ready() {
                return Poll::Ready(Read::Gone);
            }
            Poll::Pending
        })
        .await
    }

    /// Answers a head that cannot be served (400, 431) and closes (CONTRACT §3): counted
    /// like a request no route matched.
    async fn refuse(&mut self, e: RequestError) {
        let err = match e {
            RequestError::TooLarge => ProxyError::HeadTooLarge,
            RequestError::Malformed(why) => ProxyError::BadRequest(why),
            RequestError::Unsupported(what) => ProxyError::NotImplemented(what),
        };
        tracing::debug!(peer = %self.info.peer, error = %e, "refused a request head");
        let status = err.status().as_u16();
        let rt = self.ctx.runtime.load();
        // No request to forward, but an ID lets the client's report be found in the log.
        let id = rt.settings.request_id.then(crate::headers::new_request_id);
        let mut resp = crate::body::error_response(&err, id.as_ref());
        if let Some(id) = &id {
            crate::headers::put_request_id(resp.headers_mut(), id);
        }
        let (parts, body) = resp.into_parts();
        let text = match body {
            Body::Full(Some(b)) => b,
            _ => Bytes::new(),
        };
        {
            rt.no_route.inc(status);
            let format = rt.settings.access_log;
            if format != AccessFormat::Off {
                let mut entry = Entry::refused(format, self.info.peer.ip(), status);
                entry.bytes = text.len() as u64;
                entry.request_id = id;
                self.ctx.access_log.send(&entry, &self.ctx.metrics);
            }
        }
        drop(rt);
        let mut out = BytesMut::new();
        write_head(
            &mut out,
            parts.status,
            None,
            &parts.headers,
            None,
            Framing::Length(text.len() as u64),
            Persist::Close,
        );
        let head = out.freeze();
        if self
            .write_all(&mut [IoSlice::new(&head), IoSlice::new(&text)])
            .await
            .is_ok()
            && self.flush().await.is_ok()
        {
            self.linger().await;
        }
    }

    /// Serves one request: the proxy answers it, the answer is written, and what is left
    /// of the request body decides whether the connection goes on.
    async fn exchange(&mut self, head: RequestHead) -> Next {
        let RequestHead {
            method,
            uri,
            version,
            fields,
            length,
            close,
            len,
        } = head;
        let facts = Facts {
            head: method == Method::HEAD,
            version,
            close,
        };
        let body = {
            let mut w = self.wire.get();
            w.body = match length {
                RequestLength::Empty => Remaining::None,
                RequestLength::Known(n) => Remaining::Known(n),
                RequestLength::Chunked => Remaining::Chunked(Box::default()),
            };
            if length != RequestLength::Empty
                && version == Version::HTTP_11
                && expects_continue(&fields)
            {
                w.owe_continue = Some(0);
            }
            let has_body = !matches!(w.body, Remaining::None);
            if !has_body {
                // Nothing more to read until the answer is out: the read buffer (unless a
                // next request is already in it) is not held while the upstream answers.
                w.release();
            }
            drop(w);
            if has_body {
                Inbound::H1(WireBody::new(self.wire.share()))
            } else {
                Inbound::Empty
            }
        };
        let mut req = ClientRequest {
            method,
            uri,
            version,
            fields,
            body,
        };

        // In a block of its own, the request's pending state is dropped where it is once
        // answered (dropped by a call, its 144 bytes would be copied out first).
        let (resp, mut access, id) = {
            let trace = proxy::Trace {
                id_as_line: true,
                ..proxy::Trace::default()
            };
            let start = timing::now();
            let mut pending = Pending::begin(&self.ctx, &req, self.info.peer.ip(), trace, start);
            let resp = proxy::handle(
                &pending.rt,
                &mut req,
                len,
                &self.info,
                pending.ctx,
                pending.start,
                &mut pending.trace,
            )
            .await;
            let access = pending.finish(resp.status().as_u16());
            // The ID, if the head is to carry it as a line (the access entry has its copy).
            let id = if pending.trace.id_as_line {
                pending.trace.request_id.take()
            } else {
                None
            };
            // Answered: nothing left for it to count or log.
            (resp, access, id)
        };
        let (next, bytes) = self.respond(resp, &facts, id.as_ref()).await;
        if let Some((entry, ctx)) = access.as_mut() {
            entry.bytes = bytes;
            ctx.access_log.send(entry, &ctx.metrics);
        }
        match next {
            Next::KeepAlive => self.finish_body().await,
            other => other,
        }
    }

    /// Writes the response; returns what follows and the body bytes sent.
    async fn respond(
        &mut self,
        resp: Response<Body>,
        req: &Facts,
        request_id: Option<&HeaderValue>,
    ) -> (Next, u64) {
        let (parts, mut body) = resp.into_parts();
        // The upstream's field lines, when the head is written from them.
        let lines = match &mut body {
            Body::Upstream(b) => b.take_fields(),
            _ => None,
        };
        let status = parts.status;
        // A `100 Continue` owed and not begun is not sent now: the client may then never
        // send its body, so the connection closes unless the body has ended. One begun is
        // finished before the answer.
        let (continue_rest, skipped) = {
            let mut w = self.wire.get();
            match w.owe_continue.take() {
                Some(0) => (0, true),
                Some(done) => (CONTINUE.len() - done, false),
                None => (0, false),
            }
        };
        let continue_rest = &CONTINUE[CONTINUE.len() - continue_rest..];
        if let Body::Upgrade(tunnel) = body {
            let mut out = BytesMut::new();
            write_head(
                &mut out,
                status,
                None,
                &parts.headers,
                request_id,
                Framing::NoBody,
                Persist::Upgrade,
            );
            let head = out.freeze();
            if self
                .write_all(&mut [IoSlice::new(continue_rest), IoSlice::new(&head)])
                .await
                .is_err()
                || self.flush().await.is_err()
            {
                return (Next::Done, 0);
            }
            self.tunnel(*tunnel).await;
            return (Next::Done, 0);
        }
        let no_body = req.head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        // The map is empty when the head is written from the upstream's lines: nothing in it
        // to look up.
        let map = !parts.headers.is_empty();
        let framing = if no_body {
            Framing::NoBody
        } else if lines.as_ref().is_some_and(RawFields::has_length)
            || (map && parts.headers.contains_key(header::CONTENT_LENGTH))
        {
            Framing::Declared
        } else if let Some(n) = body.size_hint().exact() {
            Framing::Length(n)
        } else if req.version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            Framing::Close
        };
        let unread = skipped && !matches!(self.wire.get().body, Remaining::None);
        let keep = !req.close
            && !unread
            && framing != Framing::Close
            && (!map || !crate::headers::has_connection_token(&parts.headers, "close"))
            && !self.ctx.is_stopping();
        let persist = match (keep, req.version) {
            (false, _) => Persist::Close,
            (true, Version::HTTP_10) => Persist::KeepAlive,
            (true, _) => Persist::Default,
        };
        // The head (after the rest of a `100 Continue` begun) goes in a spare read buffer,
        // given back once the response is out.
        let mut out = take_buffer();
        out.extend_from_slice(continue_rest);
        write_head(
            &mut out,
            status,
            lines.as_ref(),
            &parts.headers,
            request_id,
            framing,
            persist,
        );
        drop(lines);
        crate::headers::give_back_map(parts.headers);
        let head = out.split().freeze();
        let r = if no_body {
            drop(body);
            let mut r = self.write_all(&mut [IoSlice::new(&head)]).await;
            if r.is_ok() {
                r = self.flush().await;
            }
            r.map(|()| 0).map_err(|_| 0)
        } else {
            self.stream_body(body, head, framing == Framing::Chunked)
                .await
        };
        give_back(out);
        match r {
            Ok(bytes) if keep => (Next::KeepAlive, bytes),
            Ok(bytes) if req.close => (Next::Closing, bytes),
            Ok(bytes) => (Next::Close, bytes),
            Err(bytes) => (Next::Done, bytes),
        }
    }

    /// Streams `body` after `head`, in chunks when `chunked`. What is ready is gathered and
    /// written at once: the head with the first data, and every piece the upstream has
    /// ready, until it has to be waited for (or [`QUEUE_MAX`] bytes are held). `Err` with
    /// the bytes sent when the body broke off or the client stopped taking it.
    async fn stream_body(
        &mut self,
        mut body: Body,
        head: Bytes,
        chunked: bool,
    ) -> Result<u64, u64> {
        let mut q = Queue::default();
        q.push(head);
        let mut sent = 0u64;
        let mut size = [0u8; 18];
        loop {
            let next = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    // Nothing more ready: what is held goes out while the upstream sends
                    // more.
                    self.send(&mut q).await.map_err(|_| sent)?;
                    self.flush().await.map_err(|_| sent)?;
                    poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            };
            match next {
                Some(Ok(frame)) => {
                    // Trailers are not relayed to HTTP/1.1 clients.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let end = body.is_end_stream();
                    sent += data.len() as u64;
                    if chunked {
                        q.framing(chunk_size_line(&mut size, data.len()));
                        q.push(data);
                        q.framing(if end { b"\r\n0\r\n\r\n" } else { b"\r\n" });
                    } else {
                        q.push(data);
                    }
                    if end {
                        break;
                    }
                    if q.is_full() {
                        self.send(&mut q).await.map_err(|_| sent)?;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %self.info.peer, error = %e, "response body broke off");
                    // What came before the break still goes out; the connection closes.
                    let _ = self.send(&mut q).await;
                    let _ = self.flush().await;
                    return Err(sent);
                }
                None => {
                    if chunked {
                        q.framing(b"0\r\n\r\n");
                    }
                    break;
                }
            }
        }
        self.send(&mut q).await.map_err(|_| sent)?;
        self.flush().await.map_err(|_| sent)?;
        Ok(sent)
    }

    /// Writes everything `q` holds.
    async fn send(&mut self, q: &mut Queue) -> Result<(), WriteFailed> {
        if q.n == 0 {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); QUEUE_PARTS];
        for (slice, part) in slices.iter_mut().zip(&q.parts[..q.n]) {
            *slice = IoSlice::new(part);
        }
        let r = self.write_all(&mut slices[..q.n]).await;
        q.clear();
        r
    }

    /// After the response: a request body left unread (an early answer) is read and
    /// discarded so that the connection can go on; a broken one closes it.
    async fn finish_body(&mut self) -> Next {
        match self.wire.get().body {
            Remaining::None => return Next::KeepAlive,
            Remaining::Broken => return Next::Done,
            Remaining::Known(_) | Remaining::Chunked(_) => {}
        }
        let mut last = Instant::now();
        let deadline = last + DRAIN_TIME;
        let pause = self.limits.body_pause;
        let (wire, timer) = (&mut self.wire, &mut self.timer);
        poll_fn(|cx| {
            loop {
                let r = wire.get().poll_body(cx);
                match r {
                    Poll::Ready(None) => return Poll::Ready(Next::KeepAlive),
                    Poll::Ready(Some(Ok(_))) => last = Instant::now(),
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(Next::Done),
                    Poll::Pending => break,
                }
            }
            if timer.poll_until(cx, deadline.min(last + pause)).is_ready() {
                return Poll::Ready(Next::Done);
            }
            Poll::Pending
        })
        .await
    }

    /// Runs the tunnel after a `101`: the client's side is this connection, with whatever
    /// it sent after the upgrade request.
    async fn tunnel(&mut self, t: crate::tunnel::Tunnel) {
        crate::tunnel::run(WireIo(self.wire.share()), t).await;
    }

    /// Whether a plain TCP connection whose client asked for the close can be closed at
    /// once, without lingering: the request was read to its end, nothing more is buffered,
    /// and one non-blocking read finds nothing new (Nginx decides the same way). With an
    /// empty receive queue the close sends a FIN, not a reset, and the answer, written in
    /// full already, reaches the client. TLS connections always close gently
    /// (`close_notify` first).
    fn can_close_at_once(&mut self) -> bool {
        let w = self.wire.get();
        let tokio_util::either::Either::Left(tcp) = &w.io else {
            return false;
        };
        if !w.buf.is_empty() || !matches!(w.body, Remaining::None) {
            return false;
        }
        // A byte read here is discarded with the rest by the gentle close.
        !matches!(tcp.try_read(&mut [0u8; 1]), Ok(n) if n > 0)
    }

    /// Closes the connection gently: our side first, then what the client still sends is
    /// read and discarded for a while, so that it reads its answer instead of a reset.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER_TIME;
        let (wire, timer) = (&mut self.wire, &mut self.timer);
        let mut shut = false;
        poll_fn(|cx| {
            let mut w = wire.get();
            if !shut {
                match Pin::new(&mut w.io).poll_shutdown(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => shut = true,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                }
            }
            if shut {
                loop {
                    w.buf.clear();
                    match w.poll_fill(cx) {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Pending => break,
                    }
                }
            }
            drop(w);
            timer.poll_until(cx, deadline)
        })
        .await;
    }

    /// Writes all of `bufs`; a write the client's socket leaves waiting longer than
    /// `send_timeout` fails (CONTRACT §7).
    async fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), WriteFailed> {
        let (wire, timer, send) = (&mut self.wire, &mut self.timer, self.limits.send);
        let mut blocked: Option<Instant> = None;
        poll_fn(|cx| {
            loop {
                while bufs.first().is_some_and(|b| b.is_empty()) {
                    bufs = &mut std::mem::take(&mut bufs)[1..];
                }
                if bufs.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let r = {
                    let mut w = wire.get();
                    w.before_write();
                    Pin::new(&mut w.io).poll_write_vectored(cx, bufs)
                };
                match r {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(WriteFailed)),
                    Poll::Ready(Ok(n)) => {
                        blocked = None;
                        IoSlice::advance_slices(&mut bufs, n);
                    }
                    Poll::Pending => {
                        let since = *blocked.get_or_insert_with(Instant::now);
                        if timer.poll_until(cx, since + send).is_ready() {
                            return Poll::Ready(Err(WriteFailed));
                        }
                        return Poll::Pending;
                    }
                }
            }
        })
        .await
    }

    /// Pushes out what the socket holds back (TLS records), under `send_timeout`.
    async fn flush(&mut self) -> Result<(), WriteFailed> {
        let (wire, timer, send) = (&mut self.wire, &mut self.timer, self.limits.send);
        // The clock is read only if the socket holds the flush back.
        let mut since: Option<Instant> = None;
        poll_fn(|cx| {
            let r = Pin::new(&mut wire.get().io).poll_flush(cx);
            match r {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => Poll::Ready(Err(WriteFailed)),
                Poll::Pending => {
                    let since = *since.get_or_insert_with(Instant::now);
                    if timer.poll_until(cx, since + send).is_ready() {
                        return Poll::Ready(Err(WriteFailed));
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// The most response bytes held before they are written.
const QUEUE_MAX: usize = 64 * 1024;

/// The most pieces a queue holds (a data frame adds up to three).
const QUEUE_PARTS: usize = 8;

/// Response pieces ready to be written together, held inline (no allocation per
/// response).
#[derive(Default)]
struct Queue {
    parts: [Bytes; QUEUE_PARTS],
    n: usize,
    len: usize,
    /// Chunk framing, split off as it is queued.
    frame: BytesMut,
}

impl Queue {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts[self.n] = b;
            self.n += 1;
        }
    }

    fn framing(&mut self, bytes: &[u8]) {
        if self.frame.capacity() - self.frame.len() < bytes.len() {
            self.frame.reserve(256);
        }
        self.frame.extend_from_slice(bytes);
        let b = self.frame.split().freeze();
        self.push(b);
    }

    /// Whether it must be written before another data frame is queued (bytes, or no room
    /// for the frame's pieces).
    fn is_full(&self) -> bool {
        self.len >= QUEUE_MAX || self.n + 3 > QUEUE_PARTS
    }

    fn clear(&mut self) {
        for p in &mut self.parts[..self.n] {
            *p = Bytes::new();
        }
        self.n = 0;
        self.len = 0;
    }
}

/// What follows an exchange.
enum Next {
    /// The next request.
    KeepAlive,
    /// Close, gently ([`Conn::linger`]).
    Close,
    /// Close because the client asked to: at once if it has nothing more to send
    /// ([`Conn::can_close_at_once`]), else gently.
    Closing,
    /// Close at once (the client is gone, or the framing is lost).
    Done,
}

/// Whether the request carries `Expect: 100-continue` (RFC 9110 §10.1.1).
fn expects_continue(fields: &RawFields) -> bool {
    fields
        .get(b"expect")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
}
