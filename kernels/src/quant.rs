//! CPU reference for the GGUF weight types halo reads.
//!
//! This module knows the byte layout of every supported GGUF tensor element
//! type and turns stored blocks back into `f32` values exactly the way ggml's
//! reference dequantizers do, bit for bit. The GPU kernels are checked
//! against it: [`dequantize`], [`dot_row`] and [`matvec`] are slow but simple
//! and are meant to be the ground truth, not a fast path.
//!
//! Bit-exactness depends on doing the arithmetic in the same order as ggml,
//! in `f32`, without fused multiply-adds. For example Q4_K computes
//! `(d * sc) * q - (dmin * m)` with each product rounded to `f32` on its own;
//! the code below keeps that order on purpose.
//!
//! Block layouts (all multi-byte fields little-endian):
//!
//! | type | elems | bytes | layout |
//! |------|------:|------:|--------|
//! | F32  | 1   | 4   | IEEE binary32 |
//! | F16  | 1   | 2   | IEEE binary16 |
//! | BF16 | 1   | 2   | top half of a binary32 |
//! | Q4_0 | 32  | 18  | f16 d, 16 nibble bytes; x = (q - 8) d |
//! | Q4_1 | 32  | 20  | f16 d, f16 m, 16 nibble bytes; x = q d + m |
//! | Q5_0 | 32  | 22  | f16 d, u32 of fifth bits, 16 nibble bytes; x = (q - 16) d |
//! | Q8_0 | 32  | 34  | f16 d, 32 signed bytes; x = q d |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes |
//! | Q5_K | 256 | 176 | f16 d, f16 dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes |
//! | Q6_K | 256 | 210 | 128 low-nibble bytes, 64 high-pair bytes, 16 signed scales, f16 d |
//!
//! The per-type functions further down spell out where each element's bits
//! live.

use std::fmt;

/// GGUF tensor element types halo supports.
///
/// The names follow ggml's spelling (`Q4_K` and so on) so they can be
/// matched against GGUF files and llama.cpp documentation at a glance.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16: the upper 16 bits of an `f32`.
    BF16,
    /// 32 four-bit values sharing one f16 scale.
    Q4_0,
    /// 32 four-bit values with an f16 scale and an f16 offset.
    Q4_1,
    /// 32 five-bit values sharing one f16 scale.
    Q5_0,
    /// 32 signed bytes sharing one f16 scale.
    Q8_0,
    /// 256 four-bit values in 8 groups with six-bit scales and mins.
    Q4_K,
    /// 256 five-bit values in 8 groups with six-bit scales and mins.
    Q5_K,
    /// 256 six-bit values in 16 groups with signed 8-bit scales.
    Q6_K,
}

