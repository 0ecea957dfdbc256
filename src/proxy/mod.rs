//! The request path: route → select a server → forward (with retries) → stream the
//! response back; after an upstream `101`, tunnel both ways (see `tunnel`).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use tokio::time::Instant;

mod attempt;

use attempt::{Attempt, Head, Sender};

use crate::body::{Body, Exchange, UpstreamBody};
use crate::client::Sent;
use crate::context::{ConnInfo, Context};
use crate::error::ProxyError;
use crate::headers::{self, Origin, RawFields};
use crate::route;
use crate::runtime::Runtime;
use crate::server::{ActiveGuard, Server};
use crate::tunnel;
use crate::upload::{BodyProgress, ClientBody, Inbound, RequestBody, WireCount};
use crate::upstream::Upstream;

/// Where a request went: filled in as it is routed and tried, read for metrics and the
/// access log.
#[derive(Debug, Default)]
pub struct Trace {
    /// The upstream index in the snapshot, once routed.
    pub upstream: Option<usize>,
    /// The server of the last try.
    pub server: Option<Arc<Server>>,
    /// Tries made (0 when the proxy answered by itself).
    pub attempts: u32,
    /// The client IP as `trusted_proxies` allow it to be known.
    pub client_ip: Option<IpAddr>,
    /// Set once the answer is ready and counted.
    pub answered: bool,
    /// The route's position in the config, once routed by a `[[routes]]` entry.
    pub route: Option<usize>,
    /// The request's `X-Request-Id`, with `request_id` on.
    pub request_id: Option<HeaderValue>,
    /// Set by an HTTP/1.1 connection before [`handle`]: the ID goes into the response head
    /// as a line the connection writes, not into the response's header map. `handle` clears
    /// it when the route's response rules act on the map, the ID among its fields.
    pub id_as_line: bool,
}

/// A client's request as the proxy handles it: an HTTP/1.x head's field lines as they came,
/// or an HTTP/2 request's fields as lines.
pub struct ClientRequest {
    /// The method.
    pub method: Method,
    /// The request target (HTTP/2: built from the pseudo-header fields).
    pub uri: Uri,
    /// The client's HTTP version.
    pub version: Version,
    /// The field lines.
    pub fields: RawFields,
    /// The body.
    pub body: Inbound,
}

impl ClientRequest {
    /// An HTTP/2 request's head and body, its fields made lines.
    pub fn from_h2(parts: http::request::Parts, body: Inbound) -> ClientRequest {
        let fields = RawFields::from_map(&parts.headers, &mut headers::Facts::default());
        ClientRequest {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            fields,
            body,
        }
    }
}

/// Answers one client request (its head, `head_bytes` long as [`head_size`] counts it,
/// arrived at `start`). Never fails: errors become the contract's status codes. Counts the
/// response in the metrics. The request stays the caller's: what goes upstream (its body,
/// fields and method) is taken out of it, and what is left is the caller's to drop.
pub async fn handle(
    rt: &Runtime,
    req: &mut ClientRequest,
    head_bytes: usize,
    conn: &ConnInfo,
    ctx: &Arc<Context>,
    start: Instant,
    trace: &mut Trace,
) -> Response<Body> {
    let method = req.method.clone();
    // Whether the peer's forwarded fields (and request ID) are believed: decided once.
    let trusted = headers::is_trusted(conn.peer.ip(), &rt.trusted);
    if rt.settings.request_id {
        trace.request_id = Some(headers::request_id(&req.fields, trusted));
    }
    let mut resp = match forward(rt, req, head_bytes, conn, trusted, ctx, trace).await {
        Ok(resp) => resp,
        Err(e) => {
            match e.status() {
                StatusCode::BAD_GATEWAY
                | StatusCode::GATEWAY_TIMEOUT
                | StatusCode::SERVICE_UNAVAILABLE => {
                    tracing::warn!(peer = %conn.peer, method = %method, error = %e, "request failed");
                }
                _ => {
                    tracing::debug!(peer = %conn.peer, method = %method, error = %e, "request refused")
                }
            }
            crate::body::error_response(&e, trace.request_id.as_ref())
        }
    };
    let rules = trace
        .route
        .and_then(|i| rt.policies[i].response_headers.as_ref());
    if rules.is_some() {
        trace.id_as_line = false;
    }
    if let Some(id) = &trace.request_id
        && !trace.id_as_line
    {
        headers::put_request_id(resp.headers_mut(), id);
    }
    // The route's rules come after fairway's own fields (CONTRACT §8).
    if let Some(rules) = rules {
        rules.apply(resp.headers_mut());
    }
    count(rt, trace, resp.status().as_u16(), start);
    trace.answered = true;
    resp
}

