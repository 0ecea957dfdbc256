//! The client's request body on its way upstream ([`RequestBody`]): counted against
//! `max_body_bytes`, paused at most `body_read_timeout` between reads, its chunk framing
//! bounded, tiny chunks gathered, its progress recorded for `request_timeout` and early
//! responses, and its faults recorded as the client's (SECURITY.md "whose fault").

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::ClientFault;
use crate::wire::WireBody;

/// Boxed error of the body types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body failed, and how: the error [`RequestBody`] gives the upstream
/// connection. The same fault is recorded in the body's [`BodyProgress`], so that whatever
/// error the upstream connection then reports is attributed to the client.
#[derive(Debug, thiserror::Error)]
#[error("client request body failed: {0:?}")]
pub struct ClientBodyError(pub ClientFault);

/// A client's request body as its connection delivers it.
pub enum Inbound {
    /// No body.
    Empty,
    /// An HTTP/2 stream's body, read through hyper.
    H2(Incoming),
    /// An HTTP/1.1 body, read from the connection's buffer.
    H1(WireBody),
}

impl Inbound {
    /// Whether nothing (more) is to come.
    pub fn is_end(&self) -> bool {
        match self {
            Inbound::Empty => true,
            Inbound::H2(b) => b.is_end_stream(),
            Inbound::H1(b) => b.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::Empty => SizeHint::with_exact(0),
            Inbound::H2(b) => b.size_hint(),
            Inbound::H1(b) => match b.length() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }

    /// The next frame, and a failure as the client's fault.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientFault>>> {
        match self {
            Inbound::Empty => Poll::Ready(None),
            Inbound::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| client_fault(&e)))),
            Inbound::H1(b) => b.poll_data(cx).map(|d| d.map(|r| r.map(Frame::data))),
        }
    }
}

/// A body sent upstream.
pub enum RequestBody {
    /// No body (health checks, GETs).
    Empty,
    /// The client's body, streamed.
    Client(Box<ClientBody>),
}

/// How far a client's body has got on its way upstream: when it last moved, whether it is
/// waiting on the client, when it ended (the start of `request_timeout`, CONTRACT §2), and
/// whether it failed or was told to stop.
#[derive(Debug)]
pub struct BodyProgress {
    start: Instant,
    last_ms: AtomicU64,
    ended: OnceLock<Instant>,
    /// The last poll found nothing from the client (as opposed to the upstream not taking
    /// what was read): a stall then is the client's, not the upstream's.
    waiting: AtomicBool,
    /// Set when the upstream's response head arrived first: no further byte of the body is
    /// sent, and the connection is not reused (an early response, HTTP1-RULES).
    stopped: AtomicBool,
    fault: OnceLock<ClientFault>,
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
            waiting: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            fault: OnceLock::new(),
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

    /// Whether the body is waiting for the client to send more.
    pub fn is_waiting_on_client(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Sends no further byte of the body upstream; the body never ends from then on, so
    /// the connection carrying it is never complete, and is dropped after its response.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// What the client did wrong, if its body failed.
    pub fn fault(&self) -> Option<ClientFault> {
        self.fault.get().copied()
    }

    fn fail(&self, fault: ClientFault) -> BoxError {
        let _ = self.fault.set(fault);
        Box::new(ClientBodyError(fault))
    }
}

/// What a failed read of an HTTP/2 client's body says about the client: a closed or reset
/// connection or stream is the client going away, anything else is a malformed body (h2
/// reports protocol and flow-control violations; an I/O error that says the data was
/// invalid counts as malformed too). HTTP/1.1 bodies report their faults themselves
/// (`wire::Wire::poll_body`).
pub fn client_fault(e: &hyper::Error) -> ClientFault {
    const MALFORMED: ClientFault = ClientFault::Malformed("malformed chunked body");
    if e.is_incomplete_message() || e.is_canceled() {
        return ClientFault::Gone;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => MALFORMED,
                _ => ClientFault::Gone,
            };
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            if h2.is_io() || h2.is_go_away() {
                return ClientFault::Gone;
            }
            return match h2.reason() {
                Some(
                    h2::Reason::NO_ERROR
                    | h2::Reason::CANCEL
                    | h2::Reason::REFUSED_STREAM
                    | h2::Reason::STREAM_CLOSED,
                )
                | None => ClientFault::Gone,
                Some(_) => ClientFault::Malformed("HTTP/2 protocol error on the request stream"),
            };
        }
        source = s.source();
    }
    ClientFault::Gone
}

