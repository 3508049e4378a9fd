//! safetensors reader: the 8-byte header length, the JSON header, and every tensor's place in
//! the file, checked before anything is read.
//!
//! A safetensors file is a little-endian u64 `n`, then `n` bytes of JSON (an object mapping each
//! tensor's name to its `dtype`, `shape` and `data_offsets`, plus an optional `__metadata__`
//! object of strings), then the data. Offsets are relative to the first byte after the header.
//! [`SafeTensors::parse`] checks everything a reader later relies on:
//! - the header fits the file and is at most [`MAX_HEADER`] bytes of UTF-8 JSON;
//! - every tensor has a known dtype, a shape whose byte size does not overflow, and a byte range
//!   inside the file whose length is exactly shape × dtype size;
//! - no name appears twice (JSON allows it; a reader keeping the last one would be silently
//!   wrong) and no two tensors' bytes overlap.
//!
//! Errors say what is wrong; the caller adds the file's name. Nothing is copied: tensors are
//! byte ranges of the caller's slice (usually a memory map). Fuzzed: `daemon/fuzz`, target
//! `safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;

/// The largest header read (the format's reference reader has the same limit).
pub const MAX_HEADER: u64 = 100_000_000;
/// More dimensions than any model uses; a bound on hostile shapes.
const MAX_DIMS: usize = 8;

/// Element types of the safetensors format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, no infinities (OCP "E4M3FN").
    F8E4M3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (IEEE-like).
    F8E5M2,
}

impl Dtype {
    /// The name in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    fn from_name(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tensor: what it holds and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    /// Dimensions, outermost first (row-major, as PyTorch stores them).
    pub shape: Vec<u64>,
    /// Byte range in the file (absolute: the header is already added).
    pub range: Range<u64>,
}

impl Tensor {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        self.range.end - self.range.start
    }
}

/// A parsed header.
#[derive(Clone, Debug, Default)]
pub struct SafeTensors {
    /// In file order (by data offset).
    tensors: Vec<Tensor>,
    by_name: HashMap<String, usize>,
    /// The `__metadata__` object, if any.
    pub metadata: BTreeMap<String, String>,
    /// Where the data section starts (8 + header length).
    pub data_start: u64,
}

/// What is wrong with a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SafetensorsError {
    /// Shorter than the 8-byte length, or the header runs past the end.
    Truncated(String),
    /// The header is not the JSON the format prescribes.
    BadHeader(String),
    /// A tensor's entry is wrong; names the tensor.
    BadTensor { name: String, message: String },
}

impl fmt::Display for SafetensorsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SafetensorsError::Truncated(m) => write!(f, "not a complete safetensors file: {m}"),
            SafetensorsError::BadHeader(m) => write!(f, "bad safetensors header: {m}"),
            SafetensorsError::BadTensor { name, message } => {
                write!(f, "bad safetensors tensor {name:?}: {message}")
            }
        }
    }
}

impl std::error::Error for SafetensorsError {}

/// One header entry as JSON gives it; checked into a [`Tensor`] afterwards.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's top-level object, keeping every key in order, duplicates included.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

impl SafeTensors {
    /// Parses the header at the start of `file` (the whole file: its length bounds every range).
    pub fn parse(file: &[u8]) -> Result<SafeTensors, SafetensorsError> {
        let len = file.len() as u64;
        let Some(n) = file.get(..8) else {
            return Err(SafetensorsError::Truncated(format!(
                "{len} bytes, less than the 8-byte header length"
            )));
        };
        let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Err(SafetensorsError::BadHeader(format!(
                "a header of {n} bytes is over the {MAX_HEADER}-byte limit"
            )));
        }
        if n > len - 8 {
            return Err(SafetensorsError::Truncated(format!(
                "a header of {n} bytes does not fit the {} bytes after its length",
                len - 8
            )));
        }
        let header = &file[8..8 + n as usize];
        let header = std::str::from_utf8(header)
            .map_err(|e| SafetensorsError::BadHeader(format!("not UTF-8: {e}")))?;
        // Writers may pad the header with spaces to align the data.
        let header = header.trim_end_matches(' ');
        if !header.starts_with('{') {
            return Err(SafetensorsError::BadHeader(
                "it does not start with a JSON object".into(),
            ));
        }
        let Entries(entries) = serde_json::from_str(header)
            .map_err(|e| SafetensorsError::BadHeader(format!("not valid JSON: {e}")))?;

