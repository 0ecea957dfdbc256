//! The running proxy: [`App::start`] loads the config, binds the client and admin listeners
//! and spawns their accept loops; the returned [`AppHandle`] reports the bound addresses
//! (port 0 allowed), reloads, and shuts down gracefully. Used by `main`, `demo` and tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::config;
use crate::error::ConfigError;
use crate::health::Transition;
use crate::listeners::{BindError, ListenerSet};
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::reload;
use crate::runtime::{Files, Runtime};
use crate::server::Checker;

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
    /// The bound listeners.
    pub listeners: Mutex<ListenerSet>,
    /// Serialises reloads (watcher, SIGHUP, `POST /reload`).
    pub reload_lock: Mutex<()>,
    /// What the config file held at the last reload attempt.
    pub config_hash: Mutex<Option<reload::ContentHash>>,
    /// The maintenance switch.
    pub maintenance: Maintenance,
    /// The last good addresses of servers given by host name.
    pub dns: Mutex<crate::resolve::Resolved>,
}

impl Shared {
    /// The listener set, locked briefly (never across an await).
    pub fn listeners(&self) -> std::sync::MutexGuard<'_, ListenerSet> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is unusable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A listen address could not be bound.
    #[error("{path}: {source}")]
    Bind {
        /// The config file.
        path: String,
        /// The address and why.
        #[source]
        source: BindError,
    },
    /// Anything else at startup.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Entry point of the proxy.
pub struct App;

impl App {
    /// Loads `config_path`, binds every listener and starts serving; watches the file.
    pub async fn start(config_path: impl AsRef<Path>) -> Result<AppHandle, StartError> {
        let path = config_path.as_ref().to_path_buf();
        let read = std::fs::read_to_string(&path);
        let text = match &read {
            Ok(t) => t.clone(),
            Err(e) => return Err(ConfigError::io(&path, e).into()),
        };
        let cfg = config::parse(&path, &text)?;
        let content_hash = reload::fingerprint(&read, &Files::paths(&cfg, &path));
        for w in cfg.warnings() {
            tracing::warn!(config = %path.display(), "{w}");
        }
        let mut files = Files::load(&cfg, &path, false)?;
        // Name lookups block: keep them off the async workers.
        let for_dns = cfg.clone();
        let metrics = Arc::new(Metrics::new());
        let dns_metrics = Arc::clone(&metrics);
        files.resolved = tokio::task::spawn_blocking(move || {
            crate::resolve::resolve_missing(
                &for_dns,
                &crate::resolve::Resolved::new(),
                &dns_metrics,
            )
        })
        .await
        .unwrap_or_default();
        let dns_cache = files.resolved.clone();
        let mut listeners = ListenerSet::default();
        let prepared = listeners.prepare(&cfg).map_err(|source| StartError::Bind {
            path: path.display().to_string(),
            source,
        })?;
        let rt = Runtime::build(cfg, None, &metrics, files);
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(rt),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics,
            access_log: AccessLog::start(),
            config_path: path,
            started: Instant::now(),
            listeners: Mutex::new(ListenerSet::default()),
            reload_lock: Mutex::new(()),
            config_hash: Mutex::new(Some(content_hash)),
            maintenance: Maintenance::default(),
            dns: Mutex::new(dns_cache),
        });
        shared
            .maintenance
            .publish(&shared.runtime.load(), &shared.metrics);
        listeners.commit(prepared, &shared)?;
        *shared.listeners.lock().unwrap_or_else(|e| e.into_inner()) = listeners;
        reconcile_checkers(&shared, &shared.runtime.load_full());
        tokio::spawn(sweep_pools(Arc::clone(&shared)));
        if let Some(&release) = MEMORY_RELEASE.get() {
            tokio::spawn(release_memory(Arc::clone(&shared), release));
        }
        reload::spawn_watcher(Arc::clone(&shared));
        tokio::spawn(crate::dns::run(Arc::clone(&shared)));
        Ok(AppHandle { shared })
    }
}

/// Starts, restarts (settings changed) or stops the active checker of every server so that
/// it matches its upstream's `health_check` in `rt`. A checker stops by itself when its
/// server leaves every snapshot.
pub(crate) fn reconcile_checkers(shared: &Shared, rt: &Runtime) {
    for u in &rt.upstreams {
        for m in &u.members {
            let s = &m.server;
            let mut slot = s.checker.lock().unwrap_or_else(|e| e.into_inner());
            let same_tls = |c: &Checker| match (&c.tls, &u.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => a.fingerprint == b.fingerprint,
                _ => false,
            };
            match (&u.health_check, slot.as_ref()) {
                (Some(hc), Some(c)) if c.settings == *hc && same_tls(c) => {}
                (Some(hc), _) => {
                    let token = shared.stop.child_token();
                    tokio::spawn(crate::checker::run_checker(
                        Arc::downgrade(s),
                        hc.clone(),
                        u.tls.clone(),
                        token.clone(),
                    ));
                    *slot = Some(Checker {
                        settings: hc.clone(),
                        tls: u.tls.clone(),
                        _stop: token.drop_guard(),
                    });
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
    let mut tick = crate::timing::ticker(Duration::from_secs(1));
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

/// How often the allocator is asked to hand free memory back to the kernel.
pub const MEMORY_RELEASE_PERIOD: Duration = Duration::from_secs(5);

static MEMORY_RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers a function that hands the allocator's free memory back to the kernel (the
/// binary's is glibc's `malloc_trim`). Every app started afterwards calls it every
/// [`MEMORY_RELEASE_PERIOD`] on a blocking thread, like HAProxy trims its pools: glibc keeps
/// memory freed by other threads' arenas, so after a burst of connections RSS would
/// otherwise stay at its high-water mark. The first registration wins.
pub fn release_memory_with(release: fn()) {
    let _ = MEMORY_RELEASE.set(release);
}

async fn release_memory(shared: Arc<Shared>, release: fn()) {
    let mut tick = crate::timing::ticker(MEMORY_RELEASE_PERIOD);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Walks every arena: kept off the runtime's worker threads.
        let _ = tokio::task::spawn_blocking(release).await;
    }
}

/// A running proxy.
pub struct AppHandle {
    shared: Arc<Shared>,
}

impl AppHandle {
    /// The bound client listener addresses, in config order.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.shared.listeners().client_addrs()
    }

    /// The bound admin listener address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.shared.listeners().admin_addr()
    }

    /// The bound `redirect_http` address, if any.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.shared.listeners().redirect_addr()
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
        reload::reload(&self.shared)
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
                    let shared = Arc::clone(&self.shared);
                    let _ = tokio::task::spawn_blocking(move || reload::reload(&shared)).await;
                }
            }
        }
        tracing::info!("shutting down: draining connections");
        Ok(self.shutdown().await)
    }
}

async fn shutdown(shared: &Shared) -> bool {
    let limit = shared.runtime.load().settings.shutdown_timeout;
    let accepting = shared.listeners().stop_all();
    shared.stop.cancel();
    // Listening sockets are closed before the drain starts.
    for task in accepting {
        let _ = task.await;
    }
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