impl WeightType {
    /// Every supported type, in ggml id order except BF16 which sits with
    /// the other float types.
    pub const ALL: [WeightType; 10] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q8_0,
        WeightType::Q4_K,
        WeightType::Q5_K,
        WeightType::Q6_K,
    ];

    /// The numeric type id that GGUF files store for this type (ggml's
    /// `ggml_type` enum).
    pub fn ggml_id(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q4_1 => 3,
            WeightType::Q5_0 => 6,
            WeightType::Q8_0 => 8,
            WeightType::Q4_K => 12,
            WeightType::Q5_K => 13,
            WeightType::Q6_K => 14,
            WeightType::BF16 => 30,
        }
    }

    /// The type with this ggml id, or `None` for ids halo does not support.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| ty.ggml_id() == id)
    }

    /// Lower-case short name, as used in file names and logs (`"q4_k"`).
    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::F16 => "f16",
            WeightType::BF16 => "bf16",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4_1 => "q4_1",
            WeightType::Q5_0 => "q5_0",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_K => "q4_k",
            WeightType::Q5_K => "q5_k",
            WeightType::Q6_K => "q6_k",
        }
    }

    /// How many elements one block holds: 1 for the float types, 32 for the
    /// simple quants and 256 for the K-quants.
    pub fn block_elems(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1,
            WeightType::Q4_0 | WeightType::Q4_1 | WeightType::Q5_0 | WeightType::Q8_0 => 32,
            WeightType::Q4_K | WeightType::Q5_K | WeightType::Q6_K => QK_K,
        }
    }

    /// How many bytes one block takes.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
            WeightType::Q5_0 => 22,
            WeightType::Q8_0 => 34,
            WeightType::Q4_K => 144,
            WeightType::Q5_K => 176,
            WeightType::Q6_K => 210,
        }
    }

    /// Bytes needed to store `elems` elements, or `None` when `elems` is not
    /// a whole number of blocks (or the byte count would not fit a `usize`).
    pub fn row_bytes(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// True for the block-quantized types, false for F32, F16 and BF16.
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements in one K-quant super-block.
const QK_K: usize = 256;

/// A buffer did not have the shape a weight type needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The element count is not a whole number of blocks.
    #[error("{elems} elements is not a whole number of {ty} blocks ({} elements each)", .ty.block_elems())]
    NotBlockMultiple {
        /// The weight type.
        ty: WeightType,
        /// The element count asked for.
        elems: usize,
    },
    /// The byte buffer is not exactly the size the element count needs.
    #[error("{ty} data should be {expected} bytes but is {got}")]
    WrongByteLength {
        /// The weight type.
        ty: WeightType,
        /// Bytes the element count needs.
        expected: usize,
        /// Bytes supplied.
        got: usize,
    },
    /// The input vector of a matrix-vector product does not match the
    /// matrix's column count.
    #[error("input vector has {got} elements but the matrix has {expected} columns")]
    VectorLength {
        /// The matrix's column count.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
}

/// Check that `bytes` holds exactly `elems` elements of `ty`.
fn check_len(ty: WeightType, bytes: usize, elems: usize) -> Result<(), QuantError> {
    let expected = ty
        .row_bytes(elems)
        .ok_or(QuantError::NotBlockMultiple { ty, elems })?;
    if bytes != expected {
        return Err(QuantError::WrongByteLength {
            ty,
            expected,
            got: bytes,
        });
    }
    Ok(())
}

/// Dequantize `out.len()` elements from `bytes` (exactly
/// `ty.row_bytes(out.len())` bytes).
///
/// The result matches ggml's reference dequantizer bit for bit.
pub fn dequantize(ty: WeightType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    check_len(ty, bytes.len(), out.len())?;
    let blocks = bytes.chunks_exact(ty.block_bytes());
    let outs = out.chunks_exact_mut(ty.block_elems());
    for (block, dst) in blocks.zip(outs) {
        dequantize_block(ty, block, dst);
    }
    Ok(())
}

/// Dot product of one quantized row with an `f32` vector, computed by
/// dequantizing. The row holds `x.len()` elements. The sum is accumulated in
/// `f64` and rounded to `f32` once at the end, so it is the reference the
/// GPU matrix-vector kernels are measured against.
pub fn dot_row(ty: WeightType, row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check_len(ty, row.len(), x.len())?;
    Ok(dot_checked(ty, row, x) as f32)
}

/// The dot product once the lengths are known to agree.
fn dot_checked(ty: WeightType, row: &[u8], x: &[f32]) -> f64 {
    let mut buf = [0.0f32; QK_K];
    let block = &mut buf[..ty.block_elems()];
    let mut sum = 0.0f64;
    for (bytes, xs) in row
        .chunks_exact(ty.block_bytes())
        .zip(x.chunks_exact(ty.block_elems()))
    {
        dequantize_block(ty, bytes, block);
        for (&w, &v) in block.iter().zip(xs) {
            sum += f64::from(w) * f64::from(v);
        }
    }
    sum
}

/// Reference `y = W·x` for a row-major matrix of `rows` rows, each `cols`
/// elements stored as `ty` (so each row is `ty.row_bytes(cols)` bytes).
pub fn matvec(
    ty: WeightType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
) -> Result<Vec<f32>, QuantError> {
    let row_bytes = ty
        .row_bytes(cols)
        .ok_or(QuantError::NotBlockMultiple { ty, elems: cols })?;
    if x.len() != cols {
        return Err(QuantError::VectorLength {
            expected: cols,
            got: x.len(),
        });
    }
    let expected = row_bytes
        .checked_mul(rows)
        .ok_or(QuantError::WrongByteLength {
            ty,
            expected: usize::MAX,
            got: w.len(),
        })?;
    if w.len() != expected {
        return Err(QuantError::WrongByteLength {
            ty,
            expected,
            got: w.len(),
        });
    }
    if row_bytes == 0 {
        // Zero columns: every output is an empty sum.
        return Ok(vec![0.0; rows]);
    }
    Ok(w.chunks_exact(row_bytes)
        .map(|row| dot_checked(ty, row, x) as f32)
        .collect())
}

/// Decode one block. `block` is exactly `ty.block_bytes()` long and `out`
/// exactly `ty.block_elems()` long.
fn dequantize_block(ty: WeightType, block: &[u8], out: &mut [f32]) {
    match ty {
        WeightType::F32 => out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
        WeightType::F16 => out[0] = f16_to_f32(u16_at(block, 0)),
        WeightType::BF16 => out[0] = bf16_to_f32(u16_at(block, 0)),
        WeightType::Q4_0 => dequant_q4_0(block, out),
        WeightType::Q4_1 => dequant_q4_1(block, out),
        WeightType::Q5_0 => dequant_q5_0(block, out),
        WeightType::Q8_0 => dequant_q8_0(block, out),
        WeightType::Q4_K => dequant_q4_k(block, out),
        WeightType::Q5_K => dequant_q5_k(block, out),
        WeightType::Q6_K => dequant_q6_k(block, out),
    }
}

/// Little-endian `u16` at byte offset `at`.
fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Little-endian f16 at byte offset `at`, widened to `f32`.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16_at(bytes, at))
}

