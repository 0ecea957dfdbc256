//! A well-behaved client ([`Steady`]) that keeps GETting 200s from its own upstream behind
//! the proxy while a case misbehaves beside it, and the proxy set up around both ([`Bench`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{HttpClient, TestProxy, TestUpstream, admin};

/// A well-behaved client: GETs `/steady/N` in a loop on one keep-alive connection, and
/// notes every answer that is not a 200 from the `steady` upstream.
pub struct Steady {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Steady {
    /// Starts the loop once a first request has been answered (its connection is open).
    pub async fn start(proxy: SocketAddr) -> Steady {
        // At most one idle connection: a request that found the previous connection still
        // on its way back to the pool (a busy runtime) opens a second one, and whichever comes
        // back second is then closed, so the proxy soon counts one connection again.
        let c: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build_http();
        if let Err(e) = steady_get(&c, proxy, 0).await {
            panic!("the well-behaved client failed before the case began: {e}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let (mut ok, mut bad) = (0, Vec::new());
            let mut n = 1;
            while !s.load(Ordering::Relaxed) {
                match steady_get(&c, proxy, n).await {
                    Ok(()) => ok += 1,
                    Err(e) => bad.push(e),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, bad)
        });
        Steady { stop, task }
    }

    /// Stops the loop: every answer must have been a 200, and there must have been some.
    pub async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, bad) = self.task.await.unwrap();
        assert!(
            bad.is_empty(),
            "the well-behaved client was disturbed: {bad:?}"
        );
        assert!(
            ok >= 1,
            "the well-behaved client got no answer during the case"
        );
        ok
    }
}

pub async fn steady_get(c: &HttpClient, proxy: SocketAddr, n: usize) -> Result<(), String> {
    let req = Request::get(format!("http://{proxy}/steady/{n}"))
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .map_err(|_| format!("#{n}: no answer within 10 s"))?
        .map_err(|e| format!("#{n}: {e}"))?;
    let status = resp.status().as_u16();
    let from = resp
        .headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .map_err(|_| format!("#{n}: body not finished within 10 s"))?
        .map_err(|e| format!("#{n}: body failed: {e}"))?;
    if status != 200 || from.as_deref() != Some("steady") {
        return Err(format!("#{n}: {status} from {from:?}"));
    }
    Ok(())
}

/// A proxy with the case's upstream `app` on `/` and the well-behaved client's upstream
/// `steady` on `/steady`, the admin listener on, and the well-behaved client running.
pub struct Bench {
    pub proxy: TestProxy,
    steady: Option<Steady>,
    _steady_up: TestUpstream,
}

pub async fn bench(server_extra: &str, app: &[SocketAddr], app_extra: &str) -> Bench {
    let steady_up = TestUpstream::start("steady").await;
    let proxy = TestProxy::start(&config(server_extra, app, app_extra, steady_up.addr)).await;
    let steady = Steady::start(proxy.addr).await;
    Bench {
        proxy,
        steady: Some(steady),
        _steady_up: steady_up,
    }
}

pub fn config(
    server_extra: &str,
    app: &[SocketAddr],
    app_extra: &str,
    steady: SocketAddr,
) -> String {
    let servers: Vec<String> = app.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [{}]\n{app_extra}\n\n\
         [upstreams.steady]\nservers = [\"{steady}\"]\n\n\
         [[routes]]\npath_prefix = \"/steady\"\nupstream = \"steady\"\n\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
        servers.join(", ")
    )
}

impl Bench {
    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    pub fn url(&self, path: &str) -> String {
        self.proxy.url(path)
    }

    /// Stops the well-behaved client and checks that it only ever got 200s.
    pub async fn steady_ok(&mut self) -> usize {
        self.steady
            .take()
            .expect("steady client already finished")
            .finish()
            .await
    }

    /// The sum of the samples of metric `name` on the admin listener.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metric_where(name, &[]).await
    }

    /// The sum of the samples of metric `name` whose labels include `labels`.
    pub async fn metric_where(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        admin::metrics(&self.proxy).await.sum(name, labels)
    }
}
