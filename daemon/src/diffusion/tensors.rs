//! One safetensors file's tensors on the device, the way the diffusion models use them:
//! matrices (linear and convolution weights, embedding tables) stay in the file's float type and
//! are read in place by the kernels; vectors (biases, norm weights) are converted to f32 into one
//! small buffer at load, because the elementwise and norm kernels read f32. fp8 matrices
//! (F8_E4M3, F8_E5M2) are converted to f16 at load, exactly: every fp8 value is an f16 value.
//!
//! A component names its tensors as diffusers does. A diffusers file uses those names; a
//! single-file checkpoint keeps each component under its original names, which [`Names::Mapped`]
//! translates (see `single_file`). Every lookup checks the shape the model expects, so a wrong
//! file is an error naming the tensor, not a garbage image.

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

/// Which of a file's tensors a component loads, and the names the component knows them by.
#[derive(Clone, Debug)]
pub enum Names {
    /// The tensors whose names start with a prefix (in a diffusers folder, the empty one), under
    /// the rest of their names.
    Prefix(String),
    /// Tensors under other names: a single-file checkpoint's original keys mapped to diffusers'
    /// names, some of them slices or transposes of a file tensor (see [`Entry`]).
    Mapped {
        /// What the tensors are, for messages: "the UNet of a single-file checkpoint".
        what: &'static str,
        map: fn(&[Tensor]) -> Result<Vec<Entry>, String>,
    },
}

impl From<&str> for Names {
    fn from(prefix: &str) -> Names {
        Names::Prefix(prefix.into())
    }
}

impl Names {
    fn entries(&self, st: &SafeTensors) -> Result<Vec<Entry>, String> {
        match self {
            Names::Prefix(prefix) => Ok(st
                .tensors()
                .iter()
                .filter_map(|t| {
                    t.name.strip_prefix(prefix.as_str()).map(|rest| Entry {
                        name: rest.into(),
                        tensor: t.clone(),
                        transpose: false,
                    })
                })
                .collect()),
            Names::Mapped { what, map } => map(st.tensors()).map_err(|e| format!("{what}: {e}")),
        }
    }

    /// How the file itself names the tensor a component calls `name`.
    fn in_file(&self, name: &str) -> String {
        match self {
            Names::Prefix(prefix) => format!("{prefix}{name}"),
            Names::Mapped { what, .. } => format!("{name} (diffusers' name, in {what})"),
        }
    }
}

/// One tensor a component loads: the name it looks it up by, and where its values are. The
/// tensor may be a slice of a file tensor (its own dtype, shape and byte range: the rows of a
/// fused q/k/v projection) and may be stored transposed (a 2-D `[in, out]` projection).
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub tensor: Tensor,
    /// The file holds the transpose of the 2-D matrix the component reads; `tensor.shape` is
    /// the file's shape.
    pub transpose: bool,
}

