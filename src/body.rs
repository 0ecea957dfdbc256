//! What the client listener sends back, streamed, never buffered: [`Body`] is an upstream's
//! response body ([`UpstreamBody`], which returns its connection to the pool when it ends
//! cleanly), possibly compressed on the way ([`Compressed`], in `body/compressed.rs`), or a
//! short answer of the proxy's own ([`plain_response`], [`error_response`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

mod compressed;

pub use compressed::{Compressed, Counted};

use crate::client::ResponseBody;
use crate::error::ProxyError;
use crate::headers::RawFields;
use crate::server::{ActiveGuard, PassivePolicy};
pub use crate::upload::BoxError;
use crate::upload::{BodyProgress, IdleTimer, RequestBody, fault_behind};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Frame, SizeHint};

/// A response with a short `text/plain` body.
pub fn plain_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The answer to `e` (CONTRACT §3): its status and short text, naming the request ID when
/// there is one (CONTRACT §8), closing the connection after a client's fault.
pub fn error_response(e: &ProxyError, request_id: Option<&HeaderValue>) -> Response<Body> {
    let mut r = match request_id {
        None => plain_response(e.status(), e.text()),
        Some(id) => {
            let mut text = Vec::with_capacity(e.text().len() + id.len() + 13);
            text.extend_from_slice(e.text().as_bytes());
            text.extend_from_slice(b"request id: ");
            text.extend_from_slice(id.as_bytes());
            text.push(b'\n');
            let mut r = plain_response(e.status(), "");
            *r.body_mut() = Body::full(text);
            r
        }
    };
    if e.closes_connection() {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let ProxyError::RateLimited(secs) = e {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
    }
    r
}

/// A response body sent to a client. `Upstream`, the common case, is boxed: a response
/// is moved whole from the exchange up to the connection that writes it, and a small one
/// moves cheaper than the allocation costs.
pub enum Body {
    /// Nothing.
    Empty,
    /// One chunk, taken on first poll.
    Full(Option<Bytes>),
    /// An upstream's response body, streamed through.
    Upstream(Box<UpstreamBody>),
    /// An upstream's response body, compressed as it streams through.
    Compressed(Box<Compressed>),
    /// No body: after this `101`, the client's connection becomes a tunnel to the
    /// upstream's (HTTP/1.1 only).
    Upgrade(Box<crate::tunnel::Tunnel>),
}

impl Body {
    /// A body of one chunk.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let b = bytes.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty | Body::Upgrade(_) => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Upstream(u) => Pin::new(&mut **u).poll_frame(cx),
            Body::Compressed(c) => c.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty | Body::Upgrade(_) => true,
            Body::Full(b) => b.is_none(),
            Body::Upstream(u) => u.inner.is_end(),
            Body::Compressed(c) => c.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty | Body::Upgrade(_) => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(u) => u.size_hint(),
            Body::Compressed(c) => c.size_hint(),
        }
    }
}

/// An upstream response body. When it ends cleanly its connection goes back to the pool;
/// when it is dropped the server's active-request count goes down. A pause longer than
/// `response_body_idle_timeout` between reads cuts it off. A body the upstream breaks off or
/// stalls is a passive failure of its server, unless the client's own body caused it.
pub struct UpstreamBody {
    inner: ResponseBody,
    /// Idle connections kept for the server; 0 when this connection must not be reused.
    max_idle: usize,
    idle: IdleTimer,
    passive: PassivePolicy,
    /// The client's body on the same exchange, if it had one.
    request: Option<Arc<BodyProgress>>,
    /// The client's body itself, kept until the response has been relayed (after an early
    /// response, dropping it starts reading and discarding what the client still sends).
    _upload: RequestBody,
    active: ActiveGuard,
    /// The response's field lines, when its head was not turned into a header map: the
    /// HTTP/1.1 client connection writes them with the head.
    fields: Option<RawFields>,
}

/// The upstream paused longer than `response_body_idle_timeout` in a response body.
#[derive(Debug, thiserror::Error)]
#[error("upstream response body stalled longer than response_body_idle_timeout")]
pub struct ResponseBodyTimeout;

/// What an upstream body needs besides the body itself.
pub struct Exchange {
    /// Idle connections to keep for the server; 0 when the connection must not be reused.
    pub max_idle: usize,
    /// `response_body_idle_timeout`.
    pub idle_timeout: Duration,
    /// Counts the request as active on its server.
    pub active: ActiveGuard,
    /// How a failure counts against the server.
    pub passive: PassivePolicy,
    /// The progress of the client's body sent on the same connection.
    pub request: Option<Arc<BodyProgress>>,
    /// The client's body.
    pub upload: RequestBody,
}

impl UpstreamBody {
    /// Streams `inner` to the client; `fields` are the response's field lines when the
    /// head is to be written from them. Made in its box: the body is a few hundred bytes,
    /// and built on the stack it would be copied whole into the box, and again on each
    /// move before.
    pub fn boxed(inner: ResponseBody, x: Exchange, fields: Option<RawFields>) -> Box<UpstreamBody> {
        let mut b = Box::write(
            Box::new_uninit(),
            UpstreamBody {
                inner,
                max_idle: x.max_idle,
                idle: IdleTimer::new(x.idle_timeout),
                passive: x.passive,
                request: x.request,
                _upload: x.upload,
                active: x.active,
                fields,
            },
        );
        if b.inner.is_end() {
            b.finish();
        }
        b
    }

    /// The response's field lines, when the head is still to be written from them.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }

    /// The body has been read to its end: the connection goes back to the pool if its
    /// exchange ended cleanly both ways.
    fn finish(&mut self) {
        if self.max_idle == 0 {
            return;
        }
        if let Some(conn) = self.inner.take_reusable() {
            self.active.server().pool.put(conn, self.max_idle);
        }
    }

    /// The body broke off: the connection is never reused, and unless the client caused
    /// it, the server gets a passive failure.
    fn broke(&mut self, err: &(dyn std::error::Error + 'static), reason: &str) {
        self.max_idle = 0;
        if fault_behind(err, self.request.as_deref()).is_none() {
            let server = self.active.server();
            tracing::warn!(upstream = %server.upstream, server = %server.addr, error = %err, "{reason}");
            server.record_passive_failure(self.passive, reason);
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner.exact_left() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.inner.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                this.idle.moved();
                if this.inner.is_end() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.broke(&e, "upstream broke off the response body");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.poll_expired(cx) {
                    // The client's response is cut off; the connection is not reused.
                    this.broke(
                        &ResponseBodyTimeout,
                        "upstream stalled in the response body",
                    );
                    return Poll::Ready(Some(Err(Box::new(ResponseBodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        UpstreamBody::size_hint(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_are_short_text_and_close_after_a_clients_fault() {
        for e in [
            ProxyError::NoRoute,
            ProxyError::Timeout,
            ProxyError::BadBody("x"),
            ProxyError::ClientGone,
        ] {
            let r = error_response(&e, None);
            assert_eq!(r.status(), e.status());
            assert_eq!(
                r.headers()[header::CONTENT_TYPE],
                "text/plain; charset=utf-8"
            );
            assert_eq!(
                r.headers().get(header::CONNECTION).is_some(),
                e.closes_connection(),
                "{e}"
            );
        }
    }
}