/// The client's request body on its way upstream: counts bytes against `max_body_bytes`,
/// enforces `body_read_timeout` between reads, bounds the framing overhead of a chunked
/// body, and records its progress and its fault.
pub struct ClientBody {
    /// Taken by [`Drop`] to drain what an HTTP/2 client still sends after an early
    /// response (an HTTP/1.1 connection drains its own).
    inner: Option<Inbound>,
    seen: u64,
    limit: u64,
    idle: IdleTimer,
    progress: Arc<BodyProgress>,
    framing: Option<WireCount>,
    held: Held,
}

/// The bytes read from the client's connection since a chunked body began, to bound the
/// body's framing overhead.
pub struct WireCount {
    read: Arc<AtomicU64>,
    start: u64,
}

impl WireCount {
    /// Watches the connection's read counter from now on.
    pub fn new(read: Arc<AtomicU64>) -> WireCount {
        let start = read.load(Ordering::Relaxed);
        WireCount { read, start }
    }

    /// Whether the bytes read so far are out of all proportion to `payload` bytes of body.
    fn is_excessive(&self, payload: u64) -> bool {
        let wire = self.read.load(Ordering::Relaxed).saturating_sub(self.start);
        wire > payload
            .saturating_mul(MAX_FRAMING_RATIO)
            .saturating_add(FRAMING_SLACK)
    }
}

/// The most framing bytes a chunked body may carry per byte of payload: 1-byte chunks
/// (`1\r\nx\r\n`, five framing bytes each) pass; padded chunk sizes and extensions that
/// cost far more than they carry do not (SECURITY.md "cheap bodies").
pub const MAX_FRAMING_RATIO: u64 = 10;

/// Read bytes that are not the body's: the head read with it, and the start of a next
/// request read together with the body's end.
const FRAMING_SLACK: u64 = 256 * 1024;

impl ClientBody {
    /// Wraps a client's body; `progress` follows it; `framing` bounds the overhead of a
    /// chunked HTTP/1.1 body.
    pub fn new(
        inner: Inbound,
        limit: Option<u64>,
        read_timeout: Duration,
        progress: Arc<BodyProgress>,
        framing: Option<WireCount>,
    ) -> ClientBody {
        ClientBody {
            inner: Some(inner),
            seen: 0,
            limit: limit.unwrap_or(u64::MAX),
            idle: IdleTimer::new(read_timeout),
            progress,
            framing,
            held: Held::default(),
        }
    }
}

/// The longest an early-answered request's remaining body is read and discarded.
const DRAIN_TIME: Duration = Duration::from_secs(30);

impl Drop for ClientBody {
    fn drop(&mut self) {
        // An early response stopped this body: what the client still sends is read and
        // discarded (as Nginx discards a body it will not use), so that the client, still
        // busy writing, gets to read the answer instead of a reset, and its connection
        // can serve a next request once the body has ended.
        let progress = &self.progress;
        if !progress.stopped.load(Ordering::Relaxed)
            || progress.ended().is_some()
            || progress.fault().is_some()
        {
            return;
        }
        let (Some(Inbound::H2(inner)), Ok(rt)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if http_body::Body::is_end_stream(&inner) {
            return;
        }
        rt.spawn(drain(inner, self.idle.limit));
    }
}

/// Reads and discards a body until it ends, pauses longer than `pause`, or
/// [`DRAIN_TIME`] has passed; dropping it then closes the client's connection.
async fn drain(mut body: Incoming, pause: Duration) {
    use http_body_util::BodyExt;
    let deadline = Instant::now() + DRAIN_TIME;
    loop {
        let limit = deadline.min(Instant::now() + pause);
        match tokio::time::timeout_at(limit, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            _ => return,
        }
    }
}

/// Data frames smaller than this are gathered before they go upstream: a body sent in tiny
/// chunks then costs one write per [`COALESCE_MAX`] upstream instead of one per chunk.
const COALESCE_MIN: usize = 4 * 1024;

/// The most bytes gathered before they are sent on.
const COALESCE_MAX: usize = 16 * 1024;

/// The longest small data waits to be gathered with more: a slow client that sends a few
/// bytes at a time is forwarded this late at most.
const COALESCE_WAIT: Duration = Duration::from_millis(1);

/// Small frames of a client's body, gathered before they go upstream.
#[derive(Default)]
struct Held {
    data: BytesMut,
    /// The trailers that ended the body while data was held; sent after it.
    trailers: Option<Frame<Bytes>>,
    /// Set while data is held: when it goes out whatever comes next.
    due: Option<Pin<Box<Sleep>>>,
}

impl Held {
    fn take(&mut self) -> Frame<Bytes> {
        Frame::data(self.data.split().freeze())
    }

