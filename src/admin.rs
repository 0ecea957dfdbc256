//! The admin listener (CONTRACT §4): a small router over `(method, path)`, served on its own
//! address, never on the client listener.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::body::Body;
use crate::error::plain_response;
use crate::runtime::Runtime;

/// Accepts admin connections until `stop` fires.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let svc_shared = Arc::clone(&shared);
            let service = service_fn(move |req: Request<Incoming>| {
                let shared = Arc::clone(&svc_shared);
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shared.stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Routes one admin request (CONTRACT §4). With `admin.token` set, a non-GET request
/// without `Authorization: Bearer TOKEN` gets 401 before anything else.
pub async fn handle(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let rt = shared.runtime.load_full();
    let method = req.method().clone();
    if let Some(token) = rt.config.admin.token.as_deref()
        && method != Method::GET
        && method != Method::HEAD
        && !is_authorized(&req, token)
    {
        let mut r = plain_response(
            StatusCode::UNAUTHORIZED,
            "401 unauthorized: admin token required\n",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path();
    let allowed: &'static str = match path {
        "/metrics" | "/healthz" | "/readyz" | "/status" => "GET, HEAD",
        "/reload" => "POST",
        _ => return plain_response(StatusCode::NOT_FOUND, "404 not found\n"),
    };
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/healthz" if get => text(StatusCode::OK, "ok"),
        "/metrics" if get => {
            let mut r = Response::new(Body::full(shared.metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        "/readyz" if get => readyz(&rt),
        "/status" if get => json(StatusCode::OK, &status(&rt, shared)),
        "/reload" if method == Method::POST => {
            let s = Arc::clone(shared);
            match tokio::task::spawn_blocking(move || crate::reload::reload(&s)).await {
                Ok(Ok(version)) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "config_version": version }),
                ),
                Ok(Err(e)) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({ "error": e.to_string() }),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({ "error": e.to_string() }),
                ),
            }
        }
        _ => {
            let mut r = plain_response(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            r
        }
    }
}

fn is_authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = value.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    constant_time_eq(given.trim_ascii(), token.as_bytes())
}

/// Compares without an early exit, so that the time taken does not reveal how much of the
/// token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut body = v.to_string();
    body.push('\n');
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// 200 when every upstream has a healthy server; else 503 naming those that have none.
fn readyz(rt: &Runtime) -> Response<Body> {
    let down: Vec<&str> = rt
        .upstreams
        .iter()
        .filter(|u| !u.has_healthy_server())
        .map(|u| &*u.name)
        .collect();
    if down.is_empty() {
        return text(StatusCode::OK, "ready\n");
    }
    let mut r = Response::new(Body::full(format!(
        "not ready: no healthy server in upstream {}\n",
        down.join(", ")
    )));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The `/status` document: the contract's fields plus totals and pool sizes.
pub fn status(rt: &Runtime, shared: &Shared) -> serde_json::Value {
    let mut upstreams = serde_json::Map::new();
    for u in &rt.upstreams {
        let servers: Vec<serde_json::Value> = u
            .members
            .iter()
            .map(|m| {
                let s = &m.server;
                serde_json::json!({
                    "addr": &*s.addr,
                    "healthy": s.is_healthy(),
                    "weight": m.weight,
                    "backup": m.backup,
                    "active_requests": s.active_requests(),
                    "requests_total": s.metrics.codes.total(),
                    "idle_connections": s.pool.idle_count(),
                })
            })
            .collect();
        upstreams.insert(
            u.name.to_string(),
            serde_json::json!({
                "balance": u.balance.as_str(),
                "retries": u.retries,
                "healthy_servers": u.members.iter().filter(|m| m.server.is_healthy()).count(),
                "servers": servers,
            }),
        );
    }
    serde_json::json!({
        "config_version": rt.version,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs_f64(),
        "client_connections": shared.metrics.connections_active.get(),
        "upstreams": upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
