//! `halod`, halo's daemon, as a library: the binary in `main.rs` is a thin shell over [`run`], so
//! tests start the real daemon on a temporary socket and talk to it with the real client.
//!
//! Layers, each using only the ones above it:
//! - [`config`]: the TOML config and its validation.
//! - [`models`]: model files on disk (which files, how many bytes, mapping them); [`gguf`]: the
//!   GGUF reader.
//! - [`memory`]: how big the memory budget is; [`heap`]: giving freed heap back after large
//!   requests.
//! - [`residency`], [`scheduler`]: the pure cores (no I/O, no clock, no tokio).
//! - [`core`]: the one task that owns both cores and applies their decisions.
//! - [`service`]: the gRPC edge.
#![deny(unsafe_code)]

pub mod config;
pub mod core;
pub mod diffusion;
mod edge_authority;
pub mod executor;
pub mod gguf;
pub mod heap;
pub mod llm;
pub mod memory;
pub mod models;
pub mod residency;
pub mod safetensors;
pub mod sampler;
pub mod scheduler;
pub mod service;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use halo_proto::{Addr, HaloServer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use crate::config::Config;
use crate::core::DeviceFacts;

/// How long shutdown waits for open streams to end before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// A bound listening socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub fn addr(&self) -> Addr {
        match self {
            Listener::Unix(_, p) => Addr::Unix(p.clone()),
            Listener::Tcp(l) => Addr::Tcp(
                l.local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "?".into()),
            ),
        }
    }
}

/// Binds `addr`. A unix socket's folder is created if needed, a stale socket file left by a dead
/// daemon is replaced, a live one is an error, and the socket gets mode 0660.
pub async fn bind(addr: &Addr) -> anyhow::Result<Listener> {
    match addr {
        Addr::Tcp(hp) => {
            let l = TcpListener::bind(hp)
                .await
                .with_context(|| format!("cannot listen on {hp}"))?;
            Ok(Listener::Tcp(l))
        }
        Addr::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // Only a socket may be replaced: whatever else sits at the path (a regular file, a
            // folder, a link) is somebody's data, and halod refuses to start rather than delete it.
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        bail!(
                            "another halod is already listening on {}; stop it first or use --listen",
                            path.display()
                        );
                    }
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove stale socket {}", path.display())
                    })?;
                }
                Ok(meta) => bail!(
                    "cannot listen on {}: it exists and is {}, not a socket; \
                     remove it yourself or choose another `listen` path",
                    path.display(),
                    file_type_name(&meta.file_type())
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bail!("cannot inspect {}: {e}", path.display()),
            }
            let l = UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
            Ok(Listener::Unix(l, path.clone()))
        }
    }
}

fn file_type_name(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a socket"
    }
}

/// What the process asks of a running daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file (SIGHUP).
    Reload,
    /// Stop accepting, cancel jobs, exit (SIGTERM, SIGINT).
    Shutdown,
}

/// Finds the Vulkan device, opens the runtime on it (its pipeline cache in `state`), and probes
/// memory. Runs on the blocking pool; never fails: without a device the daemon still serves and
/// says why.
pub async fn probe_device(state: Option<PathBuf>) -> Arc<DeviceFacts> {
    let facts = tokio::task::spawn_blocking(move || {
        let selector = std::env::var(halo_kernels::DEVICE_ENV).ok();
        let discovery = halo_kernels::discover(selector.as_deref()).map_err(|e| e.to_string());
        match &discovery {
            Ok(d) => {
                let dev = d.device();
                info!(device = %dev.name, kind = dev.device_type.as_str(), driver = %dev.driver_name,
                      api = %dev.api_version, "vulkan device");
            }
            Err(e) => warn!(error = %e, "no vulkan device; jobs that need the GPU will fail"),
        }
        let memory = memory::probe(discovery.as_ref().ok().map(|d| d.device()));
        let runtime = match &discovery {
            Err(e) => Err(e.clone()),
            Ok(_) => halo_kernels::Device::open(&halo_kernels::DeviceOptions {
                selector,
                pipeline_cache_dir: state,
            })
            .map_err(|e| e.to_string()),
        };
        if let Err(e) = &runtime {
            warn!(error = %e, "cannot open the Vulkan runtime; jobs that need the GPU will fail");
        }
        DeviceFacts {
            discovery,
            runtime,
            memory,
        }
    })
    .await
    .expect("device probe does not panic");
    Arc::new(facts)
}

