//! GGUF (version 2 and 3) reader: the header, every metadata value type, tensor infos and the data
//! section's alignment, parsed from a byte slice (usually a memory map) into plain structs.
//!
//! Every length and offset read from the file is checked against what is left of it before it is
//! used, so a truncated or hostile file gives a [`GgufError`] naming what is wrong, never a panic
//! or a huge allocation. The parser is fuzzed (`daemon/fuzz`, target `gguf`).
//!
//! Architecture invariant: no I/O here beyond what [`GgufFile::open`] maps; tensor data is never
//! copied, only located (`TensorInfo::offset` is relative to `data_offset`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use halo_kernels::quant::WeightType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// GGUF allows at most 4 dimensions per tensor.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor's data is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    pub ty: WeightType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
}

/// What is wrong with a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufError {
    BadMagic,
    UnsupportedVersion(u32),
    Truncated {
        at: u64,
        what: String,
    },
    BadString {
        at: u64,
    },
    UnknownValueType {
        key: String,
        ty: u32,
    },
    TooManyDims {
        tensor: String,
        dims: u32,
    },
    UnknownTensorType {
        tensor: String,
        ty: u32,
    },
    BadShape {
        tensor: String,
        message: String,
    },
    TensorPastEnd {
        tensor: String,
        end: u64,
        file_len: u64,
    },
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    BadAlignment(u64),
    DuplicateKey(String),
    DuplicateTensor(String),
    MissingKey(String),
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    MissingTensor(String),
    /// A metadata value of the right type that no model can have (zero heads, a million layers).
    BadValue {
        key: String,
        message: String,
    },
    ShapeMismatch {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgufError::*;
        match self {
            // The bytes found stay out of the message: it reaches every client, and the file may
            // be one the daemon can read but they should not (a path that links to a secret).
            BadMagic => write!(f, "not a GGUF file (bad magic)"),
            UnsupportedVersion(v) => write!(f, "GGUF version {v} is not supported (halo reads versions 2 and 3)"),
            Truncated { at, what } => write!(f, "the file ends at byte {at} in the middle of {what} (truncated download?)"),
            BadString { at } => write!(f, "the string at byte {at} is not valid UTF-8"),
            UnknownValueType { key, ty } => write!(f, "metadata {key:?} has unknown value type {ty}"),
            TooManyDims { tensor, dims } => write!(f, "tensor {tensor:?} has {dims} dimensions (at most {MAX_DIMS})"),
            UnknownTensorType { tensor, ty } => write!(f, "tensor {tensor:?} has type {ty}, which halo does not support (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)"),
            BadShape { tensor, message } => write!(f, "tensor {tensor:?}: {message}"),
            TensorPastEnd { tensor, end, file_len } => write!(f, "tensor {tensor:?} ends at byte {end}, past the end of the {file_len}-byte file (truncated?)"),
            Misaligned { tensor, offset, alignment } => write!(f, "tensor {tensor:?} starts at data offset {offset}, not a multiple of the alignment {alignment}"),
            BadAlignment(a) => write!(f, "general.alignment = {a} is not a power of two"),
            DuplicateKey(k) => write!(f, "metadata key {k:?} appears twice"),
            DuplicateTensor(t) => write!(f, "tensor {t:?} appears twice"),
            MissingKey(k) => write!(f, "required metadata key {k:?} is missing"),
            WrongType { key, expected, found } => write!(f, "metadata {key:?} is a {found}, expected {expected}"),
            MissingTensor(t) => write!(f, "required tensor {t:?} is missing"),
            BadValue { key, message } => write!(f, "metadata {key:?}: {message}"),
            ShapeMismatch { tensor, expected, found } => write!(f, "tensor {tensor:?} has shape {found:?}, expected {expected:?}"),
        }
    }
}

impl std::error::Error for GgufError {}

/// A GGUF problem in a named file.
#[derive(Debug)]
pub struct GgufFileError {
    pub path: PathBuf,
    pub error: GgufFileErrorKind,
}

#[derive(Debug)]
pub enum GgufFileErrorKind {
    Io(std::io::Error),
    Format(GgufError),
}

impl fmt::Display for GgufFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            GgufFileErrorKind::Io(e) => write!(f, "{}: {e}", self.path.display()),
            GgufFileErrorKind::Format(e) => write!(f, "{}: {e}", self.path.display()),
        }
    }
}

