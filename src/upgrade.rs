//! Upgrading fairway itself without a refused connection (CONTRACT §9 `SIGUSR2`): a new
//! process is started from the same executable path with the same arguments and
//! environment, and handed every listening socket (client, TLS, redirect, admin) as
//! inherited file descriptors in systemd's form (see `inherit`). It reports ready over a
//! Unix socket whose path it is given; only then does the old process stop accepting and
//! drain as on `SIGTERM`. Connections queued on the listening sockets are never lost: the
//! sockets stay open in the new process. A new process that exits, or is not ready within
//! `shutdown_timeout`, is stopped, and the old one keeps serving.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::control::Control;

/// The variable naming the socket a new process reports ready on.
const READY_VAR: &str = "FAIRWAY_UPGRADE_READY";

/// How this process was started: the executable's path and the arguments.
static INVOCATION: OnceLock<(PathBuf, Vec<OsString>)> = OnceLock::new();

/// Notes the executable's path and the arguments, for a later upgrade. Call it at start,
/// before the file could be replaced (the path, not the file, is what is started again).
pub fn remember_invocation() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = INVOCATION.set((exe, std::env::args_os().skip(1).collect()));
    }
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Not started through `remember_invocation` (a library user, a test).
    #[error("the executable's path is not known")]
    NoExecutable,
    /// Setting up or starting the new process failed.
    #[error("could not start the new process: {0}")]
    Spawn(#[from] std::io::Error),
    /// The new process exited before it was ready.
    #[error("the new process exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    /// The new process did not report ready in time; it was stopped.
    #[error("the new process was not ready within {0:?}; it was stopped")]
    NotReady(Duration),
}

/// Starts the new process and waits until it serves; returns its pid. On an error the new
/// process is gone and nothing changed here.
pub async fn start_new_process(control: &Control) -> Result<u32, UpgradeError> {
    let (exe, args) = INVOCATION.get().ok_or(UpgradeError::NoExecutable)?;
    let limit = control.ctx.runtime.load().settings.shutdown_timeout;
    let sockets = control.handover()?;
    let dir = ReadyDir::create()?;
    let ready = UnixListener::bind(dir.socket())?;

    let mut names = Vec::with_capacity(sockets.len());
    let mut mappings = Vec::with_capacity(sockets.len());
    for (i, (role, fd)) in sockets.into_iter().enumerate() {
        names.push(role.name());
        mappings.push(FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        });
    }
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS_FIRST_FD")
        .env(READY_VAR, dir.socket())
        .stdin(std::process::Stdio::null());
    cmd.fd_mappings(mappings)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut child = cmd.spawn()?;
    let pid = child.id();
    tracing::info!(pid, exe = %exe.display(), "upgrade: started a new process");

    let wait_ready = async {
        loop {
            let (stream, _) = ready.accept().await?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).await?;
            if line.starts_with("READY") {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let outcome = tokio::select! {
        r = wait_ready => r.map_err(UpgradeError::Spawn),
        status = exited(&mut child) => return Err(UpgradeError::Exited(status?)),
        () = tokio::time::sleep(limit) => Err(UpgradeError::NotReady(limit)),
    };
    match outcome {
        Ok(()) => {
            // systemd follows the new process from now on (the old one is still the main
            // process, the one allowed to say so).
            crate::inherit::notify(&format!("MAINPID={pid}"));
            Ok(pid)
        }
        Err(e) => {
            // Never left running beside this one, unmanaged.
            if child.kill().is_ok() {
                let _ = exited(&mut child).await;
            }
            Err(e)
        }
    }
}

/// The new process's exit status, once it has exited (looked at every 20 ms: it is
/// started with the standard library's `Command`, not tokio's, whose child reaping runs at
/// every turn of every worker's event loop and takes two locks the workers share).
async fn exited(child: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tells the process that started this one by `SIGUSR2` (if any) that this one serves (it
/// then tells systemd to follow this one); else tells systemd itself.
pub async fn report_ready() {
    let pid = std::process::id();
    if let Some(path) = std::env::var_os(READY_VAR) {
        match UnixStream::connect(&path).await {
            Ok(mut s) => {
                let _ = s.write_all(format!("READY {pid}\n").as_bytes()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not tell the previous process that this one is ready")
            }
        }
    } else {
        crate::inherit::notify("READY=1");
    }
}

/// A private directory for the readiness socket, removed when dropped.
struct ReadyDir(PathBuf);

impl ReadyDir {
    fn create() -> std::io::Result<ReadyDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "fairway-upgrade-{}-{:x}",
            std::process::id(),
            crate::timing::fast_random()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(ReadyDir(dir))
    }

    fn socket(&self) -> PathBuf {
        self.0.join("ready.sock")
    }
}

impl Drop for ReadyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
