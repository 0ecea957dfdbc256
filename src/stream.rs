//! What client and upstream connections share in how they read: a read size that grows
//! while reads fill it ([`ReadSize`]), and a byte stream with bytes already read from it
//! put back in front ([`Rewind`]: what a connection read before it knew it would become
//! something else, an upstream's bytes right after its `101`, a client's HTTP/2 preface).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much a connection's next read asks for: [`ReadSize::MIN`] at first, doubled each
/// time a read fills all it asked for, up to [`ReadSize::MAX`] (a large body's reads grow
/// to few large ones; a small exchange's stay small).
#[derive(Debug, Clone, Copy)]
pub struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(ReadSize::MIN)
    }
}

impl ReadSize {
    /// The first read asks for this much.
    pub const MIN: usize = 8 * 1024;

    /// The most one read asks for.
    pub const MAX: usize = 512 * 1024;

    /// Whether reads have grown past the first size.
    pub fn is_grown(self) -> bool {
        self.0 > ReadSize::MIN
    }

    /// Reads from `io` into `buf`; `Ok(0)` at end of stream.
    pub fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < self.0 / 2 {
            buf.reserve(self.0);
        }
        let room = buf.capacity() - buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, buf))?;
        if n == room && self.0 < ReadSize::MAX {
            self.0 *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

/// `io`, with `read` read first.
pub struct Rewind<S> {
    read: Bytes,
    io: S,
}

impl<S> Rewind<S> {
    /// `io` whose first bytes are `read`.
    pub fn new(read: Bytes, io: S) -> Rewind<S> {
        Rewind { read, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
