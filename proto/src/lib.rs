//! halo's gRPC API, package `halo.v1`, generated from `halo/v1/halo.proto`, plus the small amount
//! of transport glue that both the daemon and its clients need: where the default socket lives and
//! how to open a channel to a `unix:` or `http://` address.
//!
//! Architecture invariant: this is the only crate that knows prost/tonic message types; the daemon
//! converts them to its own domain types at the service edge.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("halo.v1");
}

pub use v1::halo_client::HaloClient;
pub use v1::halo_server::{Halo, HaloServer};

/// Environment variable the CLI reads for the daemon's address.
pub const ADDR_ENV: &str = "HALO_ADDR";

/// Metadata key on every error status the daemon itself sends: `model-file` when a model's files
/// cannot be used (a permanent failure until the file is fixed), `halod` for any other refusal.
/// A status without it after a stream started means the connection failed, not the daemon.
pub const ERROR_REASON_KEY: &str = "halo-error";

/// Where a daemon listens or a client connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A unix-domain socket path.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(hp) => write!(f, "http://{hp}"),
        }
    }
}

/// An address string that is neither `unix:PATH`, an absolute path, nor `[http://]HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAddr(pub String);

impl fmt::Display for BadAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad address {:?}: use unix:/path/to/halod.sock, http://HOST:PORT or HOST:PORT",
            self.0
        )
    }
}

impl std::error::Error for BadAddr {}

impl FromStr for Addr {
    type Err = BadAddr;

    /// Accepts `unix:PATH`, an absolute path, `http://HOST:PORT`, `HOST:PORT` and `:PORT`
    /// (loopback). A TCP address without a host means 127.0.0.1, never all interfaces.
    fn from_str(s: &str) -> Result<Self, BadAddr> {
        let bad = || BadAddr(s.to_string());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Addr::Unix(PathBuf::from(s)));
        }
        let hp = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("tcp:"))
            .unwrap_or(s)
            .trim_end_matches('/');
        let (host, port) = hp.rsplit_once(':').ok_or_else(bad)?;
        port.parse::<u16>().map_err(|_| bad())?;
        if host.contains('/') {
            return Err(bad());
        }
        let host = if host.is_empty() { "127.0.0.1" } else { host };
        Ok(Addr::Tcp(format!("{host}:{port}")))
    }
}

/// The socket `halod` listens on when the config names none: systemd's `$RUNTIME_DIRECTORY`
/// (set by `RuntimeDirectory=halo`), else `$XDG_RUNTIME_DIR/halo/halod.sock`, else
/// `/run/halo/halod.sock`.
pub fn default_socket_path() -> PathBuf {
    socket_candidates().remove(0)
}

/// Where a client looks for the daemon when no address is given, in order: the daemon's own
/// default for this environment, then the system service's socket.
pub fn socket_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may pass several directories separated by ':'; ours is the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            out.push(Path::new(&first).join("halod.sock"));
        }
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        if !dir.is_empty() {
            out.push(Path::new(&dir).join("halo").join("halod.sock"));
        }
    }
    out.push(PathBuf::from("/run/halo/halod.sock"));
    out.dedup();
    out
}

/// Opens a channel to the daemon. Connection errors surface here, not on the first call.
pub async fn connect(
    addr: &Addr,
) -> Result<HaloClient<tonic::transport::Channel>, tonic::transport::Error> {
    use tonic::transport::Endpoint;
    let channel = match addr {
        Addr::Tcp(hp) => {
            Endpoint::from_shared(format!("http://{hp}"))?
                .connect()
                .await?
        }
        Addr::Unix(path) => {
            let path = path.clone();
            // The URI is ignored by the connector; tonic only needs a syntactically valid one.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await?
        }
    };
    Ok(HaloClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/run/halo/halod.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/run/halo/halod.sock".into())
        );
        assert_eq!(
            "/tmp/x.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            "http://10.0.0.2:7870".parse::<Addr>().unwrap(),
            Addr::Tcp("10.0.0.2:7870".into())
        );
        assert_eq!(
            ":7870".parse::<Addr>().unwrap(),
            Addr::Tcp("127.0.0.1:7870".into())
        );
        assert_eq!(
            "localhost:7870".parse::<Addr>().unwrap(),
            Addr::Tcp("localhost:7870".into())
        );
        for bad in ["", "unix:", "localhost", "host:notaport", "http://a/b:1"] {
            assert!(bad.parse::<Addr>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["unix:/a/b.sock", "http://127.0.0.1:1"] {
            assert_eq!(s.parse::<Addr>().unwrap().to_string(), s);
        }
    }
}
