//! The running proxy: [`App::start`] loads the config, binds the client and admin listeners
//! and spawns their accept loops; the returned [`AppHandle`] reports the bound addresses
//! (port 0 allowed), reloads, and shuts down gracefully. Used by `main`, `demo` and tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::admin;
use crate::config;
use crate::error::{ConfigError, KeyPath};
use crate::health::{self, Transition};
use crate::listener;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// State shared by every listener, connection and background task.
#[derive(Debug)]
pub struct Shared {
    /// The current snapshot; a request loads it once (CONTRACT §3, §6).
    pub runtime: ArcSwap<Runtime>,
    /// Fires on shutdown: listeners stop accepting, connections drain.
    pub stop: CancellationToken,
    /// Connection and tunnel tasks, waited for on shutdown.
    pub tracker: TaskTracker,
    /// Metric families and handles.
    pub metrics: Arc<Metrics>,
    /// The access log writer.
    pub access_log: AccessLog,
    /// The config file.
    pub config_path: PathBuf,
    /// When the process started serving.
    pub started: Instant,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is unusable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A listen address could not be bound.
    #[error("{path}: {key}: cannot listen on {addr}: {source}")]
    Bind {
        /// The config file.
        path: String,
        /// `server.listen` or `admin.listen`.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Entry point of the proxy.
pub struct App;

impl App {
    /// Loads `config_path`, binds every listener and starts serving.
    pub async fn start(config_path: impl AsRef<Path>) -> Result<AppHandle, StartError> {
        let path = config_path.as_ref().to_path_buf();
        let cfg = config::load(&path)?;
        for w in cfg.warnings() {
            tracing::warn!(config = %path.display(), "{w}");
        }
        let metrics = Arc::new(Metrics::new());
        let rt = Runtime::build(cfg, None, &metrics);
        let mut client_listeners = Vec::new();
        for &addr in &rt.config.server.listen.0 {
            let l = listener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    path: path.display().to_string(),
                    key: "server.listen",
                    addr,
                    source,
                })?;
            client_listeners.push(l);
        }
        let admin_listener =
            match rt.config.admin.listen {
                Some(config::Addr(addr)) => Some(TcpListener::bind(addr).await.map_err(
                    |source| StartError::Bind {
                        path: path.display().to_string(),
                        key: "admin.listen",
                        addr,
                        source,
                    },
                )?),
                None => None,
            };
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(rt),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics,
            access_log: AccessLog::start(),
            config_path: path,
            started: Instant::now(),
        });
        let mut client_addrs = Vec::new();
        for l in client_listeners {
            let addr = l.local_addr().map_err(|source| StartError::Bind {
                path: shared.config_path.display().to_string(),
                key: "server.listen",
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
            tracing::info!(listen = %addr, "accepting client connections");
            client_addrs.push(addr);
            tokio::spawn(listener::accept_loop(l, Arc::clone(&shared)));
        }
        let admin_addr = match admin_listener {
            Some(l) => {
                let addr = l.local_addr().ok();
                if let Some(a) = addr {
                    tracing::info!(listen = %a, "admin listener up");
                }
                tokio::spawn(admin::serve(l, Arc::clone(&shared)));
                addr
            }
            None => None,
        };
        reconcile_checkers(&shared, &shared.runtime.load_full());
        tokio::spawn(sweep_pools(Arc::clone(&shared)));
        Ok(AppHandle {
            shared,
            client_addrs,
            admin_addr,
        })
    }
}

/// Starts, restarts (settings changed) or stops the active checker of every server so that
/// it matches its upstream's `health_check` in `rt`. A checker stops by itself when its
/// server leaves every snapshot.
fn reconcile_checkers(shared: &Shared, rt: &Runtime) {
    for u in &rt.upstreams {
        for m in &u.members {
            let s = &m.server;
            let mut slot = s.checker.lock().unwrap_or_else(|e| e.into_inner());
            match (&u.health_check, slot.as_ref()) {
                (Some(hc), Some((running, _))) if running == hc => {}
                (Some(hc), _) => {
                    let token = shared.stop.child_token();
                    tokio::spawn(health::run_checker(
                        Arc::downgrade(s),
                        hc.clone(),
                        token.clone(),
                    ));
                    *slot = Some((hc.clone(), token.drop_guard()));
                }
                (None, Some(_)) => {
                    *slot = None;
                    if s.health.force_up(0) {
                        s.on_transition(Transition::Up, "health checks removed from the config");
                    }
                }
                (None, None) => {}
            }
        }
    }
}

/// Closes pooled connections that have been idle past `pool_idle_timeout`.
async fn sweep_pools(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rt = shared.runtime.load_full();
        for (u, s) in rt.servers() {
            s.pool.evict_expired(u.pool.idle_timeout);
        }
    }
}

/// A running proxy.
pub struct AppHandle {
    shared: Arc<Shared>,
    client_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl AppHandle {
    /// The bound client listener addresses, in config order.
    pub fn client_addrs(&self) -> &[SocketAddr] {
        &self.client_addrs
    }

    /// The bound admin listener address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The current runtime snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.runtime.load_full()
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Re-reads the config file and swaps in the new snapshot; returns the new
    /// `config_version`. On error the old snapshot stays.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        reload(&self.shared)
    }

    /// Stops accepting, lets in-flight requests finish up to `shutdown_timeout`, and returns
    /// whether everything drained in time.
    pub async fn shutdown(self) -> bool {
        shutdown(&self.shared).await
    }

    /// Runs until SIGTERM or SIGINT (then shuts down gracefully); SIGHUP reloads.
    pub async fn run_until_signal(self) -> std::io::Result<bool> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    let _ = self.reload();
                }
            }
        }
        tracing::info!("shutting down: draining connections");
        Ok(self.shutdown().await)
    }
}

/// One reload: load → validate → build → swap. Failures change nothing.
pub fn reload(shared: &Shared) -> Result<u64, ConfigError> {
    let path = &shared.config_path;
    let result = config::load(path).and_then(|cfg| {
        let old = shared.runtime.load_full();
        if cfg.server.listen != old.config.server.listen
            || cfg.admin.listen != old.config.admin.listen
        {
            return Err(ConfigError::other(
                path,
                Some(KeyPath::root().k("server").k("listen")),
                "changing listen addresses needs a restart".into(),
            ));
        }
        let rt = Runtime::build(cfg, Some(&old), &shared.metrics);
        let version = rt.version;
        old.forget_removed(&rt, &shared.metrics);
        let rt = Arc::new(rt);
        shared.runtime.store(Arc::clone(&rt));
        reconcile_checkers(shared, &rt);
        Ok(version)
    });
    shared.metrics.record_reload(result.is_ok());
    match &result {
        Ok(v) => tracing::info!(config = %path.display(), version = v, "config reloaded"),
        Err(e) => tracing::error!("config reload failed, keeping the old config: {e}"),
    }
    result
}

async fn shutdown(shared: &Shared) -> bool {
    let limit = shared.runtime.load().settings.shutdown_timeout;
    shared.stop.cancel();
    shared.tracker.close();
    let drained = tokio::time::timeout(limit, shared.tracker.wait())
        .await
        .is_ok();
    if drained {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!(timeout = ?limit, "shutdown_timeout passed with connections still open");
    }
    drained
}
