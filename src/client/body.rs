//! A response body read from its connection ([`ResponseBody`]): payload split off the read
//! buffer without copying, chunked framing decoded and checked, and the connection given
//! back only when the exchange ended cleanly both ways; or, after a `101`, the connection
//! as a plain byte stream ([`Upgraded`]).

use crate::stream::Rewind;
use std::io;

use std::task::{Context, Poll, ready};

use bytes::Bytes;

use super::{Conn, Stream};
use crate::h1::BodyLength;
use crate::h1::chunked::{Decoder, Step};

/// How the rest of the body is delimited.
enum Left {
    /// This many bytes.
    Bytes(u64),
    /// Chunked.
    Chunked(Decoder),
    /// Until the server closes.
    UntilClose,
    /// Nothing: the body has ended.
    Done,
}

/// A response body, read from its connection by whoever polls it.
pub struct ResponseBody {
    conn: Option<Box<Conn>>,
    left: Left,
    /// Whether the framing lets the connection carry another exchange after the body.
    reusable: bool,
    /// An error found while reading, reported on the next poll: whoever relays the body
    /// first gets to send on what came before it.
    failed: Option<io::Error>,
}

impl ResponseBody {
    pub(super) fn new(conn: Box<Conn>, length: BodyLength) -> ResponseBody {
        let (left, reusable) = match length {
            BodyLength::Empty => (Left::Done, true),
            BodyLength::Known(n) => (Left::Bytes(n), true),
            BodyLength::Chunked => (Left::Chunked(Decoder::new()), true),
            BodyLength::UntilClose => (Left::UntilClose, false),
        };
        ResponseBody {
            conn: Some(conn),
            left,
            reusable,
            failed: None,
        }
    }

    /// Whether the body has been read to its end.
    pub fn is_end(&self) -> bool {
        matches!(self.left, Left::Done)
    }

    /// The exact length left, when known.
    pub fn exact_left(&self) -> Option<u64> {
        match self.left {
            Left::Bytes(n) => Some(n),
            Left::Done => Some(0),
            _ => None,
        }
    }

    /// The connection, once its exchange ended cleanly both ways: the request written in
    /// full, the body read to its end with nothing after it, and a framing that allows
    /// reuse. `None` otherwise: such a connection is closed.
    pub fn take_reusable(&mut self) -> Option<Box<Conn>> {
        if !self.is_end() || !self.reusable {
            return None;
        }
        let conn = self.conn.take()?;
        (conn.request_complete && conn.buf.is_empty()).then_some(conn)
    }

    /// The connection as a byte stream, after a `101` (whatever the server sent after the
    /// head is read first).
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        let conn = *self.conn.take()?;
        Some(Rewind::new(conn.buf.freeze(), conn.io))
    }

    /// The next payload bytes; `None` at the end; an error when the server breaks the
    /// framing or closes early. The error comes one poll late: the caller is woken at once
    /// but first sees `Pending`, so that what it holds (a response head and the body's
    /// first bytes, in hyper's write buffer) goes out before the error ends the exchange.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match self.poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.reusable = false;
                self.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match &mut self.left {
                Left::Done => return Poll::Ready(None),
                Left::Bytes(n) => {
                    if !conn.buf.is_empty() {
                        let take = (*n).min(conn.buf.len() as u64) as usize;
                        *n -= take as u64;
                        if *n == 0 {
                            self.left = Left::Done;
                        }
                        return Poll::Ready(Some(Ok(conn.buf.split_to(take).freeze())));
                    }
                }
                Left::Chunked(d) => match d.decode(&mut conn.buf) {
                    Ok(Step::Data(b)) => return Poll::Ready(Some(Ok(b))),
                    Ok(Step::End) => {
                        self.left = Left::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                    Err(e) => {
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            e,
                        ))));
                    }
                },
                Left::UntilClose => {
                    if !conn.buf.is_empty() {
                        return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                    }
                }
            }
            let n = match ready!(conn.poll_fill(cx)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            if n == 0 {
                if matches!(self.left, Left::UntilClose) {
                    self.left = Left::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection mid-body",
                ))));
            }
        }
    }
}

/// An upstream connection after `101 Switching Protocols`.
pub type Upgraded = Rewind<Stream>;
