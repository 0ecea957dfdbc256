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

/// The allocator: jemalloc. Its per-thread caches serve the blocks every connection and
/// request allocates without a lock or a search: a request's state (4.7 KiB), and tokio's
/// task and I/O registration blocks, aligned to 128 bytes. glibc's malloc takes its slow
/// path for all three (measured in docs/performance.md).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(target_os = "linux")]
mod heap {
    use std::ffi::c_char;
    use std::ptr::null_mut;

    /// A C string for jemalloc to read.
    #[repr(transparent)]
    struct Conf(*const c_char);

    // SAFETY: it points to a static C string that is never written.
    unsafe impl Sync for Conf {}

    /// jemalloc's settings, read when it starts: pages no longer used go back to the kernel
    /// within about a second (instead of ten), so RSS follows the load down after a burst.
    #[unsafe(export_name = "_rjem_malloc_conf")]
    static MALLOC_CONF: Conf = Conf(c"dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

    /// Runs every arena's decay now. jemalloc decays as it allocates; a process that went
    /// idle after a burst would otherwise keep the burst's pages.
    pub fn release() {
        // SAFETY: a NUL-terminated name (4096 is MALLCTL_ARENAS_ALL); the command reads
        // and writes nothing.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arena.4096.decay".as_ptr(),
                null_mut(),
                null_mut(),
                null_mut(),
                0,
            );
        }
    }
}

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    fairway::app::release_memory_with(heap::release);
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