/// The tensors a component loaded from one file.
pub struct DeviceTensors {
    path: PathBuf,
    names: Names,
    weights: LoadedWeights,
    /// Matrices read in place: their index in `weights` and their header entry.
    matrices: HashMap<String, (usize, Tensor)>,
    /// Matrices converted at load (fp8 to f16, transposed), each in its own buffer.
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

/// How a component's tensors are placed: matrices read in place, fp8 and transposed matrices
/// converted into buffers of their own, vectors as f32. Integer tensors (position ids) are
/// skipped.
struct Plan {
    matrices: Vec<Entry>,
    converted: Vec<Entry>,
    vectors: Vec<Entry>,
}

/// The element type a converted matrix is stored in: fp8 widens to f16, others keep theirs.
fn converted_dtype(d: Dtype) -> Dtype {
    if is_fp8(d) {
        Dtype::F16
    } else {
        d
    }
}

/// The allocation group of a plan: each converted matrix, then one buffer of all vectors.
fn group_requests(p: &Plan) -> Vec<(MemoryKind, u64)> {
    let mut r: Vec<(MemoryKind, u64)> = p
        .converted
        .iter()
        .map(|e| {
            let size = converted_dtype(e.tensor.dtype).size();
            (MemoryKind::Device, size * e.tensor.elements().max(1))
        })
        .collect();
    let n: u64 = p.vectors.iter().map(|e| e.tensor.elements()).sum();
    if n > 0 {
        r.push((MemoryKind::Device, 4 * n));
    }
    r
}

fn is_fp8(d: Dtype) -> bool {
    d == Dtype::F8E4M3 || d == Dtype::F8E5M2
}

fn plan(entries: Vec<Entry>) -> Plan {
    let mut p = Plan {
        matrices: Vec::new(),
        converted: Vec::new(),
        vectors: Vec::new(),
    };
    for e in entries {
        let t = &e.tensor;
        let float = weight_type(t.dtype).is_some() || is_fp8(t.dtype);
        match (float, t.shape.len() >= 2, is_fp8(t.dtype) || e.transpose) {
            (false, _, _) => {}
            (true, true, true) => p.converted.push(e),
            (true, true, false) => p.matrices.push(e),
            (true, false, _) => p.vectors.push(e),
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

/// A converted matrix's bytes: fp8 widened to f16, and a 2-D `[rows, cols]` transposed to
/// `[cols, rows]` when asked. Returns the bytes and the header entry they now match.
fn convert(bytes: &[u8], e: &Entry) -> (Vec<u8>, Tensor) {
    let t = &e.tensor;
    let widened: Vec<u8>;
    let (data, size) = if is_fp8(t.dtype) {
        widened = bytes
            .iter()
            .flat_map(|&b| fp8_to_f16(b, t.dtype).to_le_bytes())
            .collect();
        (widened.as_slice(), 2)
    } else {
        (bytes, t.dtype.size() as usize)
    };
    let mut out = Tensor {
        dtype: converted_dtype(t.dtype),
        ..t.clone()
    };
    if !e.transpose {
        return (data.to_vec(), out);
    }
    let (rows, cols) = (
        t.shape[0] as usize,
        t.shape[1..].iter().product::<u64>() as usize,
    );
    let mut moved = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
            moved[to..to + size].copy_from_slice(&data[from..from + size]);
        }
    }
    out.shape = vec![cols as u64, rows as u64];
    (moved, out)
}

impl DeviceTensors {
    /// Device bytes [`Self::load`] will hold for this header with this layout: the matrices as
    /// the weight loader lays them out, and the converted matrices and the f32 vectors as one
    /// group (charged exactly).
    pub fn estimate(
        st: &SafeTensors,
        names: impl Into<Names>,
        layout: WeightLayout,
    ) -> Result<u64, String> {
        let p = plan(names.into().entries(st)?);
        let ranges: Vec<_> = p.matrices.iter().map(|e| e.tensor.range.clone()).collect();
        let group: u64 = group_requests(&p)
            .iter()
            .map(|&(_, len)| charged_bytes(len))
            .sum();
        Ok(layout.bytes(&ranges).map_err(|e| e.to_string())? + group)
    }

    /// Loads the float tensors `names` selects from `path` (see [`Plan`]).
    pub fn load(
        device: &Device,
        path: &Path,
        names: impl Into<Names>,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<DeviceTensors, TensorError> {
        let names = names.into();
        let map = Arc::new(Mapping::open(path).map_err(|e| TensorError::Io(path.into(), e))?);
        let st = SafeTensors::parse(map.bytes())
            .map_err(|e| TensorError::File(path.into(), e.to_string()))?;
        let p = plan(
            names
                .entries(&st)
                .map_err(|e| TensorError::File(path.into(), e))?,
        );
        let ranges: Vec<_> = p.matrices.iter().map(|e| e.tensor.range.clone()).collect();
        // One group for the converted matrices and the vectors.
        let mut buffers = device.alloc_many(&group_requests(&p), owner)?.into_iter();
        let mut converted = HashMap::new();
        for e in &p.converted {
            let (bytes, t) = convert(st.data(map.bytes(), &e.tensor), e);
            let mut buf = buffers.next().expect("a buffer per converted matrix");
            device.write(&mut buf, 0, &bytes)?;
            converted.insert(e.name.clone(), (buf, t));
        }
        let mut host_params: Vec<f32> = Vec::new();
        let mut vectors = HashMap::new();
        for e in &p.vectors {
            let t = &e.tensor;
            let bytes = st.data(map.bytes(), t);
            let start = host_params.len() as u64;
            host_params.extend((0..t.elements() as usize).map(|i| element(bytes, t.dtype, i)));
            vectors.insert(e.name.clone(), (start, t.elements()));
        }
        let params = match buffers.next() {
            Some(mut b) => {
                device.write_f32(&mut b, 0, &host_params)?;
                Some(b)
            }
            None => None,
        };
        let matrices = p
            .matrices
            .into_iter()
            .enumerate()
            .map(|(i, e)| (e.name, (i, e.tensor)))
            .collect();
        let host: Arc<dyn halo_kernels::HostMemory> = map;
        let weights = device.load_weights(host, &ranges, strategy, owner)?;
        Ok(DeviceTensors {
            path: path.into(),
            names,
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
            name: self.names.in_file(name),
        }
    }

    /// Whether the component has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.matrices.contains_key(name)
            || self.converted.contains_key(name)
            || self.vectors.contains_key(name)
    }

    /// The PyTorch shape of matrix `name`, if the component has it.
    pub fn matrix_shape(&self, name: &str) -> Option<&[u64]> {
        self.matrices
            .get(name)
            .map(|(_, t)| t.shape.as_slice())
            .or_else(|| self.converted.get(name).map(|(_, t)| t.shape.as_slice()))
    }

    /// Matrix `name` of PyTorch shape `shape` ([out, in] or [out, in, kh, kw]) as rows × cols
    /// weights: rows = shape[0], cols = the product of the rest.
    pub fn matrix(&self, name: &str, shape: &[u64]) -> Result<Weights<'_>, TensorError> {
        let (place, t) = match (self.matrices.get(name), self.converted.get(name)) {
            (Some((i, t)), _) => (self.weights.tensor(*i).expect("every matrix was loaded"), t),
            (None, Some((buf, t))) => ((buf, 0), t),
            (None, None) => return Err(self.missing(name)),
        };
        if t.shape != shape {
            return Err(TensorError::Shape {
                path: self.path.clone(),
                name: self.names.in_file(name),
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
        let &(start, n) = self.vectors.get(name).ok_or_else(|| self.missing(name))?;
        if n != len {
            return Err(TensorError::Shape {
                path: self.path.clone(),
                name: self.names.in_file(name),
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
