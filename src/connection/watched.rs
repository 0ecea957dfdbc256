//! The client connection's IO as hyper sees it ([`WatchedIo`]): it tells the watchdog when
//! bytes arrive and when a write waits, and puts fairway's own answer in place of the bare one
//! hyper writes for a request head it cannot parse.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{self, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::watchdog::ConnState;
use crate::context::Context;

/// The client's IO, noting when a request head starts.
pub(super) struct WatchedIo<S> {
    pub(super) inner: S,
    pub(super) state: Arc<ConnState>,
    pub(super) ctx: Arc<Context>,
    /// fairway's answer in place of hyper's own (see [`own_answer`]), and how much of it is
    /// written.
    pub(super) answer: Option<(Vec<u8>, usize)>,
}

/// hyper answers a request head it cannot parse by itself, with an empty body, before any
/// request reaches the proxy. Such an answer is the only thing written while no request is in
/// flight on an HTTP/1.1 connection; it is replaced with the same status and fairway's short
/// text body (CONTRACT §3), and counted like a request no route matched.
fn own_answer(hyper_head: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head = hyper_head.strip_prefix(b"HTTP/1.1 ")?;
    let code: u16 = std::str::from_utf8(head.get(..3)?).ok()?.parse().ok()?;
    let text = match code {
        400 => crate::error::ProxyError::BadRequest("malformed request").text(),
        431 => crate::error::ProxyError::HeadTooLarge.text(),
        414 => "414 uri too long\n",
        _ => return None,
    };
    let line_end = hyper_head.windows(2).position(|w| w == b"\r\n")?;
    let mut out = Vec::with_capacity(160 + text.len());
    out.extend_from_slice(&hyper_head[..line_end + 2]);
    // hyper's other header lines (date), without its length and connection.
    let rest = &hyper_head[line_end + 2..];
    for line in rest.split(|&b| b == b'\n') {
        let lower = line.to_ascii_lowercase();
        if line.len() > 1
            && !lower.starts_with(b"content-length:")
            && !lower.starts_with(b"connection:")
        {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", text.len()).as_bytes());
    out.extend_from_slice(text.as_bytes());
    Some((code, out))
}

impl<S: AsyncWrite + Unpin> WatchedIo<S> {
    /// Writes what is left of fairway's own answer.
    fn poll_answer(&mut self, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = self.answer.as_mut() {
            if *done == bytes.len() {
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether `data` (a whole write) is hyper's own answer: written while no request is in
    /// flight, and a bare head with `content-length: 0` and `connection: close`. If so, it is
    /// replaced and counted, and the write is reported done.
    fn replaced(&mut self, data: &[u8]) -> bool {
        if self.answer.is_some()
            || self.state.in_flight.load(Ordering::Relaxed) > 0
            || self.state.is_h2.load(Ordering::Relaxed)
            || !data.starts_with(b"HTTP/1.1 4")
            || !data.ends_with(b"\r\n\r\n")
        {
            return false;
        }
        let lower = data.to_ascii_lowercase();
        let has = |line: &[u8]| lower.windows(line.len()).any(|w| w == line);
        if !has(b"\r\ncontent-length: 0\r\n") || !has(b"\r\nconnection: close\r\n") {
            return false;
        }
        let Some((code, bytes)) = own_answer(data) else {
            return false;
        };
        self.ctx.runtime.load().no_route.inc(code);
        self.answer = Some((bytes, 0));
        true
    }
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
            this.state.on_read(&buf.filled()[before..]);
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
        std::task::ready!(this.poll_answer(cx))?;
        if this.replaced(data) {
            let _ = this.poll_answer(cx)?;
            return Poll::Ready(Ok(data.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.state.on_write(r.is_pending());
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        // A flush that is done says nothing of progress (a TCP socket has nothing to
        // flush); one that waits is a blocked write (TLS records not taken).
        if r.is_pending() {
            this.state.on_write(true);
        }
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        let whole = match (parts.next(), parts.next()) {
            (Some(only), None) => &only[..],
            _ => &[][..],
        };
        if this.replaced(whole) {
            let _ = this.poll_answer(cx)?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.state.on_write(r.is_pending());
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_answers_get_the_proxy_text_and_keep_their_date() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                      date: Sun, 29 Nov 2026 05:29:01 GMT\r\n\r\n";
        let (code, out) = own_answer(hyper).unwrap();
        assert_eq!(code, 400);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 400 Bad Request\r\ndate: Sun, 29 Nov 2026 05:29:01 GMT\r\n\
             content-type: text/plain; charset=utf-8\r\nconnection: close\r\n\
             content-length: 16\r\n\r\n400 bad request\n"
        );
        let (code, out) = own_answer(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(code, 431);
        assert!(out.ends_with(b"\r\n\r\n431 request header fields too large\n"));
        assert!(own_answer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(own_answer(b"HTTP/1.0 400 Bad Request\r\n\r\n").is_none());
    }
}
