//! Body types of the data path, all streaming, none buffered:
//! [`Body`] is what the client listener sends back (an upstream's response or a short proxy
//! answer), [`RequestBody`] is what goes upstream (the client's body under `max_body_bytes`
//! and `body_read_timeout`, or nothing).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::client::PoolReturn;
use crate::server::ActiveGuard;

/// Boxed error of the body types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body sent to a client.
pub enum Body {
    /// Nothing.
    Empty,
    /// One chunk, taken on first poll.
    Full(Option<Bytes>),
    /// An upstream's response body, streamed through.
    Upstream(UpstreamBody),
}

impl Body {
    /// A body of one chunk.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let b = bytes.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Upstream(u) => Pin::new(u).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Upstream(u) => u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(u) => u.inner.size_hint(),
        }
    }
}

/// An upstream response body. When it ends cleanly its connection goes back to the pool;
/// when it is dropped the server's active-request count goes down. A pause longer than
/// `response_body_idle_timeout` between reads cuts it off.
pub struct UpstreamBody {
    inner: Incoming,
    pool: Option<PoolReturn>,
    idle: IdleTimer,
    _active: ActiveGuard,
}

/// The upstream paused longer than `response_body_idle_timeout` in a response body.
#[derive(Debug, thiserror::Error)]
#[error("upstream response body stalled longer than response_body_idle_timeout")]
pub struct ResponseBodyTimeout;

impl UpstreamBody {
    /// Wraps `inner`; `pool` is the connection to return once the body has been read.
    pub fn new(
        inner: Incoming,
        pool: Option<PoolReturn>,
        idle_timeout: Duration,
        active: ActiveGuard,
    ) -> UpstreamBody {
        let mut b = UpstreamBody {
            inner,
            pool,
            idle: IdleTimer::new(idle_timeout),
            _active: active,
        };
        if http_body::Body::is_end_stream(&b.inner) {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        if let Some(p) = self.pool.take() {
            p.checkin();
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.moved();
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection is broken: never pool it.
                this.pool = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.poll_expired(cx) {
                    // The client's response is cut off; the connection is not reused.
                    this.pool = None;
                    return Poll::Ready(Some(Err(Box::new(ResponseBodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The longest pause between two frames of a body: armed on the first wait (most bodies
/// never wait, and never allocate it), pushed back whenever a frame arrives.
struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(limit: Duration) -> IdleTimer {
        IdleTimer { limit, sleep: None }
    }

    /// A frame arrived.
    fn moved(&mut self) {
        if let Some(t) = self.sleep.as_mut() {
            t.as_mut().reset(Instant::now() + self.limit);
        }
    }

    /// Whether the body has now waited longer than the limit (registers the wake-up).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let t = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        t.as_mut().poll(cx).is_ready()
    }
}

/// The request body was larger than `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than max_body_bytes")]
pub struct BodyTooLarge;

/// The client paused longer than `body_read_timeout` while sending the body.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled longer than body_read_timeout")]
pub struct BodyTimeout;

/// A body sent upstream.
pub enum RequestBody {
    /// No body (health checks, GETs).
    Empty,
    /// The client's body, streamed.
    Client(ClientBody),
}

/// How far a client's body has got on its way upstream: when it last moved and when it
/// ended (the start of `request_timeout`, CONTRACT §2).
#[derive(Debug)]
pub struct BodyProgress {
    start: Instant,
    last_ms: AtomicU64,
    ended: OnceLock<Instant>,
}

impl Default for BodyProgress {
    fn default() -> Self {
        BodyProgress::new()
    }
}

impl BodyProgress {
    /// Nothing sent yet; the clock starts now.
    pub fn new() -> BodyProgress {
        BodyProgress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            ended: OnceLock::new(),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn end(&self) {
        let _ = self.ended.set(Instant::now());
    }

    /// When the last byte was read, if it has been.
    pub fn ended(&self) -> Option<Instant> {
        self.ended.get().copied()
    }

    /// When bytes last moved (or the start).
    pub fn last_moved(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The client's request body on its way upstream: counts bytes against `max_body_bytes`,
/// enforces `body_read_timeout` between reads, and records its progress.
pub struct ClientBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
    idle: IdleTimer,
    progress: Arc<BodyProgress>,
}

impl ClientBody {
    /// Wraps a client's body; `progress` follows it.
    pub fn new(
        inner: Incoming,
        limit: Option<u64>,
        read_timeout: Duration,
        progress: Arc<BodyProgress>,
    ) -> ClientBody {
        ClientBody {
            inner,
            seen: 0,
            limit: limit.unwrap_or(u64::MAX),
            idle: IdleTimer::new(read_timeout),
            progress,
        }
    }

    fn mark_ended(&self) {
        self.progress.end();
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let b = match self.get_mut() {
            RequestBody::Empty => return Poll::Ready(None),
            RequestBody::Client(b) => b,
        };
        match Pin::new(&mut b.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    b.seen += data.len() as u64;
                    if b.seen > b.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    b.progress.touch();
                }
                b.idle.moved();
                if b.inner.is_end_stream() {
                    b.mark_ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                b.mark_ended();
                Poll::Ready(None)
            }
            Poll::Pending if b.idle.poll_expired(cx) => {
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Client(b) => b.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Client(b) => b.inner.size_hint(),
        }
    }
}
