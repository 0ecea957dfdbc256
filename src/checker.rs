//! Active health checks: the checker task of one server (one check at a time, the next
//! `interval` after the previous one ended), and the one-shot probe that both the checker and
//! `fairway check --probe` use. Results feed the server's `HealthState`.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, header};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Outgoing, Target};
use crate::config::HealthCheckSection;
use crate::health::{HealthCheck, Transition};
use crate::server::Server;
use crate::tls::UpstreamTls;
use crate::upload::RequestBody;

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    /// Connecting failed.
    Connect(std::io::Error),
    /// No complete answer within the timeout.
    Timeout,
    /// The connection broke, or the answer was not HTTP.
    Http(client::Failed),
    /// The status is outside `expect_status`.
    Status(u16),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                f.write_str("connection refused")
            }
            ProbeError::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                f.write_str("connect timed out")
            }
            ProbeError::Connect(e) => write!(f, "connect failed: {e}"),
            ProbeError::Timeout => f.write_str("timed out"),
            ProbeError::Http(e) => write!(f, "connection broke: {e}"),
            ProbeError::Status(c) => write!(f, "status {c}"),
        }
    }
}

/// Largest health response body read (the rest is not waited for).
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Sends one health check to `target` over its own connection; `Ok(status)` when it passes.
pub async fn probe(
    target: &Target,
    addr: &str,
    hc: &HealthCheck,
    tls: Option<&UpstreamTls>,
) -> Result<u16, ProbeError> {
    let attempt = async {
        let mut conn = client::dial(target, addr, hc.timeout, tls, hc.resolver)
            .await
            .map_err(ProbeError::Connect)?;
        let host = hc.host.as_deref().unwrap_or(addr);
        let mut fields = HeaderMap::with_capacity(3);
        if let Ok(h) = HeaderValue::from_str(host) {
            fields.insert(header::HOST, h);
        }
        fields.insert(header::CONNECTION, HeaderValue::from_static("close"));
        fields.insert(
            header::USER_AGENT,
            HeaderValue::from_static("fairway-health-check"),
        );
        let path = if hc.path.parse::<http::uri::PathAndQuery>().is_ok() {
            hc.path.as_str()
        } else {
            "/"
        };
        let mut head = bytes::BytesMut::new();
        crate::h1::write_request_head(&mut head, &Method::GET, path, &fields, false);
        let mut none = RequestBody::Empty;
        let sent = conn
            .send(Outgoing {
                method: &Method::GET,
                head: &head,
                body: &mut none,
                chunked: false,
                progress: None,
                deadline: None,
            })
            .await
            .map_err(ProbeError::Http)?;
        let status = sent.head.status.as_u16();
        // Read (a bounded part of) the body so the server sees a complete exchange.
        let mut body = conn.into_body(sent.length);
        let mut read = 0usize;
        while read < MAX_PROBE_BODY {
            match std::future::poll_fn(|cx| body.poll_data(cx)).await {
                Some(Ok(d)) => read += d.len(),
                _ => break,
            }
        }
        if hc.expect.contains(status) {
            Ok(status)
        } else {
            Err(ProbeError::Status(status))
        }
    };
    match tokio::time::timeout(hc.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

/// `fairway check --probe`: one check to every server of every upstream (with the
/// upstream's `health_check` settings, or the defaults). Returns a table to print and
/// whether every upstream has at least one passing server.
pub async fn probe_all(
    cfg: &crate::config::Config,
    tls: &crate::tls::TlsMaterial,
) -> (String, bool) {
    let defaults: HealthCheckSection =
        toml::from_str("").unwrap_or_else(|_| unreachable!("every health_check key has a default"));
    let mut rows = vec![(
        "UPSTREAM".to_owned(),
        "SERVER".to_owned(),
        "RESULT".to_owned(),
    )];
    let mut all_ok = true;
    for (name, u) in &cfg.upstreams {
        let mut hc = HealthCheck::from_section(u.health_check.as_ref().unwrap_or(&defaults));
        hc.resolver = u.resolver.map(|a| a.0);
        let upstream_tls = tls.upstreams.get(name).cloned();
        let mut tasks = Vec::new();
        for e in &u.servers {
            let (hc, addr, t) = (hc.clone(), e.addr.clone(), upstream_tls.clone());
            tasks.push(tokio::spawn(async move {
                let target = Target::parse(&addr);
                let r = probe(&target, &addr, &hc, t.as_deref()).await;
                (addr, r)
            }));
        }
        let mut passing = 0;
        for t in tasks {
            let Ok((addr, result)) = t.await else {
                continue;
            };
            let text = match result {
                Ok(code) => {
                    passing += 1;
                    format!("ok ({code} on {})", hc.path)
                }
                Err(e) => format!("FAIL: {e} ({})", hc.path),
            };
            rows.push((name.clone(), addr, text));
        }
        if passing == 0 {
            all_ok = false;
        }
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (a, b, c) in rows {
        out.push_str(&format!("{a:<w0$}  {b:<w1$}  {c}\n"));
    }
    (out, all_ok)
}

/// `d` scaled by a random factor in [1 - spread, 1 + spread].
fn jitter(d: Duration, spread: f64) -> Duration {
    let r = (crate::timing::fast_random() % 10_000) as f64 / 10_000.0; // [0, 1)
    d.mul_f64(1.0 - spread + 2.0 * spread * r)
}

/// Checks one server until `cancel` fires or the server is gone, one check at a time: the
/// next starts `interval` after the previous one ended. Logs each state change once.
pub async fn run_checker(
    server: Weak<Server>,
    hc: HealthCheck,
    tls: Option<Arc<UpstreamTls>>,
    cancel: CancellationToken,
) {
    // The first check comes soon after start (a fresh start serves at once, CONTRACT §2),
    // spread over a fraction of the interval.
    let mut wait = jitter(hc.interval.min(Duration::from_millis(500)) / 2, 1.0);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // CONTRACT §2: the wait is counted from the end of this check (the sleep above runs
        // after the probe below returned), so checks never overlap whatever `timeout` is.
        // It is never shorter than `interval`, and up to 10% longer so that the checks of
        // many servers do not fire in lockstep.
        wait = hc.interval + jitter(hc.interval / 20, 1.0);
        let Some(s) = server.upgrade() else { return };
        let target = s.target.clone();
        let addr = Arc::clone(&s.name);
        drop(s);
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = probe(&target, &addr, &hc, tls.as_deref()) => r,
        };
        let Some(s) = server.upgrade() else { return };
        match result {
            Ok(_) => {
                s.metrics.checks_ok.inc();
                if s.health.record_success(hc.healthy_threshold) == Some(Transition::Up) {
                    s.on_transition(Transition::Up, "health check passed");
                }
            }
            Err(e) => {
                s.metrics.checks_failed.inc();
                tracing::debug!(upstream = %s.upstream, server = %s.addr, reason = %e, "health check failed");
                if s.health.record_failure(hc.unhealthy_threshold) == Some(Transition::Down) {
                    s.on_transition(Transition::Down, &format!("health check: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(1000), 0.1);
            assert!(
                d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
                "{d:?}"
            );
        }
    }
}