/// Counts an answered request (or, with 499, one whose client went away first) in the
/// request metrics of its upstream and server.
pub fn count(rt: &Runtime, trace: &Trace, code: u16, start: Instant) {
    match trace.upstream.map(|i| &rt.upstreams[i]) {
        Some(u) => {
            let seconds = crate::timing::now()
                .saturating_duration_since(start)
                .as_secs_f64();
            u.metrics.duration.observe(seconds);
            match &trace.server {
                Some(s) => {
                    s.metrics.codes.inc(code);
                    s.metrics.duration.observe(seconds);
                }
                None => u.metrics.no_server.inc(code),
            }
        }
        None => rt.no_route.inc(code),
    }
}

/// The size of a request head as sent on the wire (request line, header lines, CRLFs).
pub fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n ".len();
    req.headers()
        .iter()
        .fold(line + 2, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

fn content_length(fields: &RawFields) -> Option<u64> {
    std::str::from_utf8(fields.get(b"content-length")?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn forward(
    rt: &Runtime,
    req: &mut ClientRequest,
    head_bytes: usize,
    conn: &ConnInfo,
    trusted: bool,
    ctx: &Arc<Context>,
    trace: &mut Trace,
) -> Result<Response<Body>, ProxyError> {
    if head_bytes > rt.settings.max_header_bytes {
        return Err(ProxyError::HeadTooLarge);
    }
    // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host; two could make the route
    // and the application disagree on the host.
    let (host_field, another) = {
        let mut hosts = req.fields.all(b"host");
        (hosts.next(), hosts.next())
    };
    match (host_field, another) {
        (_, Some(_)) => return Err(ProxyError::BadRequest("more than one Host header")),
        (None, None) if req.version == Version::HTTP_11 => {
            return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
        }
        // RFC 9113 §8.3.1: HTTP/2 carries the authority in `:authority` (or `Host`); with
        // neither, there is no Host for the HTTP/1.1 request upstream (RFC 9112 §3.2).
        (None, None) if req.version == Version::HTTP_2 && req.uri.authority().is_none() => {
            return Err(ProxyError::BadRequest(
                "HTTP/2 request without :authority or Host",
            ));
        }
        _ => {}
    }
    // CONTRACT §3: Host is kept as the client sent it; HTTP/2 carries it as :authority.
    // An HTTP/1.x absolute-form target's authority wins over Host (RFC 9112 §3.2.2): it is
    // what is routed and what the upstream gets, so the two cannot disagree.
    let target_authority = (req.version != Version::HTTP_2)
        .then(|| req.uri.authority())
        .flatten()
        .map(|a| a.as_str().as_bytes());
    let host_from_target = target_authority.is_some();
    let host_value: Option<&[u8]> = match (target_authority, host_field) {
        (Some(a), _) => Some(a),
        (None, Some(h)) => Some(h),
        (None, None) => req.uri.authority().map(|a| a.as_str().as_bytes()),
    };
    // Visible ASCII only, as a field value's text; looked at only when routes differ by host.
    let host = host_value
        .filter(|_| rt.routes.uses_host())
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| v.is_ascii())
        .map(route::host_only)
        .unwrap_or("");
    let routed = rt
        .routes
        .route(host, req.uri.path())
        .map_err(|e| ProxyError::BadRequest(e.reason()))?
        .ok_or(ProxyError::NoRoute)?;
    let index = routed.upstream;
    // The routed path is the one sent upstream; owned only when normalizing changed it.
    let routed_path = match routed.path {
        Cow::Owned(p) => Some(p),
        Cow::Borrowed(_) => None,
    };
    trace.upstream = Some(index);
    trace.route = routed.route;
    let policy = routed.route.map(|i| &rt.policies[i]);
    let upstream = &rt.upstreams[index];
    if let Some(retry_after) = ctx.maintenance.get(&upstream.name) {
        return Ok(crate::maintenance::response(
            retry_after,
            upstream.maintenance_page.as_ref(),
        ));
    }

    // The declared length is looked up only when there is a limit to hold it to.
    if let Some(max) = rt.settings.max_body_bytes
        && let Some(len) = content_length(&req.fields)
        && len > max
    {
        return Err(ProxyError::BodyTooLarge);
    }

    let peer = conn.peer.ip();
    let client_ip = if trusted {
        headers::client_ip(peer, &req.fields, &rt.trusted)
    } else {
        peer
    };
    trace.client_ip = Some(client_ip);
    if let Some(limit) = policy.and_then(|p| p.rate_limit.as_ref())
        && let Err(wait) = limit.check(client_ip, &req.fields)
    {
        upstream.metrics.rate_limited.inc();
        return Err(ProxyError::RateLimited(crate::limit::retry_after_secs(
            wait,
        )));
    }
    // The server a sticky cookie names: `Some(None)` when the cookie names none of this
    // snapshot's servers.
    let sticky = upstream.sticky.as_ref().and_then(|s| {
        crate::sticky::cookie_value(&req.fields, &s.cookie.cookie).map(|v| s.member(v))
    });
    let upgrade = req.version == Version::HTTP_11 && headers::is_upgrade_request(&req.fields);
    // The encoding the response may get, if it turns out eligible (CONTRACT §8).
    let encode = policy
        .map_or(rt.compression.as_ref(), |p| p.compression.as_ref())
        .and_then(|c| {
            let accept = req.fields.all(b"accept-encoding");
            let algorithm = crate::compress::negotiate(accept, &c.algorithms)?;
            Some(Encode {
                algorithm,
                settings: c,
                head: req.method == Method::HEAD,
            })
        });

    // The request stays with the caller (moved through each call, its few hundred bytes
    // would be copied each time); what goes on is taken from it.
    let body = std::mem::replace(&mut req.body, Inbound::Empty);
    let version = req.version;
    let as_lines =
        version != Version::HTTP_2 && policy.and_then(|p| p.response_headers.as_ref()).is_none();
    let origin = Origin {
        peer,
        client: client_ip,
        trusted,
        proto: conn.proto,
    };
    let target = origin_form(&req.uri, routed_path.as_deref())?;

    // A body's progress is followed (request_timeout, early responses, the client's
    // faults); an empty body can be sent again instead.
    let progress = (!body.is_end()).then(|| Arc::new(BodyProgress::new()));
    let replayable = progress.is_none();
    let body = match &progress {
        None => RequestBody::Empty,
        Some(p) => {
            // An HTTP/1.x body in chunked coding: its framing overhead is bounded.
            let chunked =
                version != Version::HTTP_2 && req.fields.get(b"transfer-encoding").is_some();
            RequestBody::Client(Box::new(ClientBody::new(
                body,
                rt.settings.max_body_bytes,
                rt.settings.body_read_timeout,
                Arc::clone(p),
                chunked
                    .then(|| conn.bytes_read.clone().map(WireCount::new))
                    .flatten(),
            )))
        }
    };
    // The head upstream, rewritten as it is written (hop-by-hop fields left out, forwarded
    // fields set, HTTP/2 cookie crumbs joined); the body framed by its length when the
    // client gave one, else chunked.
    let mut bytes = bytes::BytesMut::new();
    let chunked = headers::write_upstream_head(
        &mut bytes,
        &headers::UpstreamRequest {
            method: &req.method,
            target: &target,
            fields: &req.fields,
            origin: &origin,
            host: host_value,
            host_from_target,
            upgrade,
            http2: version == Version::HTTP_2,
            has_body: progress.is_some(),
            request_id: trace.request_id.as_ref(),
            rules: policy.and_then(|p| p.request_headers.as_ref()),
        },
    );
    // The client's fields are all in the head written: their line list goes back to be
    // reused.
    drop(std::mem::take(&mut req.fields));
    let head = Head {
        method: std::mem::take(&mut req.method),
        bytes,
        chunked,
    };
    let mut body = body;
    let attempt = Attempt {
        rt,
        upstream,
        head: &head,
        replayable,
        progress: progress.as_deref(),
        sticky: sticky.flatten(),
    };
    let result = attempt.run(client_ip, &mut body, trace).await;
    let set_cookie = upstream.sticky.as_ref().and_then(|s| {
        let chosen = trace.server.as_ref().and_then(|srv| {
            upstream
                .members
                .iter()
                .position(|m| Arc::ptr_eq(&m.server, srv))
        });
        if sticky.is_some() && sticky.flatten() != chosen {
            upstream.metrics.sticky_reassignments.inc();
        }
        let chosen = chosen.filter(|_| result.is_ok() && sticky.flatten() != chosen)?;
        Some(s.cookie.set_cookie(&s.ids[chosen], conn.proto == "https"))
    });
    let (sent, guard, conn) = match result {
        Ok(x) => x,
        Err(e) => {
            // Answered while the client is still sending a body it did nothing wrong with
            // (an upstream that broke off mid-upload): the rest is read and discarded when
            // the body is dropped, as after an early response, so that the client gets the
            // answer instead of a reset and its connection stays usable.
            if let Some(p) = &progress
                && p.ended().is_none()
                && p.fault().is_none()
            {
                p.stop();
            }
            return Err(e);
        }
    };
    respond(Answer {
        sent,
        guard,
        conn,
        upstream,
        upgrade,
        rt,
        ctx,
        progress,
        upload: body,
        set_cookie,
        encode,
        as_lines,
    })
}

/// A response may be compressed: the encoding the client accepts, and the settings that say
/// which responses are eligible.
struct Encode<'a> {
    algorithm: crate::compress::Algorithm,
    settings: &'a crate::policy::Compression,
    /// A HEAD request: its answer is never marked compressed.
    head: bool,
}

/// `/path?query` only: what an HTTP/1.1 origin server expects; with `path` (the routed
/// path, when it differs from the one received) in place of the received path and the
/// query kept as sent. Borrowed from `uri` unless the path was rewritten.
fn origin_form<'u>(uri: &'u Uri, path: Option<&str>) -> Result<Cow<'u, str>, ProxyError> {
    let Some(path) = path else {
        return Ok(Cow::Borrowed(
            uri.path_and_query().map_or("/", |p| p.as_str()),
        ));
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    match PathAndQuery::try_from(pq.as_str()) {
        Ok(_) => Ok(Cow::Owned(pq)),
        Err(_) => Err(ProxyError::BadRequest("invalid path")),
    }
}

