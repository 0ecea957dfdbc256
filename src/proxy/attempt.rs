//! The tries of one request against one upstream ([`Attempt`]): server selection, a pooled
//! or new connection, the request sent and the response head awaited under
//! `request_timeout`; each failed try carries what may follow ([`Next`]), under the retry
//! rules of RFC 9110 §9.2.2 and CONTRACT §2 `retries`, and counts against the server only
//! when it was the server's doing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use super::Trace;
use crate::client::{self, Failed, Outgoing, Sent};
use crate::error::ProxyError;
use crate::runtime::Runtime;
use crate::server::{ActiveGuard, Server};
use crate::upload::{BodyProgress, RequestBody, fault_behind};
use crate::upstream::Upstream;

/// Whether a failed request may be sent again to another server (CONTRACT §2 `retries`).
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The head of the request as it goes upstream, written once and sent again as it is
/// when a try fails before its body was touched.
pub(super) struct Head {
    pub(super) method: Method,
    /// The request line and fields, serialized.
    pub(super) bytes: bytes::BytesMut,
    /// Whether the body goes out in the chunked coding.
    pub(super) chunked: bool,
}

/// The tries of one request against one upstream.
pub(super) struct Attempt<'a> {
    pub(super) rt: &'a Runtime,
    pub(super) upstream: &'a Upstream,
    pub(super) head: &'a Head,
    /// The body is empty, so the request can be sent again.
    pub(super) replayable: bool,
    /// Set when the client's body has been read to its end.
    pub(super) progress: Option<&'a BodyProgress>,
    /// The member a sticky cookie names: tried first when it can take the request.
    pub(super) sticky: Option<usize>,
}

pub(super) type Sender = Box<client::Conn>;

/// What a failed try allows next: the retry decision travels with the failure, decided
/// once where the facts are known (pingora carries it on the error the same way). The
/// request goes again only when its body is untouched (or empty).
enum Next {
    /// Nothing: the client is answered with the error (the client's own fault, a timeout,
    /// or a request that may have reached the server and cannot be sent twice).
    Stop,
    /// The request never reached the server over a pooled connection that had gone
    /// stale: sent as it is on a fresh connection, counting neither a try nor a failure.
    Stale,
    /// An idempotent request with an empty body broke on a reused connection: once more
    /// on a fresh one, whatever `retries` says (CONTRACT §2 `pool_idle_timeout`).
    Again,
    /// Another server, as a further try within `retries`.
    Another,
}

/// One failed try.
struct Failure {
    error: ProxyError,
    next: Next,
}

impl Failure {
    fn stop(error: ProxyError) -> Failure {
        Failure {
            error,
            next: Next::Stop,
        }
    }
}

