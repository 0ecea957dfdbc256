//! The control plane: [`Control`] owns what changes the running proxy (the listening
//! sockets, the config file and its fingerprint, the cache of resolved server addresses) and
//! [`Control::apply`] is the one function that puts a config in force, in one order, for
//! every trigger: startup, the file watcher, `SIGHUP`, `POST /reload` and a DNS change.
//!
//! ```text
//! read → parse + validate → load files → resolve names → prepare listeners → build the
//! runtime → forget removed servers → store → commit listeners → reconcile checkers →
//! publish maintenance
//! ```
//!
//! Every step before the store can fail, and a failure changes nothing: the old snapshot
//! keeps serving (CONTRACT §6).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::context::Context;
use crate::error::{ConfigError, KeyPath};
use crate::health::Transition;
use crate::metrics::Metrics;
use crate::resolve::Resolved;
use crate::runtime::{Files, Runtime};
use crate::server::Checker;
use crate::sockets::ListenerSet;
use crate::stats::Stats;
use crate::workers::Workers;

/// Serves the admin listener. The admin module sits above the control plane (its
/// `POST /reload` calls [`Control::reload`]), so the app hands its server in.
pub type AdminServer = fn(TcpListener, Arc<Control>, CancellationToken) -> JoinHandle<()>;

/// What the config file held at the last reload attempt: a hash of its bytes (or of the read
/// error) and of the files it names.
pub type ContentHash = u64;

/// What starts an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first config, at startup.
    Start,
    /// A reload: the file watcher, `SIGHUP` or `POST /reload`.
    Reload,
    /// Resolved addresses changed: the same config again, with the new addresses.
    Resolved,
}