        let data_start = 8 + n;
        let data_len = len - data_start;
        let mut st = SafeTensors {
            data_start,
            ..Default::default()
        };
        let mut seen_metadata = false;
        for (name, value) in entries {
            if name == "__metadata__" {
                if seen_metadata {
                    return Err(SafetensorsError::BadHeader(
                        "__metadata__ appears twice".into(),
                    ));
                }
                seen_metadata = true;
                st.metadata = serde_json::from_value(value).map_err(|e| {
                    SafetensorsError::BadHeader(format!(
                        "__metadata__ is not an object of strings: {e}"
                    ))
                })?;
                continue;
            }
            let bad = |message: String| SafetensorsError::BadTensor {
                name: name.clone(),
                message,
            };
            if st.by_name.contains_key(&name) {
                return Err(bad("the name appears twice in the header".into()));
            }
            let raw: RawTensor = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            let dtype = Dtype::from_name(&raw.dtype)
                .ok_or_else(|| bad(format!("unknown dtype {:?}", raw.dtype)))?;
            if raw.shape.len() > MAX_DIMS {
                return Err(bad(format!(
                    "{} dimensions, more than {MAX_DIMS}",
                    raw.shape.len()
                )));
            }
            let bytes = raw
                .shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {:?} is too large", raw.shape)))?;
            let [begin, end] = raw.data_offsets;
            if begin > end || end > data_len {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] are not inside the {data_len} data bytes"
                )));
            }
            if end - begin != bytes {
                return Err(bad(format!(
                    "shape {:?} of {dtype} is {bytes} bytes, but data_offsets [{begin}, {end}] \
                     hold {}",
                    raw.shape,
                    end - begin
                )));
            }
            st.by_name.insert(name.clone(), st.tensors.len());
            st.tensors.push(Tensor {
                name,
                dtype,
                shape: raw.shape,
                range: data_start + begin..data_start + end,
            });
        }

        st.tensors.sort_by_key(|t| (t.range.start, t.range.end));
        for w in st.tensors.windows(2) {
            // Empty tensors occupy nothing, so they overlap nothing.
            if w[0].bytes() > 0 && w[1].bytes() > 0 && w[1].range.start < w[0].range.end {
                return Err(SafetensorsError::BadTensor {
                    name: w[1].name.clone(),
                    message: format!("its bytes overlap those of {:?}", w[0].name),
                });
            }
        }
        st.by_name = st
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(st)
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The bytes of `t` in `file`, the slice this header was parsed from.
    pub fn data<'a>(&self, file: &'a [u8], t: &Tensor) -> &'a [u8] {
        &file[t.range.start as usize..t.range.end as usize]
    }
}