/// Q4_0: 16 bytes of nibbles follow the scale. Byte `j` carries element `j`
/// in its low nibble and element `j + 16` in its high nibble.
fn dequant_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[2..18];
    for (j, &byte) in qs.iter().enumerate() {
        out[j] = (i32::from(byte & 0x0F) - 8) as f32 * d;
        out[j + 16] = (i32::from(byte >> 4) - 8) as f32 * d;
    }
}

/// Q4_1: like Q4_0 but the nibbles are unsigned and an offset `m` is added.
fn dequant_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..20];
    for (j, &byte) in qs.iter().enumerate() {
        out[j] = f32::from(byte & 0x0F) * d + m;
        out[j + 16] = f32::from(byte >> 4) * d + m;
    }
}

/// Q5_0: a 32-bit word after the scale holds each element's fifth bit (bit
/// `i` belongs to element `i`); the low four bits are packed as in Q4_0.
fn dequant_q5_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..22];
    for (j, &byte) in qs.iter().enumerate() {
        let hi_lo = ((qh >> j) & 1) << 4;
        let hi_hi = ((qh >> (j + 16)) & 1) << 4;
        let q_lo = u32::from(byte & 0x0F) | hi_lo;
        let q_hi = u32::from(byte >> 4) | hi_hi;
        out[j] = (q_lo as i32 - 16) as f32 * d;
        out[j + 16] = (q_hi as i32 - 16) as f32 * d;
    }
}

/// Q8_0: 32 signed bytes, one per element, in order.
fn dequant_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (o, &byte) in out.iter_mut().zip(&block[2..34]) {
        *o = f32::from(byte as i8) * d;
    }
}