/// The running proxy's control plane.
pub struct Control {
    /// The data path's shared state; new snapshots are stored in it.
    pub ctx: Arc<Context>,
    /// The config file.
    pub config_path: PathBuf,
    /// When the process started serving.
    pub started: Instant,
    /// The servers' samples of the last minute, taken by `stats::run`, read by `/stats`.
    pub stats: Arc<Stats>,
    /// The outcome of the last reload attempt, if there was one.
    last_reload: Mutex<Option<ReloadOutcome>>,
    admin: AdminServer,
    /// Held through an apply: applies never interleave.
    applying: Mutex<()>,
    /// The bound listeners.
    listeners: Mutex<ListenerSet>,
    /// What the config file held at the last reload attempt.
    config_hash: Mutex<Option<ContentHash>>,
    /// The last good addresses of servers given by host name.
    resolved: Mutex<Resolved>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Control {
    /// Starts the proxy on `config_path`: the first config goes through [`Control::apply`]
    /// like every later one. Name lookups and file reads block, so this runs on the
    /// blocking pool.
    pub async fn start(
        config_path: PathBuf,
        admin: AdminServer,
    ) -> Result<Arc<Control>, ConfigError> {
        let metrics = Arc::new(Metrics::new());
        let workers = Workers::start(crate::workers::count())
            .map_err(|e| ConfigError::other(&config_path, None, format!("startup failed: {e}")))?;
        let control = Arc::new(Control {
            ctx: Arc::new(Context::new(
                Runtime::before_start(&metrics),
                metrics,
                workers,
            )),
            config_path,
            started: Instant::now(),
            stats: Arc::new(Stats::default()),
            last_reload: Mutex::new(None),
            admin,
            applying: Mutex::new(()),
            listeners: Mutex::new(ListenerSet::with_inherited(crate::inherit::take_adopted())),
            config_hash: Mutex::new(None),
            resolved: Mutex::new(Resolved::new()),
        });
        let c = Arc::clone(&control);
        tokio::task::spawn_blocking(move || c.apply(Trigger::Start))
            .await
            .map_err(|e| {
                ConfigError::other(&control.config_path, None, format!("startup failed: {e}"))
            })??;
        lock(&control.listeners).close_leftovers();
        Ok(control)
    }

    /// Reloads unconditionally (`SIGHUP`, `POST /reload`); returns the new
    /// `config_version`.
    pub fn reload(self: &Arc<Self>) -> Result<u64, ConfigError> {
        self.apply(Trigger::Reload)
    }

    /// Reloads if the file's content (or a certificate's) differs from what the last
    /// attempt saw (the watcher).
    pub fn reload_if_changed(self: &Arc<Self>) -> Option<Result<u64, ConfigError>> {
        let content = std::fs::read_to_string(&self.config_path);
        let hash = fingerprint(&content, &self.extra_files());
        if *lock(&self.config_hash) == Some(hash) {
            return None;
        }
        Some(self.apply(Trigger::Reload))
    }

    /// Records freshly resolved addresses; applies them if any changed.
    pub fn update_resolved(
        self: &Arc<Self>,
        results: Vec<(String, String, std::io::Result<Vec<SocketAddr>>)>,
    ) {
        let mut changed = false;
        {
            let mut cache = lock(&self.resolved);
            for (upstream, addr, r) in results {
                match r {
                    Ok(v) => {
                        self.ctx.metrics.record_dns(&upstream, true);
                        let key = (upstream, addr);
                        if cache.get(&key) != Some(&v) {
                            tracing::info!(upstream = %key.0, server = %key.1, addresses = ?v, "resolved addresses changed");
                            cache.insert(key, v);
                            changed = true;
                        }
                    }
                    Err(e) => {
                        self.ctx.metrics.record_dns(&upstream, false);
                        tracing::warn!(upstream = %upstream, server = %addr, error = %e, "resolution failed; keeping the last good addresses");
                    }
                }
            }
        }
        if changed && let Err(e) = self.apply(Trigger::Resolved) {
            tracing::error!("applying resolved addresses failed: {e}");
        }
    }

    /// Puts a config in force: the one path for every trigger (module docs). Returns the
    /// `config_version` now in force.
    pub fn apply(self: &Arc<Self>, trigger: Trigger) -> Result<u64, ConfigError> {
        let _one_at_a_time = lock(&self.applying);
        let path = &self.config_path;
        let old = self.ctx.runtime.load_full();
        let (cfg, mut files, content) = match trigger {
            Trigger::Resolved => (Config::clone(&old.config), old.files.clone(), None),
            Trigger::Start | Trigger::Reload => {
                let content = std::fs::read_to_string(path);
                match self.read(&content) {
                    Ok((cfg, files)) => (cfg, files, Some(content)),
                    Err(e) => return Err(self.failed(trigger, &content, e)),
                }
            }
        };
        {
            let mut cache = lock(&self.resolved);
            if trigger != Trigger::Resolved {
                *cache = crate::resolve::resolve_missing(&cfg, &cache, &self.ctx.metrics);
            }
            files.resolved = cache.clone();
        }
        let prepared = match lock(&self.listeners).prepare(&cfg) {
            Ok(p) => p,
            Err(e) => {
                let (section, key) = e.key.split_once('.').unwrap_or((e.key, ""));
                let err = ConfigError::other(
                    path,
                    Some(KeyPath::root().k(section).k(key)),
                    format!("cannot listen on {}: {}", e.addr, e.source),
                );
                return Err(match &content {
                    Some(c) => self.failed(trigger, c, err),
                    None => err,
                });
            }
        };
        let mut rt = Runtime::build(cfg, Some(&old), &self.ctx.metrics, files);
        if trigger == Trigger::Resolved {
            // The same config: the same version.
            rt.version = old.version;
        }
        let rt = Arc::new(rt);
        old.forget_removed(&rt, &self.ctx.metrics);
        self.ctx.runtime.store(Arc::clone(&rt));
        let admin =
            |l: TcpListener, stop: CancellationToken| (self.admin)(l, Arc::clone(self), stop);
        if let Err(e) = lock(&self.listeners).commit(prepared, &self.ctx, &admin) {
            tracing::error!(error = %e, "could not start a new listener");
        }
        self.reconcile_checkers(&rt);
        self.ctx.maintenance.publish(&rt, &self.ctx.metrics);
        if let Some(content) = &content {
            // After the store, so that the hash covers the files the new config names.
            *lock(&self.config_hash) = Some(fingerprint(content, &self.extra_files()));
        }
        match trigger {
            Trigger::Start => {
                tracing::info!(config = %path.display(), version = rt.version, "config loaded")
            }
            Trigger::Reload => {
                self.ctx.metrics.record_reload(true);
                self.record_reload(Ok(rt.version));
                tracing::info!(config = %path.display(), version = rt.version, "config reloaded");
            }
            Trigger::Resolved => {}
        }
        Ok(rt.version)
    }

    /// Parses and validates the file's content and reads every file it names.
    fn read(
        &self,
        content: &Result<String, std::io::Error>,
    ) -> Result<(Config, Files), ConfigError> {
        let path = &self.config_path;
        let text = content.as_ref().map_err(|e| ConfigError::io(path, e))?;
        let cfg = config::parse(path, text)?;
        for w in cfg.warnings() {
            tracing::warn!(config = %path.display(), "{w}");
        }
        let files = Files::load(&cfg, path, false)?;
        Ok((cfg, files))
    }

    /// A failed apply changes nothing but the record of what the file held, the reload
    /// metrics and the log.
    fn failed(
        &self,
        trigger: Trigger,
        content: &Result<String, std::io::Error>,
        e: ConfigError,
    ) -> ConfigError {
        *lock(&self.config_hash) = Some(fingerprint(content, &self.extra_files()));
        if trigger == Trigger::Reload {
            self.ctx.metrics.record_reload(false);
            self.record_reload(Err(e.to_string()));
            tracing::error!("config reload failed, keeping the old config: {e}");
        }
        e
    }

    fn record_reload(&self, result: Result<u64, String>) {
        *lock(&self.last_reload) = Some(ReloadOutcome {
            at: SystemTime::now(),
            result,
        });
    }

    /// The outcome of the last reload attempt (file watcher, `SIGHUP`, `POST /reload`);
    /// `None` before the first.
    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        lock(&self.last_reload).clone()
    }

