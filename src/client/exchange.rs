//! One request on a connection, up to its response head: the head written, the body
//! streamed (framed by its length or chunked), and at the same time the response read, so
//! that an early answer stops the upload at once (HTTP1-RULES "early responses"). The
//! whole exchange is a plain future polled by the request's task: no task, no channel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::Method;
use http_body::Body as _;
use tokio::io::AsyncWrite;
use tokio::time::Instant;

use super::{Conn, ResponseBody};
use crate::h1::{self, BodyLength, HeadError, ResponseHead};
use crate::upload::{BodyProgress, BoxError, RequestBody};

/// A request as it goes out: its serialized head and its body.
pub struct Outgoing<'a> {
    /// The method (a response to HEAD has no body).
    pub method: &'a Method,
    /// The request head, written as it is.
    pub head: &'a [u8],
    /// The body; left untouched when the exchange fails before writing the head.
    pub body: &'a mut RequestBody,
    /// Whether the body goes out in the chunked coding.
    pub chunked: bool,
    /// The client body's progress, told to stop when the answer comes first.
    pub progress: Option<&'a BodyProgress>,
    /// When the response head must have come (kept with the connection's own timer, so
    /// that a keep-alive connection does not touch the timer wheel per request).
    pub deadline: Option<Instant>,
}

/// A response head and how its body is delimited.
pub struct Sent {
    /// The head (1xx other than 101 skipped).
    pub head: ResponseHead,
    /// How its body is delimited.
    pub length: BodyLength,
}

/// A failed exchange, before a response head.
#[derive(Debug)]
pub enum Failed {
    /// The client's body failed (the fault is recorded in its progress).
    Client(BoxError),
    /// The connection failed or closed.
    Io(io::Error),
    /// The response head is unusable.
    Head(HeadError),
    /// No response head by the deadline.
    TimedOut,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Client(e) => write!(f, "client body: {e}"),
            Failed::Io(e) => write!(f, "{e}"),
            Failed::Head(e) => write!(f, "{e}"),
            Failed::TimedOut => f.write_str("no response head in time"),
        }
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failed::Client(e) => Some(&**e),
            Failed::Io(e) => Some(e),
            Failed::Head(e) => Some(e),
            Failed::TimedOut => None,
        }
    }
}

impl Conn {
    /// Sends one request and reads its response head. The body is polled only once the
    /// head is out, so a failure that wrote nothing leaves it untouched.
    pub async fn send(&mut self, req: Outgoing<'_>) -> Result<Sent, Failed> {
        self.request_complete = false;
        self.body_touched = false;
        let mut x = Exchange {
            conn: self,
            body: req.body,
            chunked: req.chunked,
            out: Out::head(req.head),
            body_done: false,
            sent: false,
            write_failed: None,
            parsed_at: 0,
            deadline: req.deadline,
        };
        let head = std::future::poll_fn(|cx| x.poll(cx)).await?;
        let sent = x.sent;
        self.request_complete = sent;
        if !sent && let Some(p) = req.progress {
            // An early response: no further byte of the body goes out.
            p.stop();
        }
        let length = h1::body_length(req.method, &head);
        Ok(Sent { head, length })
    }

    /// This connection as the body of the response just received.
    pub fn into_body(self: Box<Self>, length: BodyLength) -> ResponseBody {
        ResponseBody::new(self, length)
    }
}

struct Exchange<'a> {
    conn: &'a mut Conn,
    body: &'a mut RequestBody,
    chunked: bool,
    out: Out<'a>,
    body_done: bool,
    /// The whole request has been written and flushed.
    sent: bool,
    /// Writing failed; the response may still come (a server that answered and closed).
    write_failed: Option<io::Error>,
    /// The buffer's length when a head was last parsed and found incomplete.
    parsed_at: usize,
    deadline: Option<Instant>,
}

