//! The HTTP/2 client connection's IO as hyper sees it ([`WatchedIo`]): it tells the
//! watchdog when bytes arrive and when a write waits.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{self, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::watchdog::ConnState;

/// The client's IO, noting reads and blocked writes.
pub(super) struct WatchedIo<S> {
    pub(super) inner: S,
    pub(super) state: Arc<ConnState>,
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
            this.state.on_read();
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
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.state.on_write(r.is_pending());
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        // A flush that is done says nothing of progress (a TCP socket has nothing to
        // flush); one that waits is a blocked write (TLS records not taken).
        if r.is_pending() {
            this.state.on_write(true);
        }
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.state.on_write(r.is_pending());
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