impl Attempt<'_> {
    /// Tries servers until one answers with a response head. Each failed try says what
    /// may follow ([`Next`]); this loop only keeps the budget: servers already tried
    /// (`retries` further ones at most, CONTRACT §2) and the one fresh-connection retry
    /// a reused connection allows.
    pub(super) async fn run(
        &self,
        client_ip: IpAddr,
        body: &mut RequestBody,
        trace: &mut Trace,
    ) -> Result<(Sent, ActiveGuard, Sender), ProxyError> {
        let upstream = self.upstream;
        let max_tries = 1 + upstream.retries as usize;
        let mut tried: Vec<usize> = Vec::new();
        let mut last_err: Option<ProxyError> = None;
        let mut fresh_retry_left = true;
        let mut fresh = false;
        let mut retry = false;
        loop {
            // A pinned server stays first until tried (a stale pooled connection or a
            // fresh-connection retry goes to it again).
            let pinned = self.sticky.filter(|&i| upstream.can_take(i, &tried));
            let Some(mi) = pinned.or_else(|| upstream.select(client_ip, &tried)) else {
                if last_err.is_none() && upstream.has_healthy_server() && upstream.is_saturated() {
                    return Err(ProxyError::Overloaded(
                        "every server is at max_connections_per_server",
                    ));
                }
                return Err(last_err.unwrap_or(ProxyError::NoHealthyServer));
            };
            if std::mem::take(&mut retry) {
                upstream.metrics.retries.inc();
            }
            trace.attempts += 1;
            let server = &upstream.members[mi].server;
            trace.server = Some(Arc::clone(server));
            let guard = server.begin();
            let fresh_now = std::mem::take(&mut fresh);
            let failure = match self
                .try_server(server, fresh_now, body, fresh_retry_left)
                .await
            {
                Ok((resp, conn)) => return Ok((resp, guard, conn)),
                Err(f) => f,
            };
            match failure.next {
                Next::Stop => return Err(failure.error),
                Next::Stale => fresh = true,
                Next::Again => {
                    fresh = true;
                    fresh_retry_left = false;
                    retry = true;
                    last_err = Some(failure.error);
                }
                Next::Another => {
                    tried.push(mi);
                    last_err = Some(failure.error);
                    if tried.len() >= max_tries {
                        return Err(last_err.unwrap_or(ProxyError::NoHealthyServer));
                    }
                    retry = true;
                }
            }
        }
    }

    /// Whether the request is one that may be sent again after it may have reached a
    /// server: idempotent, with nothing left that cannot be sent twice (RFC 9110 §9.2.2).
    fn may_send_twice(&self) -> bool {
        self.replayable && is_idempotent(&self.head.method)
    }

    /// One try against `server`: a pooled connection (or a new one when `fresh`), the
    /// request sent, the response head awaited under `request_timeout`. A failure says
    /// what may follow, and counts as a passive failure of the server when it was the
    /// server's doing.
    async fn try_server(
        &self,
        server: &Arc<Server>,
        fresh: bool,
        body: &mut RequestBody,
        fresh_retry_left: bool,
    ) -> Result<(Sent, Sender), Failure> {
        let upstream = self.upstream;
        let now = crate::timing::now();
        let pooled = if fresh {
            None
        } else {
            server.pool.take(upstream.pool.idle_timeout, now)
        };
        let reused = pooled.is_some();
        let conn = match pooled {
            Some(conn) => Ok(conn),
            // A new connection: the wait counts against max_pending.
            None => match PendingGuard::enter(upstream) {
                Some(_waiting) => dial(server, upstream).await,
                None => {
                    return Err(Failure::stop(ProxyError::Overloaded(
                        "max_pending requests already wait for a connection",
                    )));
                }
            },
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(source) => {
                tracing::warn!(upstream = %upstream.name, server = %server.addr, error = %source, "connect failed");
                server.record_passive_failure(upstream.passive, "connect failed");
                // Nothing was sent: any method goes to another server, the request as it
                // is.
                return Err(Failure {
                    error: ProxyError::Connect {
                        server: server.addr.to_string(),
                        source,
                    },
                    next: Next::Another,
                });
            }
        };
        let written = conn.bytes_written();
        let head = self.head;
        let limit = self.rt.settings.request_timeout;
        // Without a body, the head is awaited under the connection's own timer; with one,
        // the clock depends on the body's progress (`await_head`).
        // (A pooled connection was taken just now; a new one may have taken a while.)
        let sent_at = if reused { now } else { crate::timing::now() };
        let deadline = self.progress.is_none().then(|| sent_at + limit);
        let fut = conn.send(Outgoing {
            method: &head.method,
            head: &head.bytes,
            body,
            chunked: head.chunked,
            progress: self.progress,
            deadline,
        });
        let result = match self.progress {
            None => Ok(fut.await),
            Some(progress) => await_head(fut, limit, progress).await,
        };
        let err = match result {
            Ok(Ok(sent)) => {
                server.health.record_passive_success();
                return Ok((sent, conn));
            }
            Err(()) | Ok(Err(Failed::TimedOut)) => {
                tracing::warn!(upstream = %upstream.name, server = %server.addr, "no response head within request_timeout");
                server.record_passive_failure(upstream.passive, "request_timeout passed");
                return Err(Failure::stop(ProxyError::Timeout));
            }
            Ok(Err(e)) => e,
        };
        if let Some(fault) = fault_behind(&err, self.progress) {
            return Err(Failure::stop(fault.error()));
        }
        // The upstream's doing from here on. The request never reached the server when not
        // one byte was written; it goes again as it is, whatever its method, while its body
        // is untouched (it is read only once the head is out) or empty.
        let reached = conn.bytes_written() > written;
        let error = upstream_error(err);
        if !reached && (!conn.body_touched() || self.replayable) {
            if conn.reused {
                // A pooled connection the server had closed.
                return Err(Failure {
                    error,
                    next: Next::Stale,
                });
            }
            tracing::warn!(upstream = %upstream.name, server = %server.addr, error = %error, "connection closed before the request was sent");
            server.record_passive_failure(upstream.passive, "connection closed before the request");
            return Err(Failure {
                error,
                next: Next::Another,
            });
        }
        tracing::warn!(upstream = %upstream.name, server = %server.addr, error = %error, "upstream broke off before the response head");
        if !conn.reused {
            // On a reused connection the break may be the keep-alive race (the server
            // closing an idle connection as the request arrived): not counted.
            server.record_passive_failure(
                upstream.passive,
                "connection broke before the response head",
            );
        }
        // The request may have reached the server.
        let next = if !self.may_send_twice() {
            Next::Stop
        } else if conn.reused && fresh_retry_left {
            // CONTRACT §2 pool_idle_timeout: once more on a fresh connection, whatever
            // `retries` says; the balancer may choose the same server or another.
            Next::Again
        } else {
            Next::Another
        };
        Err(Failure { error, next })
    }
}