/// A response head received, and all that relaying it needs.
struct Answer<'a> {
    sent: Sent,
    guard: ActiveGuard,
    conn: Sender,
    upstream: &'a Upstream,
    /// The client asked for an upgrade (an HTTP/1.1 connection that can become a tunnel).
    upgrade: bool,
    rt: &'a Runtime,
    ctx: &'a Arc<Context>,
    progress: Option<Arc<BodyProgress>>,
    upload: RequestBody,
    /// The sticky cookie to set: the request did not carry the chosen server's.
    set_cookie: Option<HeaderValue>,
    /// Compression, when the route has it on and the client accepts an encoding.
    encode: Option<Encode<'a>>,
    /// The head may go to the client as the lines it came in (an HTTP/1.x client, and no
    /// response rules on the route).
    as_lines: bool,
}

fn respond(a: Answer<'_>) -> Result<Response<Body>, ProxyError> {
    let (guard, conn, upstream, rt, progress) = (a.guard, a.conn, a.upstream, a.rt, a.progress);
    let Sent { head, length } = a.sent;
    // An early response: the head arrived before the client's body was all sent. No
    // further byte of the body has gone out (the exchange stopped it), and the connection
    // is not reused: the server may take what it did not read for a next request, and
    // answer it to another client.
    let early = progress.as_ref().is_some_and(|p| p.ended().is_none());
    let facts = head.facts;
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        if !a.upgrade {
            return Err(invalid_response(
                &guard,
                upstream,
                "101 without an upgrade request",
            ));
        }
        let mut headers = head
            .fields
            .to_map()
            .map_err(|what| invalid_response(&guard, upstream, what))?;
        // Only the protocol asked for is tunnelled (headers::is_upgrade_request).
        if !headers::is_websocket_upgrade(&headers) {
            return Err(invalid_response(
                &guard,
                upstream,
                "101 to another protocol than websocket",
            ));
        }
        let Some(upstream_side) = conn.into_body(length).into_upgraded() else {
            return Err(ProxyError::BadUpstreamResponse("upgrade failed"));
        };
        if let Some(cookie) = a.set_cookie {
            headers.append(header::SET_COOKIE, cookie);
        }
        headers::strip_known(&mut headers, &facts, true);
        let tunnel = tunnel::Tunnel {
            upstream: upstream_side,
            idle: rt.settings.tunnel_idle_timeout,
            stop: a.ctx.stop_here().clone(),
            guard,
        };
        let mut resp = Response::new(Body::Upgrade(Box::new(tunnel)));
        *resp.status_mut() = head.status;
        *resp.headers_mut() = headers;
        return Ok(resp);
    }
    let framing = match headers::framing_of(&facts) {
        Ok(f) => f,
        Err(what) => return Err(invalid_response(&guard, upstream, what)),
    };
    let keep = !early
        && framing == headers::Framing::Clean
        && head.version == Version::HTTP_11
        && !facts.close;
    // The head goes to an HTTP/1.1 client line by line, as it came, unless something needs
    // it as a header map: an HTTP/2 client, a sticky cookie to add, compression, the route's
    // response rules, a `Content-Length` to drop.
    let as_lines = a.as_lines
        && a.set_cookie.is_none()
        && a.encode.is_none()
        && framing != headers::Framing::ChunkedOverLength;
    let mut map = if as_lines {
        None
    } else {
        let mut map = head
            .fields
            .to_map()
            .map_err(|what| invalid_response(&guard, upstream, what))?;
        if let Some(cookie) = a.set_cookie {
            map.append(header::SET_COOKIE, cookie);
        }
        if framing == headers::Framing::ChunkedOverLength {
            // RFC 9112 §6.3: chunked wins, the length goes, the connection is not reused.
            map.remove(header::CONTENT_LENGTH);
        }
        headers::strip_known(&mut map, &facts, false);
        Some(map)
    };
    // Only a connection whose exchange ended cleanly both ways goes back to the pool.
    let exchange = Exchange {
        max_idle: if keep { upstream.pool.max_idle } else { 0 },
        idle_timeout: rt.settings.response_body_idle_timeout,
        active: guard,
        passive: upstream.passive,
        request: progress,
        upload: a.upload,
    };
    let Some(mut headers) = map.take() else {
        let body = UpstreamBody::boxed(conn.into_body(length), exchange, Some(head.fields));
        let mut resp = Response::new(Body::Upstream(body));
        *resp.status_mut() = head.status;
        // The map stays empty: an HTTP/1.1 connection writes the request's ID as a line of
        // the head, and a route with response rules has no head written from lines.
        *resp.headers_mut() = HeaderMap::new();
        return Ok(resp);
    };
    let body = UpstreamBody::boxed(conn.into_body(length), exchange, None);
    let status = head.status;
    if let Some(e) = a.encode
        && crate::compress::is_compressible(
            status.as_u16(),
            e.head,
            &headers,
            &e.settings.types,
            e.settings.min_length,
        )
        // An encoder that cannot be made (out of memory) leaves the response as it is.
        && let Ok(encoder) = crate::compress::Encoder::new(e.algorithm, e.settings.level)
    {
        crate::compress::rewrite_headers(&mut headers, e.algorithm);
        let m = &a.ctx.metrics;
        m.count_compressed(e.algorithm.as_str());
        let counted = crate::body::Counted {
            bytes_in: m.compression_in.clone(),
            bytes_out: m.compression_out.clone(),
        };
        let body = crate::body::Compressed::new(*body, encoder, counted);
        let mut resp = Response::new(Body::Compressed(Box::new(body)));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        return Ok(resp);
    }
    let mut resp = Response::new(Body::Upstream(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// A response head the proxy cannot pass on: a 502 for the client, a passive failure for
/// the server, and the connection closed (dropped with the caller's sender).
fn invalid_response(guard: &ActiveGuard, upstream: &Upstream, what: &'static str) -> ProxyError {
    let server = guard.server();
    tracing::warn!(upstream = %upstream.name, server = %server.addr, problem = what, "invalid upstream response");
    server.record_passive_failure(upstream.passive, what);
    ProxyError::BadUpstreamResponse(what)
}
