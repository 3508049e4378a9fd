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
use halo_kernels::{
    charged_bytes, Buffer, Device, LoadStrategy, LoadedWeights, MemoryKind, OwnerId, WeightLayout,
};

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

/// How a file's tensors are placed: matrices read in place, fp8 matrices converted to f16,
/// vectors as f32. Integer tensors (position ids) are skipped.
struct Plan<'a> {
    matrices: Vec<&'a Tensor>,
    fp8: Vec<&'a Tensor>,
    vectors: Vec<&'a Tensor>,
}

/// The allocation group of a plan: each fp8 matrix as f16, then one buffer of all vectors.
fn group_requests(p: &Plan<'_>) -> Vec<(MemoryKind, u64)> {
    let mut r: Vec<(MemoryKind, u64)> = p
        .fp8
        .iter()
        .map(|t| (MemoryKind::Device, 2 * t.elements().max(1)))
        .collect();
    let n: u64 = p.vectors.iter().map(|t| t.elements()).sum();
    if n > 0 {
        r.push((MemoryKind::Device, 4 * n));
    }
    r
}

fn is_fp8(d: Dtype) -> bool {
    d == Dtype::F8E4M3 || d == Dtype::F8E5M2
}

fn plan<'a>(st: &'a SafeTensors, prefix: &str) -> Plan<'a> {
    let mut p = Plan {
        matrices: Vec::new(),
        fp8: Vec::new(),
        vectors: Vec::new(),
    };
    for t in st.tensors().iter().filter(|t| t.name.starts_with(prefix)) {
        let float = weight_type(t.dtype).is_some() || is_fp8(t.dtype);
        match (float, t.shape.len() >= 2, is_fp8(t.dtype)) {
            (false, _, _) => {}
            (true, true, true) => p.fp8.push(t),
            (true, true, false) => p.matrices.push(t),
            (true, false, _) => p.vectors.push(t),
        }
    }
    p
}

/// The value of element `i` of a float vector tensor's bytes, as f32.
fn element(bytes: &[u8], dtype: Dtype, i: usize) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        Dtype::F16 => f16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        Dtype::BF16 => bf16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        d => f16_to_f32(fp8_to_f16(bytes[i], d)),
    }
}

impl DeviceTensors {
    /// Device bytes [`Self::load`] will hold for this header with this layout: the matrices as
    /// the weight loader lays them out, and the converted fp8 matrices and the f32 vectors as one
    /// group (charged exactly).
    pub fn estimate(
        st: &SafeTensors,
        prefix: &str,
        layout: WeightLayout,
    ) -> Result<u64, TensorError> {
        let p = plan(st, prefix);
        let ranges: Vec<_> = p.matrices.iter().map(|t| t.range.clone()).collect();
        let group: u64 = group_requests(&p)
            .iter()
            .map(|&(_, len)| charged_bytes(len))
            .sum();
        Ok(layout.bytes(&ranges)? + group)
    }

    /// Loads every float tensor of `path` whose name starts with `prefix` (see [`Plan`]).
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
        let p = plan(&st, prefix);
        let ranges: Vec<_> = p.matrices.iter().map(|t| t.range.clone()).collect();
        let matrices = p
            .matrices
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), (i, (*t).clone())))
            .collect();
        // One group for the converted matrices and the vectors.
        let mut buffers = device.alloc_many(&group_requests(&p), owner)?.into_iter();
        let mut converted = HashMap::new();
        for t in &p.fp8 {
            let bytes: Vec<u8> = st
                .data(map.bytes(), t)
                .iter()
                .flat_map(|&b| fp8_to_f16(b, t.dtype).to_le_bytes())
                .collect();
            let mut buf = buffers.next().expect("a buffer per fp8 matrix");
            device.write(&mut buf, 0, &bytes)?;
            let mut as_f16 = (*t).clone();
            as_f16.dtype = Dtype::F16;
            converted.insert(t.name.clone(), (buf, as_f16));
        }
        let mut host_params: Vec<f32> = Vec::new();
        let mut vectors = HashMap::new();
        for t in &p.vectors {
            let bytes = st.data(map.bytes(), t);
            let start = host_params.len() as u64;
            host_params.extend((0..t.elements() as usize).map(|i| element(bytes, t.dtype, i)));
            vectors.insert(t.name.clone(), (start, t.elements()));
        }
        let params = match buffers.next() {
            Some(mut b) => {
                device.write_f32(&mut b, 0, &host_params)?;
                Some(b)
            }
            None => None,
        };
        let host: Arc<dyn halo_kernels::HostMemory> = map;
        let weights = device.load_weights(host, &ranges, strategy, owner)?;
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
            + self
                .converted
                .values()
                .map(|(b, _)| charged_bytes(b.len()))
                .sum::<u64>()
            + self.params.as_ref().map_or(0, |p| charged_bytes(p.len()))
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