/// Where halod keeps state between runs (the pipeline cache): systemd's `$STATE_DIRECTORY`,
/// else `$XDG_STATE_HOME/halo`, else `~/.local/state/halo`.
pub fn state_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
        let first = dirs
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return Some(PathBuf::from(first));
        }
    }
    var("XDG_STATE_HOME")
        .map(|d| d.join("halo"))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/halo")))
}

/// Runs the daemon on `listeners` until `control` says shut down (or its sender is dropped).
pub async fn run(
    listeners: Vec<Listener>,
    config: Config,
    facts: Arc<DeviceFacts>,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<()> {
    let config_path = config.source.clone();
    let max_request = usize::try_from(config.max_request).unwrap_or(usize::MAX);
    let listen: Vec<String> = listeners.iter().map(|l| l.addr().to_string()).collect();
    // A lease break on a model file arrives as SIGIO. Handle it before any lease is taken
    // (its default action ends the process); without a handler no leases are taken at all,
    // and imported weights fall back to copies.
    let sigio = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io());
    if sigio.is_ok() {
        models::enable_leases();
    }
    let (core, core_task) = core::spawn(config, facts.clone());
    // Large requests leave freed memory in malloc's arenas; this gives it back.
    let trimmer = tokio::spawn(heap::run_trimmer());
    match sigio {
        Ok(mut sigio) => {
            let core = core.clone();
            tokio::spawn(async move {
                while sigio.recv().await.is_some() {
                    if core.send(core::Command::CheckFiles).await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => {
            warn!(error = %e, "cannot handle SIGIO; model files get no leases and weights are copied")
        }
    }
    let service =
        service::HaloService::new(core.clone(), facts, listen.clone(), config_path.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<HaloServer<service::HaloService>>()
        .await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for listener in listeners {
        let router = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .add_service(
                HaloServer::new(service.clone())
                    .max_decoding_message_size(max_request)
                    .max_encoding_message_size(256 << 20),
            );
        let mut stop = stop_rx.clone();
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        servers.push(match listener {
            Listener::Unix(l, path) => {
                // Stock grpcio clients send the socket path as :authority, which h2 rejects;
                // the wrapper hands h2 a valid one (see `edge_authority`).
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    |r| r.map(edge_authority::AuthorityFix::new),
                );
                // The socket's inode now, so that at exit only this socket is removed, not
                // whatever may have replaced it at the path meanwhile.
                let ours = std::fs::symlink_metadata(&path)
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                tokio::spawn(async move {
                    let r = router.serve_with_incoming_shutdown(incoming, signal).await;
                    let still_ours = std::fs::symlink_metadata(&path)
                        .is_ok_and(|m| Some((m.dev(), m.ino())) == ours);
                    if still_ours {
                        let _ = std::fs::remove_file(&path);
                    }
                    r
                })
            }
            Listener::Tcp(l) => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
            }
        });
    }
    info!(listen = ?listen, "halod ready");

    // Anything but a reload (a shutdown, or the sender going away) ends the loop.
    while let Some(Control::Reload) = control.recv().await {
        match service::reload(&core, config_path.as_deref()).await {
            Ok(done) => {
                info!(models = done.models, unloaded = ?done.unloaded, "reloaded on SIGHUP")
            }
            Err(e) => warn!(error = %e, "reload on SIGHUP failed"),
        }
    }

    info!("shutting down: cancelling jobs and closing listeners");
    health_reporter
        .set_not_serving::<HaloServer<service::HaloService>>()
        .await;
    let _ = core.ask(core::Command::Shutdown).await;
    let _ = stop_tx.send(true);
    let all = futures_join(servers);
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        warn!("some connections did not close in time; exiting anyway");
    }
    trimmer.abort();
    drop(core);
    let _ = core_task.await;
    Ok(())
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>) {
    for h in handles {
        match h.await {
            Ok(Err(e)) => warn!(error = %e, "listener ended with an error"),
            Err(e) => warn!(error = %e, "listener task failed"),
            Ok(Ok(())) => {}
        }
    }
}

/// Sets up logging: `HALO_LOG` (a tracing filter) over the config's `log`, default `info`;
/// `HALO_LOG_FORMAT=json` for one JSON object per line.
pub fn init_logging(config_log: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("HALO_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| config_log.map(str::to_string))
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("halod: ignoring bad log filter {filter:?}: {e}");
        EnvFilter::new("info")
    });
    let json = std::env::var("HALO_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