/// Builds a safetensors file from (name, dtype, shape, data) in the given order; for tests and
/// tools that write fixtures. Pads the header with spaces to 8 bytes, as the reference writer does.
pub fn write(tensors: &[(&str, Dtype, &[u64], &[u8])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        header.insert("__metadata__".into(), m.into());
    }
    let mut offset = 0u64;
    for (name, dtype, shape, data) in tensors {
        let end = offset + data.len() as u64;
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype.as_str(), "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header).expect("a JSON map serializes");
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A file with the given raw header JSON and `data` bytes after it.
    fn raw(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data));
        out
    }

    fn err(file: &[u8]) -> String {
        SafeTensors::parse(file).unwrap_err().to_string()
    }

    #[test]
    fn reads_what_the_writer_wrote() {
        let a = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = vec![7u8; 6];
        let file = write(
            &[
                ("a", Dtype::F32, &[2, 3], &a),
                ("b", Dtype::F16, &[3], &b),
                ("empty", Dtype::BF16, &[0, 4], &[]),
            ],
            &[("format", "pt")],
        );
        let st = SafeTensors::parse(&file).unwrap();
        assert_eq!(st.len(), 3);
        assert_eq!(st.metadata["format"], "pt");
        assert_eq!(st.data_start % 8, 0);
        let t = st.get("a").unwrap();
        assert_eq!(
            (t.dtype, t.shape.as_slice(), t.elements()),
            (Dtype::F32, &[2, 3][..], 6)
        );
        assert_eq!(st.data(&file, t), a.as_slice());
        assert_eq!(st.data(&file, st.get("b").unwrap()), b.as_slice());
        assert_eq!(st.get("empty").unwrap().bytes(), 0);
        assert!(st.get("c").is_none());
    }

    #[test]
    fn every_dtype_has_its_size() {
        for (name, size) in [
            ("BOOL", 1),
            ("U8", 1),
            ("I8", 1),
            ("F8_E4M3", 1),
            ("F8_E5M2", 1),
            ("I16", 2),
            ("U16", 2),
            ("F16", 2),
            ("BF16", 2),
            ("I32", 4),
            ("U32", 4),
            ("F32", 4),
            ("I64", 8),
            ("U64", 8),
            ("F64", 8),
        ] {
            let d = Dtype::from_name(name).unwrap();
            assert_eq!((d.size(), d.as_str()), (size, name));
            let h = format!(
                r#"{{"t":{{"dtype":"{name}","shape":[3],"data_offsets":[0,{}]}}}}"#,
                3 * size
            );
            SafeTensors::parse(&raw(&h, 3 * size as usize)).unwrap();
        }
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let t = |dtype: &str, shape: &str, offs: &str| {
            format!(r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offs}}}}}"#)
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "less than the 8-byte header length"),
            (raw("{}", 0)[..9].to_vec(), "does not fit"),
            (
                {
                    let mut f = raw("{}", 0);
                    f[..8].copy_from_slice(&(MAX_HEADER + 1).to_le_bytes());
                    f
                },
                "over the",
            ),
            (raw("[1,2]", 0), "does not start with a JSON object"),
            (raw("{\"w\": ", 0), "not valid JSON"),
            (raw("{\"a\":\u{1}}", 0), "not valid JSON"),
            (
                raw(&t("F32", "[2]", "[0,8]"), 4),
                "not inside the 4 data bytes",
            ),
            (raw(&t("F32", "[2]", "[4,0]"), 8), "not inside"),
            (
                raw(&t("F32", "[3]", "[0,8]"), 8),
                "is 12 bytes, but data_offsets [0, 8] hold 8",
            ),
            (raw(&t("Q4", "[2]", "[0,8]"), 8), "unknown dtype \"Q4\""),
            (
                raw(&t("F32", "[4294967296,4294967296]", "[0,8]"), 8),
                "is too large",
            ),
            (
                raw(&t("F32", "[1,1,1,1,1,1,1,1,1]", "[0,4]"), 4),
                "9 dimensions",
            ),
            (
                raw(&t("F32", "[-1]", "[0,4]"), 4),
                "bad safetensors tensor \"w\"",
            ),
            (
                raw(
                    r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                    4,
                ),
                "unknown field",
            ),
            (
                raw(
                    r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
                    8,
                ),
                "\"w\": the name appears twice",
            ),
            (
                raw(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                    8,
                ),
                "\"b\": its bytes overlap those of \"a\"",
            ),
            (
                raw(r#"{"__metadata__":{"a":1}}"#, 0),
                "__metadata__ is not an object of strings",
            ),
        ];
        for (file, want) in cases {
            let e = err(&file);
            assert!(e.contains(want), "{e:?} does not contain {want:?}");
        }
    }

    #[test]
    fn padding_and_empty_tensors_are_fine() {
        let h = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}     "#;
        let st = SafeTensors::parse(&raw(h, 2)).unwrap();
        assert_eq!(st.tensors().iter().map(|t| t.bytes()).sum::<u64>(), 2);
        assert!(SafeTensors::parse(&raw("{}", 0)).unwrap().is_empty());
    }
}
