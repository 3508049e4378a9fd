//! One safetensors file's tensors on the device, the way the diffusion models use them:
//! matrices (linear and convolution weights, embedding tables) stay in the file's float type and
//! are read in place by the kernels; vectors (biases, norm weights) are converted to f32 into one
//! small buffer at load, because the elementwise and norm kernels read f32. fp8 matrices
//! (F8_E4M3, F8_E5M2) are converted to f16 at load, exactly: every fp8 value is an f16 value.
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

/// The f16 bits of an fp8 value: E5M2 is f16's top byte; E4M3 (OCP "FN": no infinities, one
/// NaN per sign) widens exactly, subnormals included.
pub fn fp8_to_f16(b: u8, dtype: Dtype) -> u16 {
    let sign = ((b & 0x80) as u16) << 8;
    if dtype == Dtype::F8E5M2 {
        return (b as u16) << 8;
    }
    let (e, m) = ((b >> 3) & 0xf, (b & 0x7) as u16);
    if e == 0xf && m == 0x7 {
        return sign | 0x7e00; // NaN
    }
    if e != 0 {
        // Bias 7 → bias 15.
        return sign | ((e as u16 + 8) << 10) | (m << 7);
    }
    if m == 0 {
        return sign;
    }
    // A subnormal m/8 · 2^-6 is normal in f16: shift the mantissa's top bit to the implicit 1.
    let shift = m.leading_zeros() - 12; // 1 for m in 4..8, 2 for 2..4, 3 for 1
    let mant = (m << shift) & 0x7;
    let exp = 15 - 6 - shift as u16;
    sign | (exp << 10) | (mant << 7)
}

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
    /// fp8 matrices converted to f16, each in its own buffer, by full name.
    converted: HashMap<String, (Buffer, Tensor)>,
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
        let mut converted = HashMap::new();
        for t in st.tensors().iter().filter(|t| t.name.starts_with(prefix)) {
            if t.dtype == Dtype::F8E4M3 || t.dtype == Dtype::F8E5M2 {
                let bytes: Vec<u8> = st
                    .data(map.bytes(), t)
                    .iter()
                    .flat_map(|&b| fp8_to_f16(b, t.dtype).to_le_bytes())
                    .collect();
                let mut buf = device.alloc(
                    halo_kernels::MemoryKind::Device,
                    bytes.len().max(2) as u64,
                    owner,
                )?;
                device.write(&mut buf, 0, &bytes)?;
                let mut as_f16 = t.clone();
                as_f16.dtype = Dtype::F16;
                converted.insert(t.name.clone(), (buf, as_f16));
                continue;
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
            converted,
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
        self.matrices.contains_key(&full)
            || self.converted.contains_key(&full)
            || self.vectors.contains_key(&full)
    }

    /// The PyTorch shape of matrix `name`, if the file has it.
    pub fn matrix_shape(&self, name: &str) -> Option<&[u64]> {
        let full = format!("{}{name}", self.prefix);
        self.matrices
            .get(&full)
            .map(|(_, t)| t.shape.as_slice())
            .or_else(|| self.converted.get(&full).map(|(_, t)| t.shape.as_slice()))
    }

    /// Matrix `name` of PyTorch shape `shape` ([out, in] or [out, in, kh, kw]) as rows × cols
    /// weights: rows = shape[0], cols = the product of the rest.
    pub fn matrix(&self, name: &str, shape: &[u64]) -> Result<Weights<'_>, TensorError> {
        let full = format!("{}{name}", self.prefix);
        let (place, t) = match (self.matrices.get(&full), self.converted.get(&full)) {
            (Some((i, t)), _) => (self.weights.tensor(*i).expect("every matrix was loaded"), t),
            (None, Some((buf, t))) => ((buf, 0), t),
            (None, None) => return Err(self.missing(name)),
        };
        if t.shape != shape {
            return Err(TensorError::Shape {
                path: self.path.clone(),
                name: full,
                want: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        let (buffer, offset) = place;
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
        self.weights.bytes
            + self.converted.values().map(|(b, _)| b.len()).sum::<u64>()
            + self.params.as_ref().map_or(0, |p| p.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_widens_to_torchs_values() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/diffusion/fp8.json"
        );
        let refs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (key, dtype) in [("F8_E4M3", Dtype::F8E4M3), ("F8_E5M2", Dtype::F8E5M2)] {
            for (code, want) in refs[key].as_array().unwrap().iter().enumerate() {
                let want = f32::from_bits(want.as_u64().unwrap() as u32);
                let got = halo_kernels::quant::f16_to_f32(fp8_to_f16(code as u8, dtype));
                if want.is_nan() {
                    assert!(got.is_nan(), "{key} {code:#04x}: {got}");
                } else {
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{key} {code:#04x}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