impl Exchange<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, Failed>> {
        if !self.sent && self.write_failed.is_none() {
            match self.poll_send(cx) {
                Poll::Ready(Ok(())) => self.sent = true,
                Poll::Ready(Err(Failed::Io(e))) => self.write_failed = Some(e),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        match self.poll_head(cx) {
            Poll::Ready(Err(Failed::Io(e))) => {
                // The write error says more (a reset while sending) unless the read saw
                // the server close cleanly first.
                Poll::Ready(Err(Failed::Io(self.write_failed.take().unwrap_or(e))))
            }
            Poll::Pending => match self.deadline {
                Some(at) if self.conn.timer.poll_until(cx, at).is_ready() => {
                    Poll::Ready(Err(Failed::TimedOut))
                }
                _ => Poll::Pending,
            },
            other => other,
        }
    }

    /// Writes the head, then the body frame by frame, then flushes.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        loop {
            if !self.out.is_empty() {
                ready!(self.out.poll_write(&mut self.conn.io, cx)).map_err(Failed::Io)?;
                continue;
            }
            if self.body_done {
                ready!(Pin::new(&mut self.conn.io).poll_flush(cx)).map_err(Failed::Io)?;
                return Poll::Ready(Ok(()));
            }
            self.conn.body_touched = true;
            match ready!(Pin::new(&mut *self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a client's chunked body are not forwarded.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        self.out.line = h1::chunked::size_line(data.len());
                        self.out.tail = b"\r\n";
                    }
                    self.out.data = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(Failed::Client(e))),
                None => {
                    self.body_done = true;
                    if self.chunked {
                        self.out.tail = b"0\r\n\r\n";
                    }
                }
            }
        }
    }

    /// Reads until a final response head (1xx other than 101 are skipped) is complete.
    /// A head that trickles in is parsed again only when it may have ended, or has doubled
    /// since the last try (which still finds garbage at once): linear work however small
    /// the reads, where parsing after every read would be quadratic.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, Failed>> {
        let conn = &mut *self.conn;
        loop {
            let buf = &mut conn.buf;
            let worth = !buf.is_empty()
                && (buf.len() >= 2 * self.parsed_at
                    || h1::has_empty_line(buf, self.parsed_at.saturating_sub(2)));
            if worth {
                match h1::parse_response(buf) {
                    Ok(Some((head, _))) => {
                        self.parsed_at = 0;
                        if head.status.is_informational() && head.status.as_u16() != 101 {
                            continue;
                        }
                        return Poll::Ready(Ok(head));
                    }
                    Ok(None) => self.parsed_at = buf.len(),
                    Err(e) => return Poll::Ready(Err(Failed::Head(e))),
                }
            }
            let n = ready!(conn.poll_fill(cx)).map_err(Failed::Io)?;
            if n == 0 {
                return Poll::Ready(Err(Failed::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete response head",
                ))));
            }
        }
    }
}

/// Bytes queued for the socket, written with one vectored write where the socket allows:
/// a head or a chunk line, payload, and a closing CRLF.
struct Out<'a> {
    head: &'a [u8],
    line: ([u8; 18], usize),
    line_at: usize,
    data: Bytes,
    tail: &'static [u8],
}

impl<'a> Out<'a> {
    fn head(head: &'a [u8]) -> Out<'a> {
        Out {
            head,
            line: ([0; 18], 0),
            line_at: 0,
            data: Bytes::new(),
            tail: b"",
        }
    }

    fn is_empty(&self) -> bool {
        self.head.is_empty()
            && self.line_at == self.line.1
            && self.data.is_empty()
            && self.tail.is_empty()
    }

    /// Writes until everything queued is out.
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let line = &self.line.0[self.line_at..self.line.1];
            let parts = [
                io::IoSlice::new(self.head),
                io::IoSlice::new(line),
                io::IoSlice::new(&self.data),
                io::IoSlice::new(self.tail),
            ];
            let mut n = ready!(Pin::new(&mut *w).poll_write_vectored(cx, &parts))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let h = n.min(self.head.len());
            self.head = &self.head[h..];
            n -= h;
            let l = n.min(self.line.1 - self.line_at);
            self.line_at += l;
            n -= l;
            let d = n.min(self.data.len());
            self.data.advance(d);
            n -= d;
            self.tail = &self.tail[n.min(self.tail.len())..];
        }
        self.line = ([0; 18], 0);
        self.line_at = 0;
        Poll::Ready(Ok(()))
    }
}
