//! What client and upstream connections share in how they read: a read size that grows
//! while reads fill it ([`ReadSize`]), and a byte stream with bytes already read from it
//! put back in front ([`Rewind`]: what a connection read before it knew it would become
//! something else, an upstream's bytes right after its `101`, a client's HTTP/2 preface).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most spare buffers a thread keeps.
const SPARES: usize = 32;

thread_local! {
    /// Buffers of connections that went idle, kept for the next connection on this thread
    /// that has bytes to read: a busy keep-alive connection gives its buffer back whenever it
    /// waits, and takes one again when bytes arrive, without a trip through the allocator.
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of at least [`ReadSize::MIN`] bytes: a spare one of this thread's, or a new one.
pub fn take_buffer() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(ReadSize::MIN))
}

/// Gives a buffer no longer needed back to this thread's spares (or frees it). Only an
/// empty buffer of the usual size is kept; a grown one is freed.
pub fn give_back(mut buf: BytesMut) {
    buf.clear();
    let cap = buf.capacity();
    if !(ReadSize::MIN / 2..=ReadSize::MIN).contains(&cap) {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            s.push(buf);
        }
    });
}

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
