//! Upgraded connections (WebSocket): after the upstream's `101`, bytes are copied both ways
//! until either side closes or no byte moves for `tunnel_idle_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::server::ActiveGuard;

/// Runs one tunnel. `guard` keeps the request counted as active on its server; `sender`
/// keeps the upstream connection's handle alive until the upgrade completes.
pub async fn run(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    guard: ActiveGuard,
    sender: hyper::client::conn::http1::SendRequest<RequestBody>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    drop(sender);
    let activity = Arc::new(Activity::new());
    let mut c = Watched {
        inner: TokioIo::new(client),
        activity: Arc::clone(&activity),
    };
    let mut u = Watched {
        inner: TokioIo::new(upstream),
        activity: Arc::clone(&activity),
    };
    let server = Arc::clone(guard.server());
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
            if let Err(e) = r {
                tracing::debug!(server = %server.addr, error = %e, "tunnel closed with an error");
            }
        }
        _ = activity.idle_for(idle) => {
            tracing::debug!(server = %server.addr, "tunnel closed: tunnel_idle_timeout");
        }
    }
    drop(guard);
}

/// When bytes last moved, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
