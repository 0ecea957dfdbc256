//! The admin listener (CONTRACT §4): a small router over `(method, path)`, served on its own
//! address, never on the client listener. Requests other than GET and HEAD pass the
//! cross-site [`guard`] (403), then the token check (401), before they are routed. The
//! [`dashboard`] page and the `/stats` document it reads are in their own file.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::Body;
use crate::control::Control;
use http_body_util::BodyExt;

use crate::body::plain_response;
use crate::runtime::Runtime;
use crate::server::Server;

mod dashboard;
mod guard;

/// Serves the admin listener on its own task (the control plane's `AdminServer`).
pub fn spawn(
    listener: TcpListener,
    control: Arc<Control>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(listener, control, stop))
}

/// Accepts admin connections until `stop` fires.
pub async fn serve(listener: TcpListener, control: Arc<Control>, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    let builder = Arc::new(builder);
    let Some(mut acceptor) = crate::connection::Acceptor::new(listener, stop, "admin") else {
        return;
    };
    while let Some((stream, _peer)) = acceptor.next_here().await {
        let control = Arc::clone(&control);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let svc_control = Arc::clone(&control);
            let service = service_fn(move |req: Request<Incoming>| {
                let control = Arc::clone(&svc_control);
                async move { Ok::<_, Infallible>(handle(req, &control).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = control.ctx.stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Routes one admin request (CONTRACT §4). A request other than GET and HEAD that looks
/// cross-site gets 403 before anything else (CONTRACT §7, even with the right token: the
/// token may sit in a browser that a foreign page drives); then, with `admin.token` set,
/// one without `Authorization: Bearer TOKEN` gets 401.
pub async fn handle(req: Request<Incoming>, control: &Arc<Control>) -> Response<Body> {
    let rt = control.ctx.runtime.load_full();
    let method = req.method().clone();
    let is_mutating = method != Method::GET && method != Method::HEAD;
    if is_mutating && let Err(refusal) = guard::check(&req, &rt.config.admin.allowed_hosts) {
        tracing::warn!(
            method = %method,
            path = %req.uri().path(),
            rule = refusal.rule(),
            "cross-site admin request refused"
        );
        return plain_response(StatusCode::FORBIDDEN, refusal.message());
    }
    if let Some(token) = rt.config.admin.token.as_deref()
        && is_mutating
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
        "/" | "/stats" | "/metrics" | "/healthz" | "/readyz" | "/status" => "GET, HEAD",
        "/reload" | "/maintenance" => "POST",
        _ => return plain_response(StatusCode::NOT_FOUND, "404 not found\n"),
    };
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/healthz" if get => text(StatusCode::OK, "ok"),
        "/metrics" if get => {
            let mut r = Response::new(Body::full(control.ctx.metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        "/readyz" if get => readyz(&rt),
        "/status" if get => json(StatusCode::OK, &status(&rt, control)),
        "/stats" if get => dashboard::stats(&rt, control),
        "/" if get => dashboard::page(&rt, control),
        "/maintenance" if method == Method::POST => maintenance(req, control, &rt).await,
        "/reload" if method == Method::POST => {
            let s = Arc::clone(control);
            match tokio::task::spawn_blocking(move || s.reload()).await {
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
    // Config names and addresses are UTF-8: a path that decodes to other bytes names
    // nothing here.
    let (Some(name), Some(addr)) = (percent_decode(name), percent_decode(addr)) else {
        return plain_response(StatusCode::NOT_FOUND, "404 not found\n");
    };
    let Some(server) = rt.find_server(&name, &addr) else {
        // As /maintenance does: say which of the two names is unknown.
        let message = if rt.upstreams.iter().any(|u| *u.name == name) {
            format!("no server {addr:?} in upstream {name:?}")
        } else {
            format!("no upstream named {name:?}")
        };
        return error_json(StatusCode::NOT_FOUND, message);
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

/// Decodes `%XX` escapes (a `host:port` may arrive as `127.0.0.1%3A13000`). It works on
/// bytes, since a `%` may be followed by any character; a `%` without two hex digits after
/// it stays as it is. `None` when the decoded bytes are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `POST /maintenance` with `{"upstream": NAME | "*", "on": bool, "retry_after": "120s"}`.
async fn maintenance(req: Request<Incoming>, control: &Control, rt: &Runtime) -> Response<Body> {
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
    control
        .ctx
        .maintenance
        .set(&switch.upstream, switch.on.then_some(retry_after));
    control.ctx.maintenance.publish(rt, &control.ctx.metrics);
    // The state in force afterwards: an upstream stays in maintenance while `*` is on.
    let now = if switch.upstream == "*" {
        rt.upstreams
            .iter()
            .find_map(|u| control.ctx.maintenance.get(&u.name))
    } else {
        control.ctx.maintenance.get(&switch.upstream)
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

/// `Authorization: Bearer TOKEN`. The scheme is case-insensitive and one or more spaces may
/// precede the token (RFC 9110 §11.1, §11.4).
fn is_authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, given) = value.split_at(space);
    scheme.eq_ignore_ascii_case(b"Bearer") && constant_time_eq(given.trim_ascii(), token.as_bytes())
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
pub fn status(rt: &Runtime, control: &Control) -> serde_json::Value {
    status_with(rt, control, |_, _| {})
}

/// The `/status` document, with `extend` adding fields to each server's object (`/stats`).
fn status_with(
    rt: &Runtime,
    control: &Control,
    mut extend: impl FnMut(&Server, &mut serde_json::Map<String, serde_json::Value>),
) -> serde_json::Value {
    let mut upstreams = serde_json::Map::new();
    for u in &rt.upstreams {
        let servers: Vec<serde_json::Value> = u
            .members
            .iter()
            .map(|m| {
                let s = &m.server;
                // CONTRACT §4: `addr` is what is connected to; `name` is the entry as
                // written, so a host name stays visible beside the addresses it resolved to.
                let mut server = serde_json::json!({
                    "addr": &*s.addr,
                    "name": &*s.name,
                    "healthy": s.is_healthy(),
                    "weight": m.weight,
                    "backup": m.backup,
                    "active_requests": s.active_requests(),
                    "requests_total": s.metrics.codes.total(),
                    "idle_connections": s.pool.idle_count(),
                    "draining": s.is_draining(),
                });
                if let serde_json::Value::Object(fields) = &mut server {
                    extend(s, fields);
                }
                server
            })
            .collect();
        upstreams.insert(
            u.name.to_string(),
            serde_json::json!({
                "balance": u.balance.as_str(),
                "retries": u.retries,
                "healthy_servers": u.members.iter().filter(|m| m.server.is_healthy()).count(),
                "maintenance": control.ctx.maintenance.get(&u.name).is_some(),
                "servers": servers,
            }),
        );
    }
    serde_json::json!({
        "config_version": rt.version,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": control.started.elapsed().as_secs_f64(),
        "client_connections": control.ctx.metrics.connections_active.get(),
        "upstreams": upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, is_authorized, percent_decode};
    use http::{Request, header};

    fn authorized(value: &str) -> bool {
        let req = Request::post("/reload")
            .header(header::AUTHORIZATION, value)
            .body(())
            .unwrap();
        is_authorized(&req, "s3cret")
    }

    #[test]
    fn bearer_scheme() {
        for ok in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "Bearer   s3cret",
        ] {
            assert!(authorized(ok), "{ok:?}");
        }
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearers3cret",
            "Basic s3cret",
            "Bearer s3cre",
            "Bearer s3cret s3cret",
            "s3cret",
        ] {
            assert!(!authorized(bad), "{bad:?}");
        }
        let none = Request::post("/reload").body(()).unwrap();
        assert!(!is_authorized(&none, "s3cret"));
    }

    #[test]
    fn percent_decoding() {
        let decode = |s| percent_decode(s).unwrap();
        assert_eq!(decode("127.0.0.1%3A13000"), "127.0.0.1:13000");
        assert_eq!(decode("%e2%82%ac"), "\u{20ac}");
        // Escapes without two hex digits stay literal, whatever follows the `%`.
        for literal in [
            "%",
            "%4",
            "%zz",
            "%+1",
            "a%",
            "%\u{e9}",
            "%a\u{e9}",
            "%\u{20ac}",
        ] {
            assert_eq!(decode(literal), literal);
        }
        assert_eq!(
            decode("/upstreams/app/servers/%\u{e9}/drain"),
            "/upstreams/app/servers/%\u{e9}/drain"
        );
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(percent_decode("%c3"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