    /// The files besides the config whose changes trigger a reload.
    pub fn extra_files(&self) -> Vec<PathBuf> {
        Files::paths(&self.ctx.runtime.load().config, &self.config_path)
    }

    /// Starts, restarts (settings changed) or stops the active checker of every server so
    /// that it matches its upstream's `health_check` in `rt`. A checker stops by itself
    /// when its server leaves every snapshot.
    fn reconcile_checkers(&self, rt: &Runtime) {
        for u in &rt.upstreams {
            for m in &u.members {
                let s = &m.server;
                let mut slot = lock(&s.checker);
                let same_tls = |c: &Checker| match (&c.tls, &u.tls) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.fingerprint == b.fingerprint,
                    _ => false,
                };
                match (&u.health_check, slot.as_ref()) {
                    (Some(hc), Some(c)) if c.settings == *hc && same_tls(c) => {}
                    (Some(hc), _) => {
                        let token = self.ctx.stop.child_token();
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
                            s.on_transition(
                                Transition::Up,
                                "health checks removed from the config",
                            );
                        }
                    }
                    (None, None) => {}
                }
            }
        }
    }

    /// The bound client listener addresses, in config order.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        lock(&self.listeners).client_addrs()
    }

    /// The bound admin listener address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        lock(&self.listeners).admin_addr()
    }

    /// The bound `redirect_http` address, if any.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        lock(&self.listeners).redirect_addr()
    }

    /// Duplicates of every listening socket, for a new process (`upgrade`).
    pub fn handover(&self) -> std::io::Result<Vec<(crate::inherit::Role, std::os::fd::OwnedFd)>> {
        lock(&self.listeners).handover()
    }

    /// Closes every listening socket; returns their accept tasks to wait for.
    pub fn stop_listening(&self) -> Vec<JoinHandle<()>> {
        lock(&self.listeners).stop_all()
    }
}

/// How a reload attempt ended.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// When it ended.
    pub at: SystemTime,
    /// The `config_version` put in force, or the error (the old config stayed).
    pub result: Result<u64, String>,
}

/// The hash of what reading the config file gave.
pub fn hash_of(content: &Result<String, std::io::Error>) -> ContentHash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match content {
        Ok(text) => text.hash(&mut h),
        Err(e) => format!("error: {:?}", e.kind()).hash(&mut h),
    }
    h.finish()
}

/// The config text's hash combined with those of the certificate, key and CA files the
/// current config names: a renewed certificate is a change too.
pub fn fingerprint(content: &Result<String, std::io::Error>, files: &[PathBuf]) -> ContentHash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    hash_of(content).hash(&mut h);
    for f in files {
        match std::fs::read(f) {
            Ok(b) => b.hash(&mut h),
            Err(e) => format!("error: {:?}", e.kind()).hash(&mut h),
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hashes_tell_text_and_errors_apart() {
        let a = hash_of(&Ok("a".into()));
        let b = hash_of(&Ok("b".into()));
        let gone = hash_of(&Err(std::io::Error::from(std::io::ErrorKind::NotFound)));
        assert_ne!(a, b);
        assert_ne!(a, gone);
        assert_eq!(
            gone,
            hash_of(&Err(std::io::Error::from(std::io::ErrorKind::NotFound)))
        );
    }
}
