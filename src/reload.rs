//! The config file watcher (CONTRACT §6): a change to the file, or to a certificate it
//! names, reloads through the control plane's one apply path (`control`), as `SIGHUP` and
//! `POST /reload` do.
//!
//! The watcher watches the config file's directory (editors rename a temp file over the
//! config; Kubernetes swaps the `..data` symlink of a mounted ConfigMap, and no event then
//! names the file), debounces bursts, and reloads only when the content hash changed. A
//! 1-second poll of the file's metadata backs it up where inotify sees nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::control::Control;

/// How long a burst of file events is collected before one reload.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The metadata poll behind inotify.
const POLL: Duration = Duration::from_secs(1);

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
pub fn spawn_watcher(control: Arc<Control>) {
    let dir = watch_dir(&control.config_path);
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
        let identities = |control: &Control| {
            std::iter::once(control.config_path.clone())
                .chain(control.extra_files())
                .map(|f| file_identity(&f))
                .collect::<Vec<_>>()
        };
        let mut identity = identities(&control);
        watch_certificate_dirs(&control, watcher.as_mut(), &mut watched);
        loop {
            tokio::select! {
                _ = control.ctx.stop.cancelled() => return,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {
                    if identities(&control) == identity {
                        continue;
                    }
                    // A writer may be half-way through: let it finish, as for events.
                    tokio::time::sleep(DEBOUNCE).await;
                }
            }
            let c = Arc::clone(&control);
            let _ = tokio::task::spawn_blocking(move || c.reload_if_changed()).await;
            identity = identities(&control);
            watch_certificate_dirs(&control, watcher.as_mut(), &mut watched);
        }
    });
}

/// Certificates may live in other directories than the config: watch those too.
fn watch_certificate_dirs(
    control: &Control,
    watcher: Option<&mut notify::RecommendedWatcher>,
    watched: &mut Vec<PathBuf>,
) {
    let Some(w) = watcher else { return };
    for f in control.extra_files() {
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
}
