//! The `fairway` command: `run` (default), `check` and `demo`. Parses arguments, sets up
//! logging and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// An HTTP load balancer and reverse proxy for a pool of identical application nodes.
#[derive(Debug, Parser)]
#[command(name = "fairway", version, about)]
struct Cli {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        env = "FAIRWAY_CONFIG",
        default_value = "config/fairway.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

/// `-c` after `run` or `check`; before the command (`fairway -c PATH check`) it is the
/// top-level option. Not offered by `demo`, which writes its own config.
#[derive(Debug, Args)]
struct ConfigArg {
    /// The config file [default: $FAIRWAY_CONFIG, else config/fairway.toml].
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config file and exit (0: valid, 1: invalid), like `nginx -t`.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also send one health check to every server and print what each answered; exit 1
        /// if an upstream has no passing server.
        #[arg(long)]
        probe: bool,
    },
    /// Start three sample upstreams and the proxy in front of them (with a config of its own).
    Demo,
}

fn init_logging(level: Option<&str>) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new("info")),
        _ => EnvFilter::try_new(level.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Hands glibc's free heap pages back to the kernel once a burst is over. glibc keeps memory
/// freed into its per-thread arenas, so after a burst of connections RSS would otherwise stay
/// at its high-water mark. Under steady load freed memory is soon reused and trimming it would
/// only cost page faults (and `malloc_trim` holds each arena's lock while it walks it), so
/// the trim runs only when more memory is free than in use and memory held beyond live
/// memory is at least [`heap::SLACK`] above the least it came down to after a trim.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod heap {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Growth of retained memory (RSS minus heap in use) that is worth a trim.
    pub const SLACK: usize = 4 << 20;

    /// The least retained memory seen right after a trim (0 before the first): what the
    /// process comes back to once a burst is over.
    static RETAINED_FLOOR: AtomicUsize = AtomicUsize::new(0);

    /// glibc's `struct mallinfo2`.
    #[repr(C)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }

    unsafe extern "C" {
        fn mallinfo2() -> MallInfo2;
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }

    fn rss_bytes() -> Option<usize> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn trim_after_burst() {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
        let m = unsafe { mallinfo2() };
        let (free, used) = (m.fordblks, m.uordblks + m.hblkhd);
        let Some(rss) = rss_bytes() else { return };
        let retained = rss.saturating_sub(used);
        let floor = RETAINED_FLOOR.load(Ordering::Relaxed);
        if free <= used || retained < floor + SLACK {
            return;
        }
        // SAFETY: malloc_trim takes no pointers and only releases memory malloc holds free.
        unsafe {
            malloc_trim(0);
        }
        let after = rss_bytes().map_or(retained, |r| r.saturating_sub(used));
        if floor == 0 || after < floor {
            RETAINED_FLOOR.store(after, Ordering::Relaxed);
        }
    }
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fairway::app::release_memory_with(heap::trim_after_burst);
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let or_top = |c: ConfigArg| c.config.unwrap_or_else(|| cli.config.clone());
    match cli.command {
        Some(Command::Check { config, probe }) => check(&or_top(config), probe),
        Some(Command::Run { config }) => run(&or_top(config)),
        None => run(&cli.config),
        Some(Command::Demo) => {
            if matches.value_source("config") == Some(ValueSource::CommandLine) {
                eprintln!("fairway demo writes its own config: -c/--config does not apply to it");
                return ExitCode::FAILURE;
            }
            demo()
        }
    }
}

fn check(path: &std::path::Path, probe: bool) -> ExitCode {
    // The same steps as a start: parse, validate, read certificates (strictly: an expired
    // certificate is an error here), and build the snapshot.
    let loaded = fairway::config::load(path).and_then(|cfg| {
        let files = fairway::runtime::Files::load(&cfg, path, true)?;
        Ok((cfg, files))
    });
    let (cfg, files) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for w in cfg.warnings() {
        eprintln!("{}: warning: {w}", path.display());
    }
    if probe {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (table, ok) = rt.block_on(fairway::checker::probe_all(&cfg, &files.tls));
        print!("{table}");
        if !ok {
            eprintln!("{}: an upstream has no passing server", path.display());
            return ExitCode::FAILURE;
        }
    }
    let servers: usize = cfg.upstreams.values().map(|u| u.servers.len()).sum();
    println!(
        "{}: ok: {} listen address(es), {} upstream(s), {} server(s), {} route(s){}",
        path.display(),
        cfg.server.listen.0.len(),
        cfg.upstreams.len(),
        servers,
        cfg.routes.len(),
        if cfg.server.tls.is_some() {
            ", TLS"
        } else {
            ""
        }
    );
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path) -> ExitCode {
    // Read the config before logging starts, so that `log.level` applies from the first line.
    let level = match fairway::config::load(path) {
        Ok(cfg) => cfg.log.level,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(level.as_deref());
    // Before any other thread: taking the sockets edits the environment.
    let (inherited, refused) = fairway::inherit::adopt_from_env();
    if inherited > 0 {
        tracing::info!(
            sockets = inherited,
            "listening sockets handed over at start"
        );
    }
    for r in refused {
        tracing::warn!(socket = %r, "a handed-over file descriptor is not a listening TCP socket: ignored");
    }
    fairway::upgrade::remember_invocation();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        // Handled from the start: a SIGHUP or SIGUSR2 before the proxy serves is ignored
        // instead of ending the process (their default action).
        for kind in [
            tokio::signal::unix::SignalKind::hangup(),
            tokio::signal::unix::SignalKind::user_defined2(),
        ] {
            let _ = tokio::signal::unix::signal(kind);
        }
        let app = match fairway::App::start(path).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        match app.run_until_signal().await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("signal handling failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn demo() -> ExitCode {
    init_logging(None);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fairway::demo::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
