//! The running proxy: [`App::start`] puts the first config in force through the control
//! plane (which binds the client and admin listeners) and spawns the background tasks (the
//! file watcher, DNS re-resolution, pool sweeping, the stats sampler); the returned
//! [`AppHandle`] reports the bound addresses (port 0 allowed), reloads, and shuts down
//! gracefully. Used by `main`, `demo` and tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::context::Context;
use crate::control::Control;
use crate::error::ConfigError;
use crate::runtime::Runtime;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is unusable, or a listen address cannot be bound.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Anything else at startup.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Entry point of the proxy.
pub struct App;

impl App {
    /// Loads `config_path`, binds every listener and starts serving; watches the file.
    pub async fn start(config_path: impl AsRef<Path>) -> Result<AppHandle, StartError> {
        let control =
            Control::start(config_path.as_ref().to_path_buf(), crate::admin::spawn).await?;
        let ctx = Arc::clone(&control.ctx);
        tokio::spawn(sweep_pools(Arc::clone(&ctx)));
        tokio::spawn(crate::stats::run(
            Arc::clone(&ctx),
            Arc::clone(&control.stats),
        ));
        if let Some(&release) = MEMORY_RELEASE.get() {
            tokio::spawn(release_memory(Arc::clone(&ctx), release));
        }
        crate::reload::spawn_watcher(Arc::clone(&control));
        tokio::spawn(crate::dns::run(Arc::clone(&control)));
        Ok(AppHandle { control })
    }
}

/// Closes pooled connections that have been idle past `pool_idle_timeout`, and the oldest
/// beyond `max_idle_per_server` that a burst left ([`crate::client::Pool`]).
async fn sweep_pools(ctx: Arc<Context>) {
    let mut tick = crate::timing::ticker(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rt = ctx.runtime.load_full();
        for (u, s) in rt.servers() {
            s.pool.sweep(u.pool.idle_timeout, u.pool.max_idle);
        }
    }
}

/// How often the allocator is asked to hand free memory back to the kernel.
pub const MEMORY_RELEASE_PERIOD: Duration = Duration::from_secs(5);

static MEMORY_RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers a function that hands the allocator's free memory back to the kernel (the
/// binary's runs jemalloc's decay). Every app started afterwards calls it every
/// [`MEMORY_RELEASE_PERIOD`] on a blocking thread, like HAProxy trims its pools: an
/// allocator returns pages as it works, so after a burst of connections an idle process
/// would otherwise stay at its high-water mark. The first registration wins.
pub fn release_memory_with(release: fn()) {
    let _ = MEMORY_RELEASE.set(release);
}

async fn release_memory(ctx: Arc<Context>, release: fn()) {
    let mut tick = crate::timing::ticker(MEMORY_RELEASE_PERIOD);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Walks every arena: kept off the runtime's worker threads.
        let _ = tokio::task::spawn_blocking(release).await;
    }
}

/// A running proxy.
pub struct AppHandle {
    control: Arc<Control>,
}

impl AppHandle {
    /// The bound client listener addresses, in config order.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.control.client_addrs()
    }

    /// The bound admin listener address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.control.admin_addr()
    }

    /// The bound `redirect_http` address, if any.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.control.redirect_addr()
    }

    /// The current runtime snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.control.ctx.runtime.load_full()
    }

    /// The data path's shared state (its `stop` token ends the proxy without a drain).
    pub fn shared(&self) -> &Arc<Context> {
        &self.control.ctx
    }

    /// The control plane.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Re-reads the config file and swaps in the new snapshot; returns the new
    /// `config_version`. On error the old snapshot stays.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        self.control.reload()
    }

    /// Stops accepting, lets in-flight requests finish up to `shutdown_timeout`, and returns
    /// whether everything drained in time.
    pub async fn shutdown(self) -> bool {
        shutdown(&self.control).await
    }

    /// Runs until SIGTERM or SIGINT (then shuts down gracefully); SIGHUP reloads; SIGUSR2
    /// starts a new fairway from the same executable and, once it serves, drains this one
    /// (see `upgrade`).
    pub async fn run_until_signal(self) -> std::io::Result<bool> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        // Ready only once the signals are handled: a SIGTERM from now on drains.
        crate::upgrade::report_ready().await;
        let mut upgrading: Option<tokio::task::JoinHandle<_>> = None;
        let mut handed_over = false;
        loop {
            let upgraded = async {
                match upgrading.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    let control = Arc::clone(&self.control);
                    let _ = tokio::task::spawn_blocking(move || control.reload()).await;
                }
                _ = usr2.recv() => {
                    if upgrading.is_some() {
                        tracing::warn!("SIGUSR2 ignored: an upgrade is under way");
                        continue;
                    }
                    tracing::info!("SIGUSR2: starting a new process to take over");
                    let control = Arc::clone(&self.control);
                    upgrading = Some(tokio::spawn(async move {
                        crate::upgrade::start_new_process(&control).await
                    }));
                }
                done = upgraded => {
                    upgrading = None;
                    match done {
                        Ok(Ok(pid)) => {
                            tracing::info!(pid, "upgrade: the new process serves; draining this one");
                            // Until this process exits, a further SIGUSR2 changes nothing.
                            tokio::spawn(async move {
                                while usr2.recv().await.is_some() {
                                    tracing::warn!("SIGUSR2 ignored: this process is handing over to {pid}");
                                }
                            });
                            handed_over = true;
                            break;
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "upgrade failed; this process keeps serving"),
                        Err(e) => tracing::error!(error = %e, "upgrade failed; this process keeps serving"),
                    }
                }
            }
        }
        tracing::info!("shutting down: draining connections");
        if !handed_over {
            // After a hand-over systemd follows the new process: this one's exit is no stop.
            crate::inherit::notify("STOPPING=1");
        }
        Ok(self.shutdown().await)
    }
}

async fn shutdown(control: &Control) -> bool {
    let ctx = &control.ctx;
    let limit = ctx.runtime.load().settings.shutdown_timeout;
    let accepting = control.stop_listening();
    ctx.signal_stop();
    // Listening sockets are closed before the drain starts.
    for task in accepting {
        let _ = task.await;
    }
    let drained = tokio::time::timeout(limit, ctx.drain()).await.is_ok();
    ctx.workers.end();
    if drained {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!(timeout = ?limit, "shutdown_timeout passed with connections still open");
    }
    drained
}