impl std::error::Error for GgufFileError {}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(GgufError::Truncated {
                at: self.bytes.len() as u64,
                what: what(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// A count that is about to size an allocation: it can never exceed the bytes left, since
    /// every element takes at least `min_elem` bytes.
    fn count(&mut self, min_elem: u64, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_elem.max(1)) > self.remaining() {
            return Err(GgufError::Truncated {
                at: self.bytes.len() as u64,
                what: format!("{} ({n} entries announced)", what()),
            });
        }
        Ok(n)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.count(1, what)?;
        let at = self.pos as u64;
        let s = self.take(len as usize, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::BadString { at })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        let what = || format!("the value of {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => Value::Bool(self.array::<1>(&what)?[0] != 0),
            8 => Value::String(self.string(&what)?),
            9 if depth == 0 => {
                let elem = self.u32(&what)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(GgufError::UnknownValueType {
                            key: key.to_string(),
                            ty: elem,
                        })
                    }
                };
                let n = self.count(min, &what)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    ty,
                })
            }
        })
    }
}

impl Gguf {
    /// Parses the header of a GGUF file held in `bytes` and checks every tensor lies inside it.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic: [u8; 4] = r.array(&|| "the magic number".into())?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic);
        }
        let version = r.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // A tensor info takes at least 8 (name len) + 4 + 4 + 8 bytes; a key-value 8 + 4 + 1.
        let n_tensors = r.count(24, &|| "the tensor count".into())?;
        let n_kv = r.count(13, &|| "the metadata count".into())?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let ty = r.u32(&|| format!("the type of {key:?}"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                Some(a) => return Err(GgufError::BadAlignment(a)),
                None => {
                    return Err(GgufError::WrongType {
                        key: "general.alignment".into(),
                        expected: "integer",
                        found: v.type_name(),
                    })
                }
            },
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("the name of tensor #{i}"))?;
            let what = || format!("the info of tensor {name:?}");
            let n_dims = r.u32(&what)?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    tensor: name,
                    dims: n_dims,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let ty_id = r.u32(&what)?;
            let offset = r.u64(&what)?;
            let ty =
                WeightType::from_ggml_id(ty_id).ok_or_else(|| GgufError::UnknownTensorType {
                    tensor: name.clone(),
                    ty: ty_id,
                })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, d| acc.checked_mul(*d))
                .ok_or_else(|| GgufError::BadShape {
                    tensor: name.clone(),
                    message: format!("{dims:?} overflows"),
                })?;
            let inner = dims.first().copied().unwrap_or(1);
            if inner % ty.block_elems() as u64 != 0 {
                return Err(GgufError::BadShape {
                    tensor: name,
                    message: format!(
                        "first dimension {inner} is not a multiple of the {} block size {}",
                        ty.name(),
                        ty.block_elems()
                    ),
                });
            }
            let size = (elements / ty.block_elems() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| GgufError::BadShape {
                    tensor: name.clone(),
                    message: "size overflows".into(),
                })?;
            if offset % alignment != 0 {
                return Err(GgufError::Misaligned {
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            if !names.insert(name.clone()) {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size))
                .unwrap_or(u64::MAX);
            if end > file_len {
                return Err(GgufError::TensorPastEnd {
                    tensor: t.name.clone(),
                    end,
                    file_len,
                });
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// A required metadata value.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        v.as_u64().ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected: "unsigned integer",
            found: v.type_name(),
        })
    }

    /// A required float (integers are accepted).
    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected: "number",
            found: v.type_name(),
        })
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected: "string",
            found: v.type_name(),
        })
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The tensor called `name`, which must have exactly `dims`.
    pub fn tensor_shaped(&self, name: &str, dims: &[u64]) -> Result<&TensorInfo, GgufError> {
        let t = self.tensor(name)?;
        if t.dims != dims {
            return Err(GgufError::ShapeMismatch {
                tensor: name.to_string(),
                expected: dims.to_vec(),
                found: t.dims.clone(),
            });
        }
        Ok(t)
    }

    /// The file range of a tensor's data.
    pub fn range(&self, t: &TensorInfo) -> std::ops::Range<u64> {
        let start = self.data_offset + t.offset;
        start..start + t.size
    }
}

/// A GGUF file mapped into memory with its parsed header.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Gguf,
    pub map: std::sync::Arc<crate::models::Mapping>,
}