    /// Whether held data must go out now (registers the wake-up otherwise).
    fn is_due(&mut self, cx: &mut Context<'_>) -> bool {
        let t = self
            .due
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(COALESCE_WAIT)));
        t.as_mut().poll(cx).is_ready()
    }

    fn start(&mut self) {
        if let Some(t) = self.due.as_mut() {
            t.as_mut().reset(Instant::now() + COALESCE_WAIT);
        }
    }
}

impl ClientBody {
    /// The next frame to send upstream: the client's frames as they come, small data
    /// frames gathered (see [`COALESCE_MIN`]).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(t) = self.held.trailers.take() {
            return Poll::Ready(Some(Ok(t)));
        }
        let progress = &*self.progress;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Pending;
        };
        loop {
            match inner.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    progress.waiting.store(false, Ordering::Relaxed);
                    self.idle.moved();
                    let end = inner.is_end();
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            self.seen += data.len() as u64;
                            if self.seen > self.limit {
                                return Poll::Ready(Some(
                                    Err(progress.fail(ClientFault::TooLarge)),
                                ));
                            }
                            if self
                                .framing
                                .as_ref()
                                .is_some_and(|f| f.is_excessive(self.seen))
                            {
                                let fault = ClientFault::Malformed(
                                    "chunk framing far larger than its payload",
                                );
                                return Poll::Ready(Some(Err(progress.fail(fault))));
                            }
                            progress.touch();
                            let held = &mut self.held;
                            if held.data.is_empty() && (data.len() >= COALESCE_MIN || end) {
                                Frame::data(data)
                            } else {
                                if held.data.is_empty() {
                                    held.start();
                                }
                                held.data.extend_from_slice(&data);
                                if held.data.len() < COALESCE_MAX && !end {
                                    continue;
                                }
                                held.take()
                            }
                        }
                        Err(trailers) => {
                            if self.held.data.is_empty() {
                                trailers
                            } else {
                                self.held.trailers = Some(trailers);
                                self.held.take()
                            }
                        }
                    };
                    if end {
                        progress.end();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(fault))) => {
                    return Poll::Ready(Some(Err(progress.fail(fault))));
                }
                Poll::Ready(None) => {
                    progress.end();
                    if !self.held.data.is_empty() {
                        return Poll::Ready(Some(Ok(self.held.take())));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if !self.held.data.is_empty() && self.held.is_due(cx) {
                        return Poll::Ready(Some(Ok(self.held.take())));
                    }
                    progress.waiting.store(true, Ordering::Relaxed);
                    if self.idle.poll_expired(cx) {
                        return Poll::Ready(Some(Err(progress.fail(ClientFault::Stalled))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            // The upstream answered early: nothing more goes to it, and the body is never
            // woken again; the connection is dropped once its response has been relayed.
            RequestBody::Client(b) if b.progress.stopped.load(Ordering::Relaxed) => Poll::Pending,
            RequestBody::Client(b) => b.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Client(b) => {
                b.held.data.is_empty()
                    && b.held.trailers.is_none()
                    && b.inner.as_ref().is_none_or(Inbound::is_end)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Client(b) => {
                let mut hint = b.inner.as_ref().map(Inbound::size_hint).unwrap_or_default();
                let held = b.held.data.len() as u64;
                hint.set_lower(hint.lower() + held);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
        }
    }
}

/// The client fault behind `err` (an upstream connection's error), if the client's body
/// caused it: recorded in `progress`, or found in the error's source chain.
pub fn fault_behind(
    err: &(dyn std::error::Error + 'static),
    progress: Option<&BodyProgress>,
) -> Option<ClientFault> {
    if let Some(f) = progress.and_then(BodyProgress::fault) {
        return Some(f);
    }
    let mut source = Some(err);
    while let Some(s) = source {
        if let Some(ClientBodyError(f)) = s.downcast_ref::<ClientBodyError>() {
            return Some(*f);
        }
        source = s.source();
    }
    None
}

/// The longest pause between two frames of a body: armed on the first wait (most bodies
/// never wait, and never allocate it), pushed back whenever a frame arrives.
pub(crate) struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    pub(crate) fn new(limit: Duration) -> IdleTimer {
        IdleTimer { limit, sleep: None }
    }

    /// A frame arrived.
    pub(crate) fn moved(&mut self) {
        if let Some(t) = self.sleep.as_mut() {
            t.as_mut().reset(Instant::now() + self.limit);
        }
    }

    /// Whether the body has now waited longer than the limit (registers the wake-up).
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let t = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        t.as_mut().poll(cx).is_ready()
    }
}
