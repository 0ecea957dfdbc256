//! The maintenance switch (`POST /maintenance`): while on for an upstream, every request
//! routed to it is answered 503 with `Retry-After` (and the upstream's `maintenance_page`),
//! without touching health checks. Kept outside the config snapshots so that it survives
//! reloads; read on the request path through one atomic flag when nothing is switched on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::Body;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// `retry_after` when the switch does not say.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Which upstreams are in maintenance, and for how long clients should wait.
#[derive(Debug, Default)]
pub struct Maintenance {
    any: AtomicBool,
    state: ArcSwap<State>,
    writers: Mutex<()>,
}

#[derive(Debug, Default, Clone)]
struct State {
    all: Option<Duration>,
    upstreams: HashMap<String, Duration>,
}

impl Maintenance {
    /// `Some(retry_after)` when `upstream` is in maintenance.
    pub fn get(&self, upstream: &str) -> Option<Duration> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let s = self.state.load();
        s.upstreams.get(upstream).copied().or(s.all)
    }

    /// Switches `upstream` (or `*`, every upstream) on with `Some(retry_after)`, or off.
    /// Turning `*` off ends every maintenance.
    pub fn set(&self, upstream: &str, on: Option<Duration>) {
        let _w = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = State::clone(&self.state.load());
        match (upstream, on) {
            ("*", Some(d)) => s.all = Some(d),
            ("*", None) => s = State::default(),
            (name, Some(d)) => {
                s.upstreams.insert(name.to_owned(), d);
            }
            (name, None) => {
                s.upstreams.remove(name);
            }
        }
        self.any.store(
            s.all.is_some() || !s.upstreams.is_empty(),
            Ordering::Relaxed,
        );
        self.state.store(std::sync::Arc::new(s));
        tracing::warn!(upstream, on = on.is_some(), "maintenance switched");
    }

    /// Sets `fairway_upstream_maintenance` for every upstream of `rt`.
    pub fn publish(&self, rt: &Runtime, metrics: &Metrics) {
        for u in &rt.upstreams {
            metrics.set_maintenance(&u.name, self.get(&u.name).is_some());
        }
    }
}

/// The 503 answer: `Retry-After` in seconds, and the page (HTML if it looks like HTML).
pub fn response(retry_after: Duration, page: Option<&Bytes>) -> Response<Body> {
    let (body, kind) = match page {
        Some(p) => {
            let html = p.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
            (
                p.clone(),
                if html {
                    "text/html; charset=utf-8"
                } else {
                    "text/plain; charset=utf-8"
                },
            )
        }
        None => (
            Bytes::from_static(b"503 service unavailable: under maintenance\n"),
            "text/plain; charset=utf-8",
        ),
    };
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs()),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches() {
        let m = Maintenance::default();
        assert_eq!(m.get("app"), None);
        m.set("app", Some(Duration::from_secs(5)));
        assert_eq!(m.get("app"), Some(Duration::from_secs(5)));
        assert_eq!(m.get("other"), None);
        m.set("*", Some(Duration::from_secs(9)));
        assert_eq!(m.get("other"), Some(Duration::from_secs(9)));
        assert_eq!(m.get("app"), Some(Duration::from_secs(5)));
        m.set("*", None);
        assert_eq!(m.get("app"), None);
    }

    #[test]
    fn answer_has_retry_after_and_page() {
        let r = response(
            Duration::from_secs(120),
            Some(&Bytes::from_static(b"<h1>back soon</h1>")),
        );
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "120");
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    }
}
