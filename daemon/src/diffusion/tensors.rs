//! One safetensors file's tensors on the device, the way the diffusion models use them:
//! matrices (linear and convolution weights, embedding tables) stay in the file's float type and
//! are read in place by the kernels; vectors (biases, norm weights) are converted to f32 into one
//! small buffer at load, because the elementwise and norm kernels read f32. fp8 files are not
//! read yet.
//!
//! Every name can carry a prefix (a single-file checkpoint keeps each component under its own,
//! `conditioner.embedders.0.transformer.` and so on), and every lookup checks the shape the
//! model expects, so a wrong file is an error naming the tensor, not a garbage image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use halo_kernels::ops::{F32s, Weights};
use halo_kernels::quant::{bf16_to_f32, f16_to_f32, WeightType};
use halo_kernels::{Buffer, Device, LoadStrategy, LoadedWeights, OwnerId};

use crate::models::Mapping;
use crate::safetensors::{Dtype, SafeTensors, Tensor};

#[derive(Debug)]
pub enum TensorError {
    Io(PathBuf, std::io::Error),
    File(PathBuf, String),
    Missing {
        path: PathBuf,
        name: String,
    },
    Shape {
        path: PathBuf,
        name: String,
        want: Vec<u64>,
        got: Vec<u64>,
    },
    Device(halo_kernels::VulkanError),
}

impl std::fmt::Display for TensorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            TensorError::File(p, m) => write!(f, "{}: {m}", p.display()),
            TensorError::Missing { path, name } => {
                write!(f, "{}: no tensor {name:?}", path.display())
            }
            TensorError::Shape {
                path,
                name,
                want,
                got,
            } => write!(
                f,
                "{}: tensor {name:?} has shape {got:?}, expected {want:?}",
                path.display()
            ),
            TensorError::Device(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TensorError {}

impl From<halo_kernels::VulkanError> for TensorError {
    fn from(e: halo_kernels::VulkanError) -> Self {
        TensorError::Device(e)
    }
}

/// The tensors of one file under one prefix, loaded.
pub struct DeviceTensors {
    path: PathBuf,
    prefix: String,
    weights: LoadedWeights,
    /// Matrices by full name: their index in `weights` and their header entry.
    matrices: HashMap<String, (usize, Tensor)>,
    /// f32 copies of the vectors, and where each starts and how long it is.
    params: Option<Buffer>,
    vectors: HashMap<String, (u64, u64)>,
}

fn weight_type(d: Dtype) -> Option<WeightType> {
    match d {
        Dtype::F32 => Some(WeightType::F32),
        Dtype::F16 => Some(WeightType::F16),
        Dtype::BF16 => Some(WeightType::BF16),
        _ => None,
    }
}

impl DeviceTensors {
    /// Loads every float tensor of `path` whose name starts with `prefix`: tensors of two or
    /// more dimensions as matrices, the rest as f32 vectors. Integer tensors (position ids) are
    /// skipped.
    pub fn load(
        device: &Device,
        path: &Path,
        prefix: &str,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<DeviceTensors, TensorError> {
        let map = Arc::new(Mapping::open(path).map_err(|e| TensorError::Io(path.into(), e))?);
        let st = SafeTensors::parse(map.bytes())
            .map_err(|e| TensorError::File(path.into(), e.to_string()))?;
        let mut ranges = Vec::new();
        let mut matrices = HashMap::new();
        let mut host_params: Vec<f32> = Vec::new();
        let mut vectors = HashMap::new();
        for t in st.tensors().iter().filter(|t| t.name.starts_with(prefix)) {
            if t.dtype == Dtype::F8E4M3 || t.dtype == Dtype::F8E5M2 {
                return Err(TensorError::File(
                    path.into(),
                    format!(
                        "tensor {:?} is {}; fp8 weights are not supported yet",
                        t.name, t.dtype
                    ),
                ));
            }
            let Some(_) = weight_type(t.dtype) else {
                continue;
            };
            if t.shape.len() >= 2 {
                matrices.insert(t.name.clone(), (ranges.len(), t.clone()));
                ranges.push(t.range.clone());
            } else {
                let bytes = st.data(map.bytes(), t);
                let start = host_params.len() as u64;
                match t.dtype {
                    Dtype::F32 => host_params.extend(
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
                    ),
                    Dtype::F16 => host_params.extend(
                        bytes
                            .chunks_exact(2)
                            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                    ),
                    _ => host_params.extend(
                        bytes
                            .chunks_exact(2)
                            .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                    ),
                }
                vectors.insert(t.name.clone(), (start, t.elements()));
            }
        }
        let host: Arc<dyn halo_kernels::HostMemory> = map;
        let weights = device.load_weights(host, &ranges, strategy, owner)?;
        let params = if host_params.is_empty() {
            None
        } else {
            Some(device.upload_f32(&host_params, owner)?)
        };
        Ok(DeviceTensors {
            path: path.into(),
            prefix: prefix.into(),
            weights,
            matrices,
            params,
            vectors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn missing(&self, name: &str) -> TensorError {
        TensorError::Missing {
            path: self.path.clone(),
            name: format!("{}{name}", self.prefix),
        }
    }

    /// Whether the file has `name` (under the prefix).
    pub fn has(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        self.matrices.contains_key(&full) || self.vectors.contains_key(&full)
    }

    /// The PyTorch shape of matrix `name`, if the file has it.
    pub fn matrix_shape(&self, name: &str) -> Option<&[u64]> {
        let full = format!("{}{name}", self.prefix);
        self.matrices.get(&full).map(|(_, t)| t.shape.as_slice())
    }

    /// Matrix `name` of PyTorch shape `shape` ([out, in] or [out, in, kh, kw]) as rows × cols
    /// weights: rows = shape[0], cols = the product of the rest.
    pub fn matrix(&self, name: &str, shape: &[u64]) -> Result<Weights<'_>, TensorError> {
        let full = format!("{}{name}", self.prefix);
        let (i, t) = self.matrices.get(&full).ok_or_else(|| self.missing(name))?;
        if t.shape != shape {
            return Err(TensorError::Shape {
                path: self.path.clone(),
                name: full,
                want: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        let (buffer, offset) = self.weights.tensor(*i).expect("every matrix was loaded");
        Ok(Weights {
            buffer,
            offset,
            ty: weight_type(t.dtype).expect("only float matrices are kept"),
            rows: shape[0],
            cols: shape[1..].iter().product(),
        })
    }

    /// Vector `name` of `len` values, as f32.
    pub fn vector(&self, name: &str, len: u64) -> Result<F32s<'_>, TensorError> {
        let full = format!("{}{name}", self.prefix);
        let &(start, n) = self.vectors.get(&full).ok_or_else(|| self.missing(name))?;
        if n != len {
            return Err(TensorError::Shape {
                path: self.path.clone(),
                name: full,
                want: vec![len],
                got: vec![n],
            });
        }
        let params = self.params.as_ref().expect("a vector was loaded");
        Ok(F32s::all(params).sub(start, len))
    }

    /// Device bytes held: the weights plus the f32 vectors.
    pub fn bytes(&self) -> u64 {
        self.weights.bytes + self.params.as_ref().map_or(0, |p| p.len())
    }
}