/// Unpack the 12 scale bytes shared by Q4_K and Q5_K into eight six-bit
/// scales and eight six-bit mins, one pair per 32-element group.
///
/// Groups 0-3 keep their scale in the low six bits of bytes 0-3 and their
/// min in the low six bits of bytes 4-7. Groups 4-7 take their low four bits
/// from bytes 8-11 (scale in the low nibble, min in the high nibble) and
/// their top two bits from the spare top two bits of bytes 0-3 (scale) and
/// 4-7 (min).
fn k_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for i in 0..4 {
        scales[i] = packed[i] & 0x3F;
        mins[i] = packed[i + 4] & 0x3F;
        scales[i + 4] = (packed[i + 8] & 0x0F) | ((packed[i] >> 6) << 4);
        mins[i + 4] = (packed[i + 8] >> 4) | ((packed[i + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// Q4_K: the 128 nibble bytes form four chunks of 32 bytes. Chunk `c` holds
/// group `2c` in its low nibbles and group `2c + 1` in its high nibbles, so
/// element `64c + j` is the low nibble of byte `32c + j` and element
/// `64c + 32 + j` is the high nibble of the same byte.
fn dequant_q4_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let (scales, mins) = k_scales_mins(&block[4..16]);
    let qs = &block[16..144];
    for group in 0..8 {
        let scale = d * f32::from(scales[group]);
        let offset = dmin * f32::from(mins[group]);
        let chunk = &qs[(group / 2) * 32..(group / 2) * 32 + 32];
        let shift = if group % 2 == 0 { 0 } else { 4 };
        for (j, &byte) in chunk.iter().enumerate() {
            let q = (byte >> shift) & 0x0F;
            out[group * 32 + j] = scale * f32::from(q) - offset;
        }
    }
}

/// Q5_K: the low four bits are laid out as in Q4_K. The 32 high-bit bytes
/// give element `32g + j` its fifth bit from bit `g` of byte `j`.
fn dequant_q5_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let (scales, mins) = k_scales_mins(&block[4..16]);
    let qh = &block[16..48];
    let qs = &block[48..176];
    for group in 0..8 {
        let scale = d * f32::from(scales[group]);
        let offset = dmin * f32::from(mins[group]);
        let chunk = &qs[(group / 2) * 32..(group / 2) * 32 + 32];
        let shift = if group % 2 == 0 { 0 } else { 4 };
        for (j, (&byte, &high)) in chunk.iter().zip(qh).enumerate() {
            let q = ((byte >> shift) & 0x0F) | (((high >> group) & 1) << 4);
            out[group * 32 + j] = scale * f32::from(q) - offset;
        }
    }
}

/// Q6_K: the block is two halves of 128 elements. In half `h`, the 64 low
/// bytes `ql[64h..64h + 64]` give element `128h + k` its low four bits from
/// the low nibble of byte `k` and element `128h + 64 + k` from the high
/// nibble; the 32 high bytes `qh[32h..32h + 32]` give element
/// `128h + 32p + j` its top two bits from bits `2p..2p + 2` of byte `j`.
/// Every 16 consecutive elements share one signed 8-bit scale.
fn dequant_q6_k(block: &[u8], out: &mut [f32]) {
    let ql = &block[0..128];
    let qh = &block[128..192];
    let scales = &block[192..208];
    let d = f16_at(block, 208);
    for (e, o) in out.iter_mut().enumerate() {
        let half = e / 128;
        let within = e % 128;
        let low_byte = ql[half * 64 + within % 64];
        let low = if within < 64 {
            low_byte & 0x0F
        } else {
            low_byte >> 4
        };
        let part = within / 32;
        let high = (qh[half * 32 + within % 32] >> (2 * part)) & 0x03;
        let q = i32::from(low | (high << 4)) - 32;
        let scale = d * f32::from(scales[e / 16] as i8);
        *o = scale * q as f32;
    }
}

/// Widen IEEE binary16 bits to `f32`. Exact for every input; NaN payloads
/// are kept.
pub fn f16_to_f32(bits: u16) -> f32 {
    let bits = u32::from(bits);
    let sign = (bits & 0x8000) << 16;
    let exp = (bits >> 10) & 0x1F;
    let man = bits & 0x03FF;
    let out = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: shift the mantissa up until its leading one reaches
            // the implicit-bit position, lowering the exponent each step.
            let mut man = man;
            let mut exp = 127 - 15 + 1;
            while man & 0x0400 == 0 {
                man <<= 1;
                exp -= 1;
            }
            sign | (exp << 23) | ((man & 0x03FF) << 13)
        }
        0x1F => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(out)
}

/// Narrow an `f32` to IEEE binary16 bits, rounding to nearest with ties to
/// even. Values too large for f16 become infinity; NaN stays NaN (quiet).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let exp = (bits >> 23) & 0xFF;
    let man = bits & 0x007F_FFFF;
    if exp == 0xFF {
        let nan = if man != 0 { 0x0200 | (man >> 13) } else { 0 };
        return (sign | 0x7C00 | nan) as u16;
    }
    // The exponent re-biased for f16.
    let e = exp as i32 - 127 + 15;
    if e >= 0x1F {
        return (sign | 0x7C00) as u16;
    }
    if e <= 0 {
        // Subnormal (or zero) in f16. Anything below half the smallest
        // subnormal rounds to zero.
        if e < -10 {
            return sign as u16;
        }
        let full = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let kept = full >> shift;
        let rest = full & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let round_up = rest > half || (rest == half && kept & 1 == 1);
        // A carry out of the mantissa lands in the exponent field, which is
        // exactly the smallest normal f16.
        return (sign | (kept + u32::from(round_up))) as u16;
    }
    let kept = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1FFF;
    let round_up = rest > 0x1000 || (rest == 0x1000 && kept & 1 == 1);
    // A carry may ripple into the exponent, up to infinity, which is the
    // correct rounded result.
    (sign | (kept + u32::from(round_up))) as u16
}

