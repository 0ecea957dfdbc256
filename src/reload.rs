//! Hot reload (CONTRACT §6): one path — read → parse + validate → bind new listen
//! addresses → build → swap → start/stop checkers and listeners — run by the file watcher,
//! `SIGHUP` and `POST /reload`. A failure at any step changes nothing.
//!
//! The watcher watches the config file's directory (editors rename a temp file over the
//! config; Kubernetes swaps the `..data` symlink of a mounted ConfigMap, and no event then
//! names the file), debounces bursts, and reloads only when the content hash changed. A
//! 1-second poll of the file's metadata backs it up where inotify sees nothing.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::app::{Shared, reconcile_checkers};
use crate::config;
use crate::error::{ConfigError, KeyPath};
use crate::runtime::{Files, Runtime};

/// How long a burst of file events is collected before one reload.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The metadata poll behind inotify.
const POLL: Duration = Duration::from_secs(1);

/// What the file held at the last reload attempt: a hash of its bytes, or of the read error.
pub type ContentHash = u64;

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

/// The files besides the config whose changes trigger a reload.
fn extra_files(shared: &Shared) -> Vec<PathBuf> {
    Files::paths(&shared.runtime.load().config, &shared.config_path)
}

/// Reloads unconditionally (SIGHUP, `POST /reload`); returns the new `config_version`.
pub fn reload(shared: &Arc<Shared>) -> Result<u64, ConfigError> {
    let _one_at_a_time = shared.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
    let content = std::fs::read_to_string(&shared.config_path);
    apply(shared, content)
}

/// Reloads if the file's content (or a certificate's) differs from what the last attempt
/// saw (the watcher).
fn reload_if_changed(shared: &Arc<Shared>) -> Option<Result<u64, ConfigError>> {
    let _one_at_a_time = shared.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
    let content = std::fs::read_to_string(&shared.config_path);
    let hash = fingerprint(&content, &extra_files(shared));
    if *shared.config_hash.lock().unwrap_or_else(|e| e.into_inner()) == Some(hash) {
        return None;
    }
    Some(apply(shared, content))
}

fn apply(
    shared: &Arc<Shared>,
    content: Result<String, std::io::Error>,
) -> Result<u64, ConfigError> {
    let path = &shared.config_path;
    let result = match &content {
        Ok(text) => config::parse(path, text).and_then(|cfg| swap(shared, cfg)),
        Err(e) => Err(ConfigError::io(path, e)),
    };
    // After the swap, so that the hash covers the certificate files the new config names.
    let hash = fingerprint(&content, &extra_files(shared));
    *shared.config_hash.lock().unwrap_or_else(|e| e.into_inner()) = Some(hash);
    shared.metrics.record_reload(result.is_ok());
    match &result {
        Ok(v) => tracing::info!(config = %path.display(), version = v, "config reloaded"),
        Err(e) => tracing::error!("config reload failed, keeping the old config: {e}"),
    }
    result
}

fn swap(shared: &Arc<Shared>, cfg: config::Config) -> Result<u64, ConfigError> {
    let path = &shared.config_path;
    for w in cfg.warnings() {
        tracing::warn!(config = %path.display(), "{w}");
    }
    let mut files = Files::load(&cfg, path, false)?;
    {
        let mut cache = shared.dns.lock().unwrap_or_else(|e| e.into_inner());
        files.resolved = crate::resolve::resolve_missing(&cfg, &cache, &shared.metrics);
        *cache = files.resolved.clone();
    }
    let mut listeners = shared.listeners.lock().unwrap_or_else(|e| e.into_inner());
    let prepared = listeners.prepare(&cfg).map_err(|e| {
        let (section, key) = e.key.split_once('.').unwrap_or((e.key, ""));
        ConfigError::other(
            path,
            Some(KeyPath::root().k(section).k(key)),
            format!("cannot listen on {}: {}", e.addr, e.source),
        )
    })?;
    let old = shared.runtime.load_full();
    let rt = Arc::new(Runtime::build(cfg, Some(&old), &shared.metrics, files));
    old.forget_removed(&rt, &shared.metrics);
    shared.runtime.store(Arc::clone(&rt));
    if let Err(e) = listeners.commit(prepared, shared) {
        tracing::error!(error = %e, "could not start a new listener");
    }
    drop(listeners);
    reconcile_checkers(shared, &rt);
    shared.maintenance.publish(&rt, &shared.metrics);
    Ok(rt.version)
}

/// The directory to watch for `path`.
fn watch_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Identity of the file the path leads to (symlinks followed), for the poll.
fn file_identity(path: &Path) -> Option<(u64, u64, Option<std::time::SystemTime>, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.modified().ok(), m.len()))
}

/// Whether a file event may mean the config changed. Our own reads produce `Access(Open)`
/// and `Access(Close(Read))`; reacting to those would loop forever.
fn is_relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches the config file until shutdown.
pub fn spawn_watcher(shared: Arc<Shared>) {
    let dir = watch_dir(&shared.config_path);
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && is_relevant(&ev.kind)
        {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; polling it every second instead");
            None
        }
    };
    let mut watched = vec![dir];
    tokio::spawn(async move {
        let mut watcher = watcher;
        let mut tick = crate::timing::ticker(POLL);
        let identities = |shared: &Shared| {
            std::iter::once(shared.config_path.clone())
                .chain(extra_files(shared))
                .map(|f| file_identity(&f))
                .collect::<Vec<_>>()
        };
        let mut identity = identities(&shared);
        watch_certificate_dirs(&shared, watcher.as_mut(), &mut watched);
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {
                    if identities(&shared) == identity {
                        continue;
                    }
                    // A writer may be half-way through: let it finish, as for events.
                    tokio::time::sleep(DEBOUNCE).await;
                }
            }
            let s = Arc::clone(&shared);
            let _ = tokio::task::spawn_blocking(move || reload_if_changed(&s)).await;
            identity = identities(&shared);
            watch_certificate_dirs(&shared, watcher.as_mut(), &mut watched);
        }
    });
}

/// Certificates may live in other directories than the config: watch those too.
fn watch_certificate_dirs(
    shared: &Shared,
    watcher: Option<&mut notify::RecommendedWatcher>,
    watched: &mut Vec<PathBuf>,
) {
    let Some(w) = watcher else { return };
    for f in extra_files(shared) {
        let d = watch_dir(&f);
        if !watched.contains(&d) {
            if let Err(e) = w.watch(&d, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch a certificate directory; polling it");
            }
            watched.push(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_reads_are_not_relevant() {
        assert!(!is_relevant(&EventKind::Access(AccessKind::Open(
            notify::event::AccessMode::Any
        ))));
        assert!(!is_relevant(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_relevant(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_relevant(&EventKind::Any));
    }

    #[test]
    fn the_directory_of_a_bare_file_name_is_the_current_one() {
        assert_eq!(watch_dir(Path::new("fairway.toml")), PathBuf::from("."));
        assert_eq!(
            watch_dir(Path::new("/etc/fairway/fairway.toml")),
            PathBuf::from("/etc/fairway")
        );
    }

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
