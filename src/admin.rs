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

use crate::app::Shared;
use crate::body::Body;
use crate::error::plain_response;

/// Accepts admin connections until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shared.stop.cancelled() => return,
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

/// Routes one admin request.
pub async fn handle(req: Request<Incoming>, _shared: &Shared) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    let allowed: &'static str = match path {
        "/healthz" => "GET, HEAD",
        _ => return plain_response(StatusCode::NOT_FOUND, "404 not found\n"),
    };
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            let mut r = Response::new(Body::full("ok"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        _ => {
            let mut r = plain_response(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            r
        }
    }
}
