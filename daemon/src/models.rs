//! Model files on disk: which files make up a model, how many bytes it will take, and mapping them
//! into memory.
//!
//! [`estimate`] and [`map`] walk the same file list ([`weight_files`]), so the bytes `halo models`
//! shows before a load are the bytes charged after it. The engines will replace the plain file-size
//! estimate with one computed from each file's metadata (KV cache, scratch), still in this module.
//!
//! Architecture invariant: this module reads files and maps them; it knows nothing of the budget,
//! jobs or gRPC.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, ModelKind};

/// File extensions that hold weights, for models given as a folder (diffusers layout).
/// Pickled checkpoints (.bin, .ckpt, .pt) are not among them: halo never unpickles.
const WEIGHT_EXTENSIONS: &[&str] = &["gguf", "safetensors"];
/// How deep to look inside a model folder (diffusers nests one level: `unet/…`).
const MAX_DEPTH: usize = 3;

/// Why a model's files cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFileError {
    Missing {
        path: PathBuf,
    },
    NotAFile {
        path: PathBuf,
        kind: ModelKind,
    },
    NoWeights {
        dir: PathBuf,
    },
    Io {
        path: PathBuf,
        message: String,
    },
    /// The file is there but cannot be used (a corrupt GGUF, an unsupported architecture).
    Invalid {
        path: PathBuf,
        message: String,
    },
}

impl fmt::Display for ModelFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelFileError::Missing { path } => write!(
                f,
                "model file {} does not exist; fix `path` in the config or put the file there",
                path.display()
            ),
            ModelFileError::NotAFile { path, kind } => write!(
                f,
                "{} is not a regular file; a {} model's path must be a .gguf file",
                path.display(),
                kind.as_str()
            ),
            ModelFileError::NoWeights { dir } => write!(
                f,
                "no weight files (*.safetensors, *.gguf) found under {}",
                dir.display()
            ),
            ModelFileError::Io { path, message } => {
                write!(f, "cannot read {}: {message}", path.display())
            }
            ModelFileError::Invalid { path, message } => {
                write!(f, "{}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for ModelFileError {}

fn io_err(path: &Path, e: std::io::Error) -> ModelFileError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ModelFileError::Missing {
            path: path.to_path_buf(),
        }
    } else {
        ModelFileError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// The files that make up a model and their sizes, in a stable order.
pub fn weight_files(model: &ModelConfig) -> Result<Vec<(PathBuf, u64)>, ModelFileError> {
    let meta = std::fs::metadata(&model.path).map_err(|e| io_err(&model.path, e))?;
    if meta.is_file() {
        if model.kind != ModelKind::Llm {
            check_weight_file(&model.path, meta.len())?;
        }
        return Ok(vec![(model.path.clone(), meta.len())]);
    }
    if model.kind == ModelKind::Llm || !meta.is_dir() {
        return Err(ModelFileError::NotAFile {
            path: model.path.clone(),
            kind: model.kind,
        });
    }
    // A diffusers folder says what it holds in model_index.json.
    let index = model.path.join("model_index.json");
    let text = std::fs::read(&index).map_err(|e| io_err(&index, e))?;
    if !serde_json::from_slice::<serde_json::Value>(&text).is_ok_and(|v| v.is_object()) {
        return Err(ModelFileError::Invalid {
            path: index,
            message: "not a JSON object; a diffusers folder's model_index.json lists its parts"
                .into(),
        });
    }
    let mut out = Vec::new();
    collect(&model.path, 0, &mut out)?;
    if out.is_empty() {
        return Err(ModelFileError::NoWeights {
            dir: model.path.clone(),
        });
    }
    for (path, len) in &out {
        check_weight_file(path, *len)?;
    }
    out.sort();
    Ok(out)
}

/// The largest safetensors header halo reads (the format's own readers cap it at 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Checks that a diffusion weight file is what its name says, from its first bytes: a
/// safetensors file (an 8-byte header length, a JSON object of tensors whose data lies inside the
/// file) or a GGUF file (its magic); nothing else. The diffusion engine validates every tensor when it loads; this keeps an arbitrary file from
/// being taken for a model at all.
fn check_weight_file(path: &Path, len: u64) -> Result<(), ModelFileError> {
    use std::io::Read;
    let invalid = |message: String| ModelFileError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    match ext.as_deref() {
        Some("gguf") => {
            let mut magic = [0u8; 4];
            if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
                return Err(invalid("not a GGUF file (bad magic)".into()));
            }
            Ok(())
        }
        Some("safetensors") => {
            let mut n = [0u8; 8];
            f.read_exact(&mut n)
                .map_err(|_| invalid("not a safetensors file: shorter than its header".into()))?;
            let n = u64::from_le_bytes(n);
            if !(2..=MAX_SAFETENSORS_HEADER).contains(&n) || n > len - 8 {
                return Err(invalid(format!(
                    "not a safetensors file: a header of {n} bytes does not fit a {len}-byte file"
                )));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| io_err(path, e))?;
            let Ok(serde_json::Value::Object(tensors)) = serde_json::from_slice(&header) else {
                return Err(invalid(
                    "not a safetensors file: the header is not a JSON object".into(),
                ));
            };
            let data = len - 8 - n;
            for (name, t) in tensors.iter().filter(|(k, _)| *k != "__metadata__") {
                let offsets = t.get("data_offsets").and_then(|o| o.as_array());
                let range = match offsets.map(|o| o.as_slice()) {
                    Some([a, b]) => a.as_u64().zip(b.as_u64()),
                    _ => None,
                };
                if !range.is_some_and(|(a, b)| a <= b && b <= data) {
                    let why = format!("tensor {name:?} has no data_offsets inside the file");
                    return Err(invalid(format!("{why}'s {data} data bytes")));
                }
            }
            Ok(())
        }
        _ => Err(invalid(format!(
            "halo reads diffusion weights from .safetensors or .gguf files, not {}",
            ext.map(|e| format!(".{e} files"))
                .unwrap_or_else(|| "files without an extension".into())
        ))),
    }
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, u64)>) -> Result<(), ModelFileError> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?;
        if meta.is_dir() && depth + 1 < MAX_DEPTH {
            collect(&path, depth + 1, out)?;
        } else if meta.is_file() {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if ext.is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.as_str())) {
                out.push((path, meta.len()));
            }
        }
    }
    Ok(())
}

