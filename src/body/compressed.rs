//! A response body compressed on its way to the client (CONTRACT §8 `[compression]`):
//! streamed, never buffered whole. What the upstream sends is compressed as it arrives and
//! relayed whenever the encoder has output; when the upstream pauses, what was compressed
//! so far is flushed, so a slow stream (a long poll, a progress page) reaches the client
//! without waiting for the encoder's block to fill.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use super::{BoxError, UpstreamBody};
use crate::compress::Encoder;

/// The bytes counters of `fairway_compression_bytes_total`.
#[derive(Debug, Clone)]
pub struct Counted {
    /// `direction="in"`: before compression.
    pub bytes_in: Counter,
    /// `direction="out"`: after compression.
    pub bytes_out: Counter,
}

/// An upstream body and its encoder.
pub struct Compressed {
    inner: UpstreamBody,
    /// Taken by `finish` at the end.
    encoder: Option<Encoder>,
    /// Input written since the last output was handed on.
    pending: bool,
    counted: Counted,
}

impl Compressed {
    /// Compresses `inner` with `encoder`.
    pub fn new(inner: UpstreamBody, encoder: Encoder, counted: Counted) -> Compressed {
        Compressed {
            inner,
            encoder: Some(encoder),
            pending: false,
            counted,
        }
    }

    fn out(&self, b: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.counted.bytes_out.inc_by(b.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(b))))
    }

    /// Polls the upstream body and compresses what it gives until there is output to hand
    /// on, the body pauses (then what was compressed so far is flushed) or it ends.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(encoder) = self.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not relayed to HTTP/1.1 clients; a compressed body has
                    // none of its own.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.counted.bytes_in.inc_by(data.len() as u64);
                    encoder.write(&data)?;
                    self.pending = true;
                    let out = encoder.take();
                    if !out.is_empty() {
                        return self.out(out);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let Some(encoder) = self.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    let out = encoder.finish()?;
                    return if out.is_empty() {
                        Poll::Ready(None)
                    } else {
                        self.out(out)
                    };
                }
                Poll::Pending => {
                    if !std::mem::take(&mut self.pending) {
                        return Poll::Pending;
                    }
                    let out = encoder.flush()?;
                    if out.is_empty() {
                        return Poll::Pending;
                    }
                    // The upstream's waker is registered: it is polled again after this.
                    return self.out(out);
                }
            }
        }
    }

    /// Whether the body has ended.
    pub fn is_end(&self) -> bool {
        self.encoder.is_none()
    }

    /// The compressed length is unknown until the end.
    pub fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
