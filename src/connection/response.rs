//! A request as the client connection answers it: [`Pending`] until the answer is ready
//! (counted and logged as 499 when it is dropped first), then, on HTTP/2, [`ConnBody`]: the
//! response body with the request's place on the connection, its access log line, and its
//! stream's watch.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{self, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tokio::time::Instant;

use super::watchdog::{NONE, RequestGuard, SendTimeout, StreamWatch};
use crate::access::Entry;
use crate::body::{Body, BoxError};
use crate::config::AccessFormat;
use crate::context::Context;
use crate::proxy;

/// A request being answered. If hyper drops it before the answer is ready (the client
/// closed its connection, or reset its HTTP/2 stream), it is counted and logged as the
/// client's: status 499, as Nginx logs a client that went away.
pub(super) struct Pending<'c> {
    pub(super) entry: Option<Box<Entry>>,
    pub(super) trace: proxy::Trace,
    pub(super) start: Instant,
    pub(super) rt: Arc<crate::runtime::Runtime>,
    /// Borrowed from the connection: no shared count to touch per request.
    pub(super) ctx: &'c Arc<Context>,
}

impl<'c> Pending<'c> {
    /// The state of `req`, from `peer`, arrived at `start`: its access log entry begun when
    /// the log is on.
    pub(super) fn begin(
        ctx: &'c Arc<Context>,
        req: &proxy::ClientRequest,
        peer: IpAddr,
        trace: proxy::Trace,
        start: Instant,
    ) -> Pending<'c> {
        let rt = ctx.runtime.load_full();
        let format = rt.settings.access_log;
        let entry = (format != AccessFormat::Off).then(|| {
            Box::new(Entry::begin(
                format,
                &req.method,
                &req.uri,
                req.version,
                peer,
            ))
        });
        Pending {
            entry,
            trace,
            start,
            rt,
            ctx,
        }
    }

    /// The answer is ready with `status` (already counted by `proxy::handle`): the access
    /// log entry, completed, to go with the response body.
    pub(super) fn finish(&mut self, status: u16) -> Option<(Box<Entry>, Arc<Context>)> {
        let mut e = self.entry.take()?;
        self.fill(&mut e, status);
        Some((e, Arc::clone(self.ctx)))
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
        e.request_id = self.trace.request_id.clone();
    }
}

impl Drop for Pending<'_> {
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
    pub(super) inner: Sent,
    pub(super) access: Option<(Box<Entry>, Arc<Context>)>,
    pub(super) guard: RequestGuard,
}

/// A response body as the HTTP/2 connection holds it. `Own` is as large as `Body`'s upstream
/// variant though only short answers reach it; boxing it would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
pub(super) enum Sent {
    /// Held here: the proxy's own short answers.
    Own(Body),
    /// An upstream's body, shared with the connection's watchdog, which cuts this stream
    /// alone off when the client leaves it unread.
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
