//! The watchdog beside each HTTP/2 client connection (hyper's server): what the connection
//! is doing ([`ConnState`]: requests in flight, a head begun, a write the client does not
//! take) and the limits it enforces as separate deadlines (`header_read_timeout`,
//! `idle_timeout`, `send_timeout`, per stream too). HTTP/1.1 connections keep their limits
//! in their own loop (`h1.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::Body;

/// "No time" in the millisecond fields.
pub(super) const NONE: u64 = u64::MAX;

/// Context between a connection's IO, its requests and its watchdog.
pub(super) struct ConnState {
    pub(super) start: Instant,
    pub(super) in_flight: AtomicUsize,
    pub(super) served: AtomicUsize,
    /// Milliseconds since `start` at which the connection last became idle.
    pub(super) idle_since: AtomicU64,
    /// Milliseconds since `start` at which bytes arrived on an idle connection (a request
    /// head has begun), or `NONE`.
    pub(super) head_since: AtomicU64,
    /// Set while the watchdog sleeps towards the idle deadline: only then does a head
    /// that starts need to wake it (otherwise it looks again within `header_read_timeout`
    /// anyway), so a busy keep-alive connection costs no wake-up per request.
    pub(super) armed: AtomicBool,
    pub(super) wake: Notify,
    /// Milliseconds since `start` since which a write to the client has been waiting for
    /// the socket to take a byte, or `NONE` (CONTRACT §7 `send_timeout`).
    pub(super) write_blocked_since: AtomicU64,
    /// The HTTP/2 responses being sent, each cut off on its own when its stream is left
    /// unread for `send_timeout`.
    pub(super) streams: std::sync::Mutex<Vec<Arc<StreamWatch>>>,
    /// Set while the watchdog looks again within `send_timeout` anyway (a request is in
    /// flight), so that a new stream to watch need not wake it.
    pub(super) watching: AtomicBool,
}

impl ConnState {
    pub(super) fn new() -> ConnState {
        ConnState {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection owes a request head from its first moment (a silent client
            // is a slow-loris too).
            head_since: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            wake: Notify::new(),
            write_blocked_since: AtomicU64::new(NONE),
            streams: std::sync::Mutex::new(Vec::new()),
            watching: AtomicBool::new(false),
        }
    }

    /// A write returned: `blocked` if the socket took nothing.
    pub(super) fn on_write(&self, blocked: bool) {
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
    pub(super) fn send_deadline(&self, send: Duration) -> Result<Option<Instant>, ()> {
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
    pub(super) fn watch_stream(&self, body: Body) -> Arc<StreamWatch> {
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
    pub(super) fn cut_stalled_streams(&self, send: Duration) -> Option<Instant> {
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

    pub(super) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(super) fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Bytes arrived.
    pub(super) fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
        {
            // SeqCst pairs with the watchdog's arming below (a store then a load on each
            // side: either it sees the head, or this sees it armed).
            self.head_since.store(self.now_ms(), Ordering::SeqCst);
            if self.armed.swap(false, Ordering::SeqCst) {
                self.wake.notify_one();
            }
        }
    }

    /// A request has begun.
    pub(super) fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        RequestGuard {
            state: Arc::clone(self),
        }
    }

    /// When the watchdog must look again, and what it will find if nothing changes.
    pub(super) fn next_check(&self, t: &Timeouts) -> (Instant, Verdict) {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // Look again within the shortest limit: by then this request may be done and
            // the connection idle, the next head begun, or a response left unread.
            return (
                Instant::now() + t.header.min(t.idle).min(t.send),
                Verdict::Busy,
            );
        }
        let head = self.head_since.load(Ordering::Relaxed);
        // Once a request has been served, bytes on an idle connection are frames (pings,
        // settings), not the start of a head.
        let served = self.served.load(Ordering::Relaxed) > 0;
        if head != NONE && !served {
            // Also look again within the shorter limit: the head may complete, its request
            // be served and the connection go idle well before this deadline.
            let deadline = (self.at(head) + t.header).min(Instant::now() + t.header.min(t.idle));
            return (deadline, Verdict::HeadTimeout);
        }
        self.armed.store(true, Ordering::SeqCst);
        // A head that began between the loads above and arming is caught here.
        if self.head_since.load(Ordering::SeqCst) != NONE && !served {
            self.armed.store(false, Ordering::Relaxed);
            return (Instant::now(), Verdict::Busy);
        }
        (
            self.at(self.idle_since.load(Ordering::Relaxed)) + t.idle,
            Verdict::Idle,
        )
    }

    /// Whether, looked at again now, the connection has run past the limit `verdict` names.
    pub(super) fn is_expired(&self, t: &Timeouts, verdict: Verdict) -> bool {
        let (deadline, v) = self.next_check(t);
        v == verdict && deadline <= Instant::now()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Busy,
    HeadTimeout,
    Idle,
}

pub(super) struct Timeouts {
    pub(super) header: Duration,
    pub(super) idle: Duration,
    pub(super) send: Duration,
}

/// One HTTP/2 response on its way to the client, as the connection's watchdog sees it.
pub(super) struct StreamWatch {
    /// Milliseconds since the connection's start at which hyper took a frame of the body
    /// without asking for the next one yet (the stream is waiting for the client's
    /// window), or `NONE`.
    pub(super) handed: AtomicU64,
    /// The body; taken by the watchdog to cut the stream off, which drops the upstream
    /// connection and the server's in-flight count with it.
    pub(super) body: std::sync::Mutex<Option<Body>>,
}

/// The client left its HTTP/2 stream unread longer than `send_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client left its response unread longer than send_timeout")]
pub(super) struct SendTimeout;

/// A request in flight on a connection; dropped with the response body.
pub(super) struct RequestGuard {
    pub(super) state: Arc<ConnState>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &self.state;
        if s.in_flight.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        s.idle_since.store(s.now_ms(), Ordering::Relaxed);
        s.head_since.store(NONE, Ordering::Relaxed);
    }
}
