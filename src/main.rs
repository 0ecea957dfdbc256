//! The `fairway` command: `run` (default), `check` and `demo`. Parses arguments, sets up
//! logging and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// An HTTP load balancer and reverse proxy for a pool of identical application nodes.
#[derive(Debug, Parser)]
#[command(name = "fairway", version, about)]
struct Cli {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        env = "FAIRWAY_CONFIG",
        default_value = "config/fairway.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and exit (0: valid, 1: invalid), like `nginx -t`.
    Check {
        /// Also send one health check to every server and print what each answered; exit 1
        /// if an upstream has no passing server.
        #[arg(long)]
        probe: bool,
    },
    /// Start three sample upstreams and the proxy in front of them.
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
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { probe } => check(&cli.config, probe),
        Command::Run => run(&cli.config),
        Command::Demo => demo(),
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
        let (table, ok) = rt.block_on(fairway::health::probe_all(&cfg, &files.tls));
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
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
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