/// Bytes the model will take once loaded.
pub fn estimate(model: &ModelConfig) -> Result<u64, ModelFileError> {
    Ok(weight_files(model)?.iter().map(|(_, n)| n).sum())
}

/// One file mapped read-only (an empty file maps to an empty slice). Dropping it unmaps it and
/// closes the file, which also gives up its lease.
pub struct Mapping {
    map: Option<memmap2::Mmap>,
    file: File,
    path: PathBuf,
    lease: Lease,
}

/// Whether halod holds a read lease on a mapped file, which is what makes using the mapped
/// pages themselves as weights safe (see [`Mapping::open_leased`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    /// Not asked for: the caller copies what it needs and lets the mapping go.
    NotAsked,
    /// Held: a writer's `open` or `truncate` is held off (up to `/proc/sys/fs/lease-break-time`)
    /// and the daemon is told first.
    Held,
    /// Could not be had, and why (another process has the file open for writing, the daemon
    /// neither owns the file nor has CAP_LEASE, the filesystem has no leases).
    Unavailable(String),
}

/// Set once the process handles SIGIO, the signal a lease break raises; until then no lease is
/// taken, since SIGIO's default action would end the process.
static LEASE_SIGNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that SIGIO is handled (the daemon's `run` listens for it), so leases may be taken.
pub fn enable_leases() {
    LEASE_SIGNAL.store(true, std::sync::atomic::Ordering::SeqCst);
}

impl Mapping {
    pub fn open(path: &Path) -> std::io::Result<Mapping> {
        let file = File::open(path)?;
        Self::map_opened(file, path, Lease::NotAsked)
    }

    /// Opens and maps `path` with a read lease on it, so that the daemon hears of any process
    /// that opens the file for writing or truncates it before the change can happen: the
    /// writer is held off until the mapping is dropped. Without a lease, the mapping is made
    /// anyway and [`Mapping::lease`] says why there is none.
    pub fn open_leased(path: &Path) -> std::io::Result<Mapping> {
        let file = File::open(path)?;
        let lease = if !LEASE_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
            Lease::Unavailable("halod is not listening for lease breaks (SIGIO)".into())
        } else {
            match set_read_lease(&file) {
                Ok(()) => Lease::Held,
                Err(e) => Lease::Unavailable(match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        "another process has the file open for writing".to_string()
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) => {
                        format!("halod neither owns the file nor has CAP_LEASE ({e})")
                    }
                    _ => format!("the filesystem refused a lease ({e})"),
                }),
            }
        };
        Self::map_opened(file, path, lease)
    }

    fn map_opened(file: File, path: &Path, lease: Lease) -> std::io::Result<Mapping> {
        let len = file.metadata()?.len();
        // mmap rejects empty files; an empty file simply has no bytes.
        let map = if len == 0 {
            None
        } else {
            Some(map_file(&file)?)
        };
        Ok(Mapping {
            map,
            file,
            path: path.to_path_buf(),
            lease,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// True once another process has started to open the file for writing or to truncate it
    /// (our lease is being broken). From then on the mapped pages must not be read: the writer
    /// proceeds as soon as the mapping is dropped, or when the kernel's lease-break time runs out.
    pub fn changing(&self) -> bool {
        self.lease == Lease::Held && !matches!(current_lease(&self.file), Ok(LeaseKind::Read))
    }
}

/// The lease states `fcntl(F_GETLEASE)` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseKind {
    Read,
    /// No lease, or one being broken (the kernel reports the state it is breaking to).
    None,
}

impl halo_kernels::HostMemory for Mapping {
    fn bytes(&self) -> &[u8] {
        Mapping::bytes(self)
    }
}

/// A model's files mapped read-only. Dropping it unmaps them.
pub struct MappedModel {
    maps: Vec<Mapping>,
    bytes: u64,
}

impl MappedModel {
    /// The bytes mapped, which is what the budget is charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn files(&self) -> usize {
        self.maps.len()
    }
}

