//! `halod`: parse the command line, find the config, bind the sockets, run until a signal.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use halo_proto::Addr;
use halod::{Config, Control};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// halo's inference daemon: keeps models resident under a memory budget and runs jobs on them.
#[derive(Parser)]
#[command(name = "halod", version)]
struct Cli {
    /// Config file [default: $HALO_CONFIG, else /etc/halo/halod.toml, else built-in defaults]
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Listen here instead of the config's addresses: unix:PATH or HOST:PORT
    #[arg(long, short = 'l')]
    listen: Vec<Addr>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a config file and print it resolved (exit 2 if it is bad)
    CheckConfig {
        /// The file to check [default: the one halod would use]
        file: Option<PathBuf>,
    },
}

/// Exit code for a bad config or command line.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CheckConfig { file }) = &cli.command {
        let Some(path) = Config::locate(file.as_deref().or(cli.config.as_deref())) else {
            eprintln!(
                "halod: no config file given and none at {}",
                halod::config::SYSTEM_CONFIG
            );
            return ExitCode::from(EXIT_CONFIG);
        };
        return match Config::load(&path) {
            Ok(c) => {
                print!("{}", c.to_toml());
                eprintln!("halod: {} is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("halod: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }

    let config = match Config::locate(cli.config.as_deref()) {
        Some(path) => match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("halod: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => Config::default(),
    };
    halod::init_logging(config.log.as_deref());

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halod: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli.listen, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("halod: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen_override: Vec<Addr>, config: Config) -> anyhow::Result<()> {
    // Signal handlers first, so a signal that arrives while we start up is not fatal.
    let (tx, rx) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    match &config.source {
        Some(p) => tracing::info!(config = %p.display(), "config loaded"),
        None => tracing::info!("no config file; using built-in defaults"),
    }
    let mut addrs = if listen_override.is_empty() {
        config.listen.clone()
    } else {
        listen_override
    };
    if addrs.is_empty() {
        addrs.push(Addr::Unix(halo_proto::default_socket_path()));
    }
    let mut listeners = Vec::new();
    for a in &addrs {
        listeners.push(halod::bind(a).await?);
    }
    let facts = halod::probe_device(halod::state_dir()).await;

    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(c).await.is_err() || c == Control::Shutdown {
                return;
            }
        }
    });
    halod::run(listeners, config, facts, rx).await
}
