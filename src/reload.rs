//! The config file watcher (CONTRACT §6): a change to the file, or to a certificate it
//! names, reloads through the control plane's one apply path (`control`), as `SIGHUP` and
//! `POST /reload` do.
//!
//! The watcher watches the config file's directory (editors rename a temp file over the
//! config; Kubernetes swaps the `..data` symlink of a mounted ConfigMap, and no event then
//! names the file), debounces bursts, and reloads only when the content hash changed. A
//! 1-second poll of the file's metadata backs it up where inotify sees nothing. Reads and
//! opens in the directory are not watched: they wake nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// Watches the config file until shutdown.
pub fn spawn_watcher(control: Arc<Control>) {
    let dir = watch_dir(&control.config_path);
    tokio::spawn(async move {
        let mut events = match DirEvents::new() {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config directory; polling it every second instead");
                None
            }
        };
        let mut watched = Vec::new();
        watch_dirs(
            events.as_ref(),
            std::iter::once(dir).chain(control.extra_files().iter().map(|f| watch_dir(f))),
            &mut watched,
        );
        let mut tick = crate::timing::ticker(POLL);
        let identities = |control: &Control| {
            std::iter::once(control.config_path.clone())
                .chain(control.extra_files())
                .map(|f| file_identity(&f))
                .collect::<Vec<_>>()
        };
        let mut identity = identities(&control);
        loop {
            tokio::select! {
                _ = control.ctx.stop.cancelled() => return,
                seen = next_event(events.as_mut()) => {
                    if seen.is_err() {
                        // The descriptor failed: the poll carries on alone.
                        events = None;
                        continue;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    if let Some(e) = events.as_mut() {
                        e.discard().await;
                    }
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
            // Certificates may live in other directories than the config: watch those too.
            let extra: Vec<PathBuf> = control.extra_files().iter().map(|f| watch_dir(f)).collect();
            watch_dirs(events.as_ref(), extra, &mut watched);
        }
    });
}

/// Adds a watch on each directory not watched yet.
fn watch_dirs(
    events: Option<&DirEvents>,
    dirs: impl IntoIterator<Item = PathBuf>,
    watched: &mut Vec<PathBuf>,
) {
    for d in dirs {
        if watched.contains(&d) {
            continue;
        }
        if let Some(e) = events
            && let Err(err) = e.watch(&d)
        {
            tracing::warn!(dir = %d.display(), error = %err, "cannot watch a directory of the config; polling it");
        }
        watched.push(d);
    }
}

/// The next batch of events, or never without a watcher.
async fn next_event(events: Option<&mut DirEvents>) -> std::io::Result<()> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

use watch::DirEvents;

#[cfg(target_os = "linux")]
mod watch {
    //! Directory events from inotify, read on the runtime (no thread of their own).
    //!
    //! Only what can change a file's content or which file a name leads to is asked for:
    //! a write closed, a name created, removed or renamed, attributes changed, the
    //! directory itself removed or moved. Opens, reads and single writes are not: a
    //! directory that also holds files read or written all the time (a web root, a log)
    //! must not wake the proxy on each access, and its own reads of the config must not
    //! loop.

    use std::ffi::OsString;
    use std::future::poll_fn;
    use std::io;
    use std::path::Path;
    use std::pin::Pin;
    use std::task::Poll;

    use futures_core::Stream;
    use inotify::{EventStream, Inotify, WatchMask};

    /// The events asked for on each watched directory.
    const MASK: WatchMask = WatchMask::CLOSE_WRITE
        .union(WatchMask::CREATE)
        .union(WatchMask::DELETE)
        .union(WatchMask::MOVED_FROM)
        .union(WatchMask::MOVED_TO)
        .union(WatchMask::ATTRIB)
        .union(WatchMask::DELETE_SELF)
        .union(WatchMask::MOVE_SELF)
        .union(WatchMask::ONLYDIR);

    /// Events of the watched directories.
    pub struct DirEvents(EventStream<Vec<u8>>);

    impl DirEvents {
        /// An inotify instance with no watch yet (needs a runtime).
        pub fn new() -> io::Result<Self> {
            Ok(Self(Inotify::init()?.into_event_stream(vec![0; 4096])?))
        }

        /// Watches `dir` too.
        pub fn watch(&self, dir: &Path) -> io::Result<()> {
            self.0.watches().add(dir, MASK).map(|_| ())
        }

        /// Waits for the next event; the name it carries (none for the directory itself).
        pub async fn next_name(&mut self) -> io::Result<Option<OsString>> {
            match poll_fn(|cx| Pin::new(&mut self.0).poll_next(cx)).await {
                Some(Ok(e)) => Ok(e.name),
                Some(Err(e)) => Err(e),
                None => Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }

        /// Waits for the next event.
        pub async fn next(&mut self) -> io::Result<()> {
            self.next_name().await.map(|_| ())
        }

        /// Drops the events that are there already.
        pub async fn discard(&mut self) {
            poll_fn(|cx| {
                while let Poll::Ready(Some(Ok(_))) = Pin::new(&mut self.0).poll_next(cx) {}
                Poll::Ready(())
            })
            .await
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod watch {
    //! No directory events: the metadata poll alone sees changes.

    use std::io;
    use std::path::Path;

    /// Never built: the poll alone watches.
    pub struct DirEvents(std::convert::Infallible);

    impl DirEvents {
        pub fn new() -> io::Result<Self> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "directory events are read with inotify (Linux)",
            ))
        }
        pub fn watch(&self, _: &Path) -> io::Result<()> {
            match self.0 {}
        }
        pub async fn next(&mut self) -> io::Result<()> {
            match self.0 {}
        }
        pub async fn discard(&mut self) {
            match self.0 {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opening and reading a file in the watched directory (a web root, a log, the config
    /// read by the reload itself) wakes nothing; writing the config does.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn reads_in_the_directory_are_not_events_and_writes_are() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("16k.bin");
        std::fs::write(&other, b"body").unwrap();
        let mut events = DirEvents::new().unwrap();
        events.watch(dir.path()).unwrap();
        for _ in 0..3 {
            let mut s = String::new();
            std::fs::File::open(&other)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
        }
        std::fs::write(dir.path().join("fairway.toml"), b"[server]").unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), events.next_name())
            .await
            .expect("an event for the write")
            .unwrap();
        assert_eq!(first.as_deref(), Some(std::ffi::OsStr::new("fairway.toml")));
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