impl GgufFile {
    /// Maps and parses `path`; every error names the file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufFileError> {
        Self::open_with(path, false)
    }

    /// Like [`GgufFile::open`], with a read lease on the file (see
    /// [`crate::models::Mapping::open_leased`]), for weights used from the mapped pages.
    pub fn open_leased(path: &Path) -> Result<GgufFile, GgufFileError> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, lease: bool) -> Result<GgufFile, GgufFileError> {
        let err = |error| GgufFileError {
            path: path.to_path_buf(),
            error,
        };
        let map = if lease {
            crate::models::Mapping::open_leased(path)
        } else {
            crate::models::Mapping::open(path)
        };
        let map = map
            .map(std::sync::Arc::new)
            .map_err(|e| err(GgufFileErrorKind::Io(e)))?;
        let header = Gguf::parse(map.bytes()).map_err(|e| err(GgufFileErrorKind::Format(e)))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            map,
        })
    }
}

/// Writes GGUF files, for tests and fixtures (the same layout the reader expects).
#[cfg(test)]
pub(crate) mod write {
    use super::*;

    pub fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A GGUF v3 file with `kv` (key, type id, encoded value bytes) and f32 tensors.
    pub fn file(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, ty, v) in kv {
            string(&mut out, k);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(v);
        }
        let mut offset = 0u64;
        for (name, dims, data) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64 * 4).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, data) in tensors {
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::*;
    use super::*;

    fn sample() -> Vec<u8> {
        let mut arr = Vec::new();
        arr.extend_from_slice(&8u32.to_le_bytes());
        arr.extend_from_slice(&2u64.to_le_bytes());
        string(&mut arr, "a");
        string(&mut arr, "bé");
        let mut s = Vec::new();
        string(&mut s, "llama");
        file(
            &[
                ("general.architecture", 8, s),
                ("llama.block_count", 4, 2u32.to_le_bytes().to_vec()),
                ("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.tokens", 9, arr),
                ("flag", 7, vec![1]),
                ("big", 10, 7u64.to_le_bytes().to_vec()),
            ],
            &[
                (
                    "tok_embd.weight",
                    vec![4, 3],
                    (0..12).map(|i| i as f32).collect(),
                ),
                ("norm.weight", vec![4], vec![1.0; 4]),
            ],
        )
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(g.get("flag").unwrap().as_bool(), Some(true));
        assert_eq!(g.u64("big").unwrap(), 7);
        let toks = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks[1].as_str(), Some("bé"));
        let t = g.tensor_shaped("tok_embd.weight", &[4, 3]).unwrap();
        assert_eq!((t.ty, t.size, t.elements()), (WeightType::F32, 48, 12));
        let r = g.range(t);
        let first: Vec<f32> = bytes[r.start as usize..r.end as usize]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(first[5], 5.0);
        assert_eq!(
            g.range(g.tensor("norm.weight").unwrap()).start,
            g.data_offset + 64
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        // Past the last tensor's data there is only alignment padding, which may be cut.
        let end = g.tensors.iter().map(|t| g.range(t).end).max().unwrap();
        assert!(Gguf::parse(&bytes[..end as usize]).is_ok());
        for cut in 0..end as usize {
            let e = Gguf::parse(&bytes[..cut]);
            assert!(e.is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let mut bytes = sample();
        assert!(matches!(
            Gguf::parse(b"GGML\x03\0\0\0"),
            Err(GgufError::BadMagic)
        ));
        bytes[4] = 9;
        assert_eq!(Gguf::parse(&bytes), Err(GgufError::UnsupportedVersion(9)));
        let g = Gguf::parse(&sample()).unwrap();
        assert_eq!(g.u64("nope"), Err(GgufError::MissingKey("nope".into())));
        assert!(matches!(
            g.u64("general.architecture"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            g.tensor_shaped("norm.weight", &[5]),
            Err(GgufError::ShapeMismatch { .. })
        ));
        let t = file(&[], &[("x", vec![4], vec![0.0; 4])]);
        // Unknown tensor type: patch the type id (right after the dims).
        let mut bad = t.clone();
        let at = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8;
        bad[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bad),
            Err(GgufError::UnknownTensorType { ty: 99, .. })
        ));
        // Tensor past the end: drop the data.
        let short = &t[..t.len() - 32];
        let e = Gguf::parse(short).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bytes),
            Err(GgufError::Truncated { .. })
        ));
    }
}
