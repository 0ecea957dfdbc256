//! The real `fairway` binary as a child process: a command with a clean environment, its
//! output, and a running child ([`Proc`]) whose stderr is collected, whose bound addresses
//! are read from its log (configs listen on port 0), and whose stdout is read line by line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fairway");

/// The INFO line a client listener logs once bound: `... listen=IP:PORT`.
pub const CLIENT_LISTENING: &str = "accepting client connections";
/// The INFO line the admin listener logs once bound.
pub const ADMIN_LISTENING: &str = "admin listener up";

/// `fairway ARGS` with a clean environment for the variables fairway reads.
pub fn fairway(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("FAIRWAY_CONFIG")
        .env_remove("RUST_LOG");
    c
}

/// A `RUST_LOG` for a child that logs at `level` and still says where its listeners are
/// bound (the INFO lines of `fairway::sockets`).
pub fn log_level(level: &str) -> String {
    format!("{level},fairway::sockets=info")
}

/// What a finished command wrote, and its exit code.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `c` to the end.
pub fn output(mut c: Command) -> Output {
    let o = c.output().expect("cannot run fairway");
    Output {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A child process that is killed if the test ends early; its stderr is collected, and its
/// stdout, if the command pipes it, is read line by line.
pub struct Proc {
    pub child: std::process::Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    stdout: Option<UnboundedReceiver<String>>,
}

impl Proc {
    pub fn spawn(mut c: Command) -> Proc {
        let mut child = c
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start fairway");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        // Drained continuously, so that logging never blocks the child on a full pipe.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().map(|out| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).split(b'\n') {
                    let Ok(line) = line else { break };
                    if tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            });
            rx
        });
        Proc {
            child,
            stderr,
            reader: Some(reader),
            stdout,
        }
    }

    /// What the child wrote to stderr so far (all of it once it has exited, see
    /// [`Proc::exit_within`]).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("cannot run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// The exit status, if the process ends within `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The pipe closes at exit: collect the rest of stderr before reporting.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn expect_clean_exit(&mut self, limit: Duration) {
        match self.exit_within(limit).await {
            Some(s) => assert_eq!(s.code(), Some(0), "exit {s}; stderr: {}", self.stderr()),
            None => panic!("fairway still running after {limit:?}: {}", self.stderr()),
        }
    }

    /// The address of the first client listener, once the child has logged it (within
    /// 10 s). The socket is listening by then.
    pub async fn client_addr(&mut self) -> SocketAddr {
        self.bound(CLIENT_LISTENING).await
    }

    /// The address of the admin listener, once the child has logged it (within 10 s).
    pub async fn admin_addr(&mut self) -> SocketAddr {
        self.bound(ADMIN_LISTENING).await
    }

    /// The `listen=` address of the first stderr line with `message`, polled until it
    /// appears (10 s at most, and not after the child has exited).
    pub async fn bound(&mut self, message: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(addr) = logged_addr(&self.stderr(), message) {
                return addr;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("fairway exited ({s}) before {message:?}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} logged after 10 s: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next line the child writes on stdout (which the command must pipe), within
    /// `limit`.
    pub async fn stdout_line(&mut self, limit: Duration) -> String {
        self.stdout_lines(1, limit).await.remove(0)
    }

    /// The next `n` lines the child writes on stdout (which the command must pipe),
    /// within `limit` in all.
    pub async fn stdout_lines(&mut self, n: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        let stderr = Arc::clone(&self.stderr);
        let stderr = || stderr.lock().unwrap().clone();
        let lines = self
            .stdout
            .as_mut()
            .expect("the command does not pipe stdout");
        while out.len() < n {
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(l)) => out.push(l),
                Ok(None) => panic!("stdout closed after {out:?}: {}", stderr()),
                Err(_) => panic!(
                    "only {} of {n} stdout lines within {limit:?}: {out:?}\n{}",
                    out.len(),
                    stderr()
                ),
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `listen=IP:PORT` field of the first line of `log` that contains `message`.
fn logged_addr(log: &str, message: &str) -> Option<SocketAddr> {
    log.lines().filter(|l| l.contains(message)).find_map(|l| {
        l.split_once("listen=")?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