impl fmt::Debug for MappedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedModel")
            .field("files", &self.maps.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Maps every weight file of `model`.
pub fn map(model: &ModelConfig) -> Result<MappedModel, ModelFileError> {
    let mut maps = Vec::new();
    let mut bytes = 0;
    for (path, _) in weight_files(model)? {
        let m = Mapping::open(&path).map_err(|e| io_err(&path, e))?;
        bytes += m.bytes().len() as u64;
        maps.push(m);
    }
    Ok(MappedModel { maps, bytes })
}

/// `fcntl(F_SETLEASE, F_RDLCK)` on a file opened read-only.
#[allow(unsafe_code)]
fn set_read_lease(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let arg = libc::F_RDLCK;
    // SAFETY: fcntl with F_SETLEASE takes an int argument and touches no memory of ours; the
    // descriptor belongs to `file`, which is alive for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, arg) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fcntl(F_GETLEASE)`.
#[allow(unsafe_code)]
fn current_lease(file: &File) -> std::io::Result<LeaseKind> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETLEASE takes no argument and touches no memory of ours; the descriptor
    // belongs to `file`, which is alive for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
    match r {
        -1 => Err(std::io::Error::last_os_error()),
        r if r == libc::F_RDLCK => Ok(LeaseKind::Read),
        _ => Ok(LeaseKind::None),
    }
}

/// Maps the file: with the lease calls above, the only `unsafe` outside the kernels crate.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and private to this process, and the parsers check every
    // offset against the length mapped here. What Rust cannot see is another process changing
    // the file: a truncation makes touching the lost pages raise SIGBUS. Mappings kept beyond a
    // load (weights imported from the file's pages) are therefore opened with a read lease
    // (`open_leased`): a writer's open or truncate first breaks the lease, the daemon sees it
    // (`changing`) and stops reading before the writer can go on. A mapping without a lease is
    // only read while a model loads (its weights are copied).
    unsafe { memmap2::MmapOptions::new().map(file) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residency::KeepAlive;

    fn cfg(kind: ModelKind, path: &Path) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            kind,
            path: path.to_path_buf(),
            context: None,
            pinned: false,
            keep_alive: KeepAlive::Forever,
            parallel: 1,
            kv_cache: Default::default(),
            image: Default::default(),
            diffusers_config: None,
        }
    }

    #[test]
    fn single_file_estimate_equals_mapped_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        std::fs::write(&p, vec![7u8; 12345]).unwrap();
        let m = cfg(ModelKind::Llm, &p);
        assert_eq!(estimate(&m).unwrap(), 12345);
        assert_eq!(map(&m).unwrap().bytes(), 12345);
    }

    /// A minimal safetensors file of `len` bytes: a header naming one U8 tensor, then its data.
    pub(crate) fn safetensors(len: u64) -> Vec<u8> {
        for pad in 0..64 {
            let header = |data: u64| {
                format!(
                    "{{\"w\":{{\"dtype\":\"U8\",\"shape\":[{data}],\"data_offsets\":[0,{data}]}}}}{}",
                    " ".repeat(pad)
                )
            };
            let guess = len.saturating_sub(8 + header(0).len() as u64);
            for data in guess.saturating_sub(20)..=guess {
                let h = header(data);
                if 8 + h.len() as u64 + data == len {
                    let mut out = (h.len() as u64).to_le_bytes().to_vec();
                    out.extend_from_slice(h.as_bytes());
                    out.resize(len as usize, 0);
                    return out;
                }
            }
        }
        panic!("no safetensors layout of {len} bytes");
    }

    #[test]
    fn folder_counts_weight_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/model.safetensors"), safetensors(100)).unwrap();
        std::fs::write(dir.path().join("vae.safetensors"), safetensors(150)).unwrap();
        std::fs::write(dir.path().join("model_index.json"), b"{}").unwrap();
        let m = cfg(ModelKind::Sdxl, dir.path());
        assert_eq!(estimate(&m).unwrap(), 250);
        let mapped = map(&m).unwrap();
        assert_eq!((mapped.bytes(), mapped.files()), (250, 2));
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(Mapping::open(&empty).unwrap().bytes(), b"");
    }

    #[test]
    fn a_lease_break_is_seen_and_the_writer_waits_for_the_mapping_to_go() {
        // SIGIO must be handled before a lease is taken, as `run` does.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _sigio = rt.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io()).unwrap()
        });
        enable_leases();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.gguf");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let m = Mapping::open_leased(&p).unwrap();
        assert_eq!(m.lease(), &Lease::Held);
        assert!(!m.changing());
        // `truncate` opens without blocking: it is refused while the lease is held, and the
        // break it started is visible at once.
        let out = std::process::Command::new("truncate")
            .args(["-s", "10"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(m.changing());
        assert_eq!(m.bytes().len(), 8192);
        drop(m);
        let out = std::process::Command::new("truncate")
            .args(["-s", "10"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success());
        // A file someone holds open for writing gets no lease, and says why.
        let w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let m = Mapping::open_leased(&p).unwrap();
        assert!(
            matches!(m.lease(), Lease::Unavailable(why) if why.contains("open for writing")),
            "{:?}",
            m.lease()
        );
        assert!(!m.changing());
        drop(w);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.gguf");
        let e = estimate(&cfg(ModelKind::Llm, &missing)).unwrap_err();
        assert_eq!(e, ModelFileError::Missing { path: missing });
        assert!(e.to_string().contains("does not exist"));
        let e = estimate(&cfg(ModelKind::Llm, dir.path())).unwrap_err();
        assert!(matches!(e, ModelFileError::NotAFile { .. }), "{e}");
        // A folder without model_index.json is not a diffusers folder.
        let e = estimate(&cfg(ModelKind::Flux, dir.path())).unwrap_err();
        assert!(e.to_string().contains("model_index.json"), "{e}");
        std::fs::write(dir.path().join("model_index.json"), b"{}").unwrap();
        let e = estimate(&cfg(ModelKind::Flux, dir.path())).unwrap_err();
        assert!(matches!(e, ModelFileError::NoWeights { .. }), "{e}");
        // Issue 8, item 18: 100 random bytes are not a flux model, whatever the name.
        let noise: Vec<u8> = (0..100u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for name in ["noise.safetensors", "noise.gguf", "noise.bin"] {
            std::fs::write(dir.path().join(name), &noise).unwrap();
        }
        for name in ["noise.safetensors", "noise.gguf"] {
            let e = estimate(&cfg(ModelKind::Flux, &dir.path().join(name))).unwrap_err();
            assert!(matches!(e, ModelFileError::Invalid { .. }), "{name}: {e}");
        }
        // A header pointing past the end of the file is refused too.
        let mut bad = safetensors(200);
        bad.truncate(150);
        std::fs::write(dir.path().join("short.safetensors"), &bad).unwrap();
        let e = estimate(&cfg(ModelKind::Sdxl, &dir.path().join("short.safetensors"))).unwrap_err();
        assert!(e.to_string().contains("data_offsets"), "{e}");
        let e = estimate(&cfg(ModelKind::Flux, &dir.path().join("noise.bin"))).unwrap_err();
        assert!(e.to_string().contains(".safetensors or .gguf"), "{e}");
    }
}
