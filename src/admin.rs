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
use http_body_util::BodyExt;

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
    while let Some((stream, _peer)) = crate::listener::accept(&listener, &stop, "admin").await {
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
    let path = req.uri().path().to_owned();
    if let Some(rest) = path.strip_prefix("/upstreams/") {
        if method != Method::POST {
            return method_not_allowed("POST");
        }
        return drain(rest, &rt);
    }
    let path = path.as_str();
    let allowed: &'static str = match path {
        "/metrics" | "/healthz" | "/readyz" | "/status" => "GET, HEAD",
        "/reload" | "/maintenance" => "POST",
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
        "/maintenance" if method == Method::POST => maintenance(req, shared, &rt).await,
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
        _ => method_not_allowed(allowed),
    }
}

fn method_not_allowed(allowed: &'static str) -> Response<Body> {
    let mut r = plain_response(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    r
}

fn error_json(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// `POST /upstreams/{name}/servers/{addr}/drain` and `.../undrain` (`addr` as written in the
/// config, percent-encoded or not).
fn drain(rest: &str, rt: &Runtime) -> Response<Body> {
    let parts: Vec<&str> = rest.split('/').collect();
    let [name, "servers", addr, action] = parts.as_slice() else {
        return plain_response(StatusCode::NOT_FOUND, "404 not found\n");
    };
    let on = match *action {
        "drain" => true,
        "undrain" => false,
        _ => return plain_response(StatusCode::NOT_FOUND, "404 not found\n"),
    };
    let (name, addr) = (percent_decode(name), percent_decode(addr));
    let Some(server) = rt.find_server(&name, &addr) else {
        return error_json(
            StatusCode::NOT_FOUND,
            format!("no server {addr:?} in upstream {name:?}"),
        );
    };
    server.set_draining(on);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "upstream": name,
            "addr": addr,
            "draining": server.is_draining(),
            "active_requests": server.active_requests(),
        }),
    )
}

/// Decodes `%XX` escapes (a `host:port` may arrive as `127.0.0.1%3A13000`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /maintenance` with `{"upstream": NAME | "*", "on": bool, "retry_after": "120s"}`.
async fn maintenance(req: Request<Incoming>, shared: &Shared, rt: &Runtime) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Switch {
        upstream: String,
        on: bool,
        #[serde(default)]
        retry_after: Option<crate::config::Dur>,
    }
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            );
        }
    };
    let switch: Switch = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected {{\"upstream\": NAME or \"*\", \"on\": true|false, \"retry_after\": \"120s\"}}: {e}"
                ),
            );
        }
    };
    if switch.upstream != "*" && !rt.upstreams.iter().any(|u| *u.name == switch.upstream) {
        return error_json(
            StatusCode::NOT_FOUND,
            format!("no upstream named {:?}", switch.upstream),
        );
    }
    let retry_after = switch
        .retry_after
        .map_or(crate::maintenance::DEFAULT_RETRY_AFTER, |d| d.0);
    shared
        .maintenance
        .set(&switch.upstream, switch.on.then_some(retry_after));
    shared.maintenance.publish(rt, &shared.metrics);
    // The state in force afterwards: an upstream stays in maintenance while `*` is on.
    let now = if switch.upstream == "*" {
        rt.upstreams
            .iter()
            .find_map(|u| shared.maintenance.get(&u.name))
    } else {
        shared.maintenance.get(&switch.upstream)
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "upstream": switch.upstream,
            "on": now.is_some(),
            "retry_after": now.map(|d| d.as_secs()),
        }),
    )
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
                // CONTRACT §4: `addr` is what is connected to; `name` is the entry as
                // written, so a host name stays visible beside the addresses it resolved to.
                serde_json::json!({
                    "addr": &*s.addr,
                    "name": &*s.name,
                    "healthy": s.is_healthy(),
                    "weight": m.weight,
                    "backup": m.backup,
                    "active_requests": s.active_requests(),
                    "requests_total": s.metrics.codes.total(),
                    "idle_connections": s.pool.idle_count(),
                    "draining": s.is_draining(),
                })
            })
            .collect();
        upstreams.insert(
            u.name.to_string(),
            serde_json::json!({
                "balance": u.balance.as_str(),
                "retries": u.retries,
                "healthy_servers": u.members.iter().filter(|m| m.server.is_healthy()).count(),
                "maintenance": shared.maintenance.get(&u.name).is_some(),
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
