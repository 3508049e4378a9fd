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
const WEIGHT_EXTENSIONS: &[&str] = &["gguf", "safetensors", "bin", "ckpt", "pt", "pth"];
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
                "no weight files (*.safetensors, *.gguf, *.bin) found under {}",
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
        return Ok(vec![(model.path.clone(), meta.len())]);
    }
    if model.kind == ModelKind::Llm || !meta.is_dir() {
        return Err(ModelFileError::NotAFile {
            path: model.path.clone(),
            kind: model.kind,
        });
    }
    let mut out = Vec::new();
    collect(&model.path, 0, &mut out)?;
    if out.is_empty() {
        return Err(ModelFileError::NoWeights {
            dir: model.path.clone(),
        });
    }
    out.sort();
    Ok(out)
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

/// One file mapped read-only (an empty file maps to an empty slice). Dropping it unmaps it.
pub struct Mapping {
    map: Option<memmap2::Mmap>,
}

impl Mapping {
    pub fn open(path: &Path) -> std::io::Result<Mapping> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        // mmap rejects empty files; an empty file simply has no bytes.
        let map = if len == 0 {
            None
        } else {
            Some(map_file(&file)?)
        };
        Ok(Mapping { map })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
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

/// The one place outside the kernels crate that uses `unsafe`.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and private to this process. Model files are treated as
    // immutable while loaded (the docs say so: replace a model by writing a new file and renaming
    // it over the old one, which leaves this mapping on the old inode). If someone truncates the
    // file in place anyway, touching the lost pages raises SIGBUS; the parsers check every offset
    // against the length mapped here, so they never read past it themselves.
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

    #[test]
    fn folder_counts_weight_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/model.safetensors"), [1u8; 100]).unwrap();
        std::fs::write(dir.path().join("vae.safetensors"), [1u8; 50]).unwrap();
        std::fs::write(dir.path().join("model_index.json"), b"{}").unwrap();
        let m = cfg(ModelKind::Sdxl, dir.path());
        assert_eq!(estimate(&m).unwrap(), 150);
        let mapped = map(&m).unwrap();
        assert_eq!((mapped.bytes(), mapped.files()), (150, 2));
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(Mapping::open(&empty).unwrap().bytes(), b"");
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
        let e = estimate(&cfg(ModelKind::Flux, dir.path())).unwrap_err();
        assert!(matches!(e, ModelFileError::NoWeights { .. }), "{e}");
    }
}