/// Waits for the response head of a request with a body under `request_timeout` (`limit`),
/// which starts once the body has been sent (CONTRACT §2). `Err(())` is a timeout.
async fn await_head<F>(
    fut: F,
    limit: Duration,
    progress: &BodyProgress,
) -> Result<Result<Sent, Failed>, ()>
where
    F: std::future::Future<Output = Result<Sent, Failed>>,
{
    tokio::pin!(fut);
    let mut deadline = Instant::now() + limit;
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = tokio::time::sleep_until(deadline) => {
                // Until the body has ended, the clock runs only while the upstream is
                // the one holding things up: a slow upload that keeps moving is fine,
                // and a client that stops sending is the client's stall
                // (body_read_timeout answers it), never a timeout of the upstream.
                let now = Instant::now();
                let since = match progress.ended() {
                    Some(t) => t,
                    None if progress.is_waiting_on_client() => now,
                    None => progress.last_moved(),
                };
                if since + limit <= now {
                    return Err(());
                }
                deadline = since + limit;
            }
        }
    }
}

/// A new connection to `server`. Boxed: dialing (TLS included) is the largest state of a
/// request and the rarest step with a warm pool, so it is kept out of every request's future.
async fn dial(server: &Server, upstream: &Upstream) -> std::io::Result<Box<client::Conn>> {
    Box::pin(client::dial(
        &server.target,
        &server.name,
        upstream.pool.connect_timeout,
        upstream.tls.as_deref(),
        upstream.pool.resolver,
    ))
    .await
}

/// A request waiting for a new upstream connection, counted against `max_pending`.
struct PendingGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> PendingGuard<'a> {
    fn enter(upstream: &'a Upstream) -> Option<PendingGuard<'a>> {
        use std::sync::atomic::Ordering;
        let n = upstream.pending.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard(&upstream.pending);
        match upstream.max_pending {
            Some(max) if n >= max => None,
            _ => Some(guard),
        }
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An upstream connection's error before the response head, as the proxy answers it: an
/// unparsable response head is an invalid response, anything else a broken connection.
fn upstream_error(err: Failed) -> ProxyError {
    match err {
        Failed::Head(_) => ProxyError::BadUpstreamResponse("malformed response head"),
        Failed::Io(e) => ProxyError::UpstreamBroke(e),
        Failed::Client(e) => ProxyError::UpstreamBroke(std::io::Error::other(e)),
        Failed::TimedOut => ProxyError::Timeout,
    }
}