/// Widen bfloat16 bits to `f32` (exact: bfloat16 is the top half of an f32).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// A small deterministic generator (splitmix64), enough for test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    fn next_signed(&mut self) -> f32 {
        (self.next_unit() * 2.0 - 1.0) as f32
    }

    /// Magnitude spread evenly on a log scale over `[1e-3, 1e-1]`, stored as
    /// f16 bits, with a random sign when `signed`.
    fn next_scale(&mut self, signed: bool) -> [u8; 2] {
        let magnitude = 10f64.powf(-3.0 + 2.0 * self.next_unit()) as f32;
        let value = if signed && self.next_u64() & 1 == 1 {
            -magnitude
        } else {
            magnitude
        };
        f32_to_f16(value).to_le_bytes()
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Valid random weights for `elems` elements of `ty`, deterministic in
/// `seed`.
///
/// Float types get values uniform in `[-1, 1)`. Quantized types get
/// uniformly random quant bytes and f16 scales whose magnitudes lie in
/// `[1e-3, 1e-1]`: signed for the single-scale types and Q6_K, positive for
/// the K-quants' `d` and `dmin` (as real files have them). Every result
/// therefore dequantizes to finite values.
///
/// # Panics
///
/// If `elems` is not a whole number of blocks of `ty`.
pub fn random_weights(ty: WeightType, elems: usize, seed: u64) -> Vec<u8> {
    let len = ty.row_bytes(elems).unwrap_or_else(|| {
        panic!("{elems} elements is not a whole number of {ty} blocks");
    });
    let mut rng = SplitMix64(seed);
    let mut bytes = vec![0u8; len];
    for block in bytes.chunks_exact_mut(ty.block_bytes()) {
        match ty {
            WeightType::F32 => block.copy_from_slice(&rng.next_signed().to_le_bytes()),
            WeightType::F16 => {
                block.copy_from_slice(&f32_to_f16(rng.next_signed()).to_le_bytes());
            }
            WeightType::BF16 => {
                // Truncating the f32 keeps the value finite.
                let top = (rng.next_signed().to_bits() >> 16) as u16;
                block.copy_from_slice(&top.to_le_bytes());
            }
            WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => {
                rng.fill(block);
                block[0..2].copy_from_slice(&rng.next_scale(true));
            }
            WeightType::Q4_1 => {
                rng.fill(block);
                block[0..2].copy_from_slice(&rng.next_scale(true));
                block[2..4].copy_from_slice(&rng.next_scale(true));
            }
            WeightType::Q4_K | WeightType::Q5_K => {
                rng.fill(block);
                block[0..2].copy_from_slice(&rng.next_scale(false));
                block[2..4].copy_from_slice(&rng.next_scale(false));
            }
            WeightType::Q6_K => {
                rng.fill(block);
                block[208..210].copy_from_slice(&rng.next_scale(true));
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_sizes() {
        let ids: Vec<u32> = WeightType::ALL.iter().map(|t| t.ggml_id()).collect();
        assert_eq!(ids, [0, 1, 30, 2, 3, 6, 8, 12, 13, 14]);
        let bytes: Vec<usize> = WeightType::ALL.iter().map(|t| t.block_bytes()).collect();
        assert_eq!(bytes, [4, 2, 2, 18, 20, 22, 34, 144, 176, 210]);
        for ty in WeightType::ALL {
            assert_eq!(WeightType::from_ggml_id(ty.ggml_id()), Some(ty));
            assert_eq!(ty.to_string(), ty.name());
            assert_eq!(ty.is_quantized(), ty.block_elems() > 1);
        }
        for unsupported in [4, 5, 7, 9, 10, 11, 15, 16, 29, 31, 1000] {
            assert_eq!(WeightType::from_ggml_id(unsupported), None);
        }
        assert_eq!(WeightType::Q6_K.name(), "q6_k");
        assert!(!WeightType::BF16.is_quantized());
    }

    #[test]
    fn row_bytes_and_errors() {
        assert_eq!(WeightType::F32.row_bytes(3), Some(12));
        assert_eq!(WeightType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(WeightType::Q4_0.row_bytes(48), None);
        assert_eq!(WeightType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(WeightType::Q6_K.row_bytes(128), None);
        assert_eq!(WeightType::Q8_0.row_bytes(0), Some(0));
        assert_eq!(WeightType::F32.row_bytes(usize::MAX), None);

        let mut out = [0.0f32; 48];
        assert_eq!(
            dequantize(WeightType::Q4_0, &[0; 27], &mut out),
            Err(QuantError::NotBlockMultiple {
                ty: WeightType::Q4_0,
                elems: 48
            })
        );
        let mut out = [0.0f32; 32];
        let err = dequantize(WeightType::Q4_0, &[0; 17], &mut out).unwrap_err();
        assert_eq!(
            err,
            QuantError::WrongByteLength {
                ty: WeightType::Q4_0,
                expected: 18,
                got: 17
            }
        );
        assert_eq!(err.to_string(), "q4_0 data should be 18 bytes but is 17");
        assert!(dot_row(WeightType::Q8_0, &[0; 34], &[0.0; 31]).is_err());
        assert_eq!(
            matvec(WeightType::F32, &[0; 24], 2, 3, &[0.0; 2]),
            Err(QuantError::VectorLength {
                expected: 3,
                got: 2
            })
        );
        assert!(matvec(WeightType::F32, &[0; 20], 2, 3, &[0.0; 3]).is_err());
        assert_eq!(
            matvec(WeightType::Q4_0, &[], 3, 0, &[]).unwrap(),
            vec![0.0; 3]
        );
    }

    #[test]
    fn f16_round_trips_every_pattern() {
        for bits in 0..=u16::MAX {
            let wide = f16_to_f32(bits);
            if wide.is_nan() {
                assert!(f16_to_f32(f32_to_f16(wide)).is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(f32_to_f16(wide), bits, "{bits:#06x} -> {wide:e}");
            }
        }
    }

    #[test]
    fn f16_known_values() {
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03FF), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x7C00), f32::INFINITY);
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);

        // Overflow: 65520 is the halfway point to the next (missing) step.
        assert_eq!(f32_to_f16(65519.0), 0x7BFF);
        assert_eq!(f32_to_f16(65520.0), 0x7C00);
        assert_eq!(f32_to_f16(1e10), 0x7C00);
        assert_eq!(f32_to_f16(-1e10), 0xFC00);
        // Ties go to the even neighbour.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        // Just past a tie rounds up.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3C01);
        // Subnormal edge: half the smallest subnormal is a tie to zero, a bit
        // more rounds up to it.
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16(1.5 * 2f32.powi(-25)), 0x0001);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002);
        assert_eq!(f32_to_f16(-2f32.powi(-30)), 0x8000);
        // Largest subnormal rounding up into the smallest normal.
        assert_eq!(f32_to_f16(2f32.powi(-14) - 2f32.powi(-26)), 0x0400);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    }

    #[test]
    fn bf16_is_top_half() {
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
        assert_eq!(bf16_to_f32(0xC0A0), -5.0);
        assert_eq!(bf16_to_f32(0x0001).to_bits(), 0x0001_0000);
    }

    #[test]
    fn random_weights_are_deterministic_and_finite() {
        for ty in WeightType::ALL {
            let elems = 2 * QK_K;
            let a = random_weights(ty, elems, 7);
            assert_eq!(a, random_weights(ty, elems, 7), "{ty}");
            assert_ne!(a, random_weights(ty, elems, 8), "{ty}");
            assert_eq!(Some(a.len()), ty.row_bytes(elems));
            let mut out = vec![0.0f32; elems];
            dequantize(ty, &a, &mut out).unwrap();
            assert!(out.iter().all(|v| v.is_finite()), "{ty}");
            assert!(out.iter().any(|&v| v != 0.0), "{ty}");
        }
    }

    /// Q4_0 with d = 1 and byte j = (15 - j) << 4 | j: element j is j - 8 and
    /// element j + 16 is 7 - j.
    #[test]
    fn q4_0_nibble_order() {
        let mut block = vec![0x00, 0x3C];
        block.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let mut out = [0.0f32; 32];
        dequantize(WeightType::Q4_0, &block, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 - 8.0);
            assert_eq!(out[j + 16], 7.0 - j as f32);
        }
    }

    #[test]
    fn q4_1_and_q8_0_by_hand() {
        // d = 0.5, m = -1, byte j = j | (j << 4).
        let mut block = vec![0x00, 0x38, 0x00, 0xBC];
        block.extend((0..16u8).map(|j| j | (j << 4)));
        let mut out = [0.0f32; 32];
        dequantize(WeightType::Q4_1, &block, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], j as f32 * 0.5 - 1.0);
        }

        // d = 2, q = -16..16.
        let mut block = vec![0x00, 0x40];
        block.extend((-16i8..16).map(|q| q as u8));
        dequantize(WeightType::Q8_0, &block, &mut out).unwrap();
        for (i, &v) in out.iter().enumerate() {
            assert_eq!(v, 2.0 * (i as f32 - 16.0));
        }
    }

    /// Q5_0 with all nibbles zero: only the fifth bits matter, so every
    /// element is either -16 or 0 (times d = 1).
    #[test]
    fn q5_0_fifth_bits() {
        let qh: u32 = 0b1010_0000_0000_0001_1000_0000_0000_0011;
        let mut block = vec![0x00, 0x3C];
        block.extend(qh.to_le_bytes());
        block.extend([0u8; 16]);
        let mut out = [0.0f32; 32];
        dequantize(WeightType::Q5_0, &block, &mut out).unwrap();
        for (i, &v) in out.iter().enumerate() {
            let expected = if (qh >> i) & 1 == 1 { 0.0 } else { -16.0 };
            assert_eq!(v, expected, "element {i}");
        }
    }

    #[test]
    fn k_scale_unpacking() {
        // Scales 1..=8 and mins 60..=53 need the split encoding for groups
        // 4-7 (values above 15 use the borrowed top bits).
        let scales: [u8; 8] = [1, 2, 3, 4, 21, 38, 55, 63];
        let mins: [u8; 8] = [60, 59, 58, 57, 16, 33, 50, 7];
        let mut packed = [0u8; 12];
        for i in 0..4 {
            packed[i] = scales[i] | ((scales[i + 4] >> 4) << 6);
            packed[i + 4] = mins[i] | ((mins[i + 4] >> 4) << 6);
            packed[i + 8] = (scales[i + 4] & 0x0F) | ((mins[i + 4] & 0x0F) << 4);
        }
        assert_eq!(k_scales_mins(&packed), (scales, mins));
    }

    /// Q4_K with d = 1, dmin = 1, group g scaled by g + 1 with min g, and
    /// nibble byte `32c + j` = `(j % 16) | (15 - j % 16) << 4`.
    #[test]
    fn q4_k_by_hand() {
        let mut block = vec![0x00, 0x3C, 0x00, 0x3C];
        let mut packed = [0u8; 12];
        for i in 0..4 {
            packed[i] = i as u8 + 1;
            packed[i + 4] = i as u8;
            packed[i + 8] = (i as u8 + 5) | ((i as u8 + 4) << 4);
        }
        block.extend(packed);
        for _chunk in 0..4 {
            block.extend((0..32u8).map(|j| (j % 16) | ((15 - j % 16) << 4)));
        }
        let mut out = [0.0f32; 256];
        dequantize(WeightType::Q4_K, &block, &mut out).unwrap();
        for g in 0..8 {
            for j in 0..32 {
                let q = if g % 2 == 0 { j % 16 } else { 15 - j % 16 };
                let expected = (g + 1) as f32 * q as f32 - g as f32;
                assert_eq!(out[g * 32 + j], expected, "group {g} element {j}");
            }
        }
    }

    /// Q6_K with d = 1, scales all 1, and one element at a time set to 63.
    #[test]
    fn q6_k_element_positions() {
        for target in [0usize, 5, 31, 32, 63, 64, 100, 127, 128, 170, 200, 255] {
            let mut block = vec![0u8; 210];
            for s in &mut block[192..208] {
                *s = 1;
            }
            block[208..210].copy_from_slice(&[0x00, 0x3C]);
            let half = target / 128;
            let within = target % 128;
            let shift = if within < 64 { 0 } else { 4 };
            block[half * 64 + within % 64] |= 0x0F << shift;
            block[128 + half * 32 + within % 32] |= 0x03 << (2 * (within / 32));
            let mut out = [0.0f32; 256];
            dequantize(WeightType::Q6_K, &block, &mut out).unwrap();
            for (e, &v) in out.iter().enumerate() {
                let expected = if e == target { 31.0 } else { -32.0 };
                assert_eq!(v, expected, "target {target} element {e}");
            }
        }
    }

    #[test]
    fn dot_and_matvec_agree_with_dequantize() {
        for ty in WeightType::ALL {
            let (rows, cols) = (3, 512);
            let w = random_weights(ty, rows * cols, 42);
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let y = matvec(ty, &w, rows, cols, &x).unwrap();
            let row_len = ty.row_bytes(cols).unwrap();
            for (r, &yr) in y.iter().enumerate() {
                let row = &w[r * row_len..(r + 1) * row_len];
                let mut vals = vec![0.0f32; cols];
                dequantize(ty, row, &mut vals).unwrap();
                let plain: f64 = vals
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                assert_eq!(yr, plain as f32, "{ty} row {r}");
                assert_eq!(dot_row(ty, row, &x).unwrap(), yr);
            }
        }
    }
}
