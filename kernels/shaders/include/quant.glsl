// Weight dequantization shared by the quantized matvec, matmul and get_rows kernels.
//
// Exactly one WTYPE_* define picks the weight type. Every type provides
//
//     void dequant8(uint64_t row, uint e, uint n, out float v[8])
//
// which writes elements e .. e+7 of the row that starts at byte address `row` into v. `e` is a
// multiple of 8 and `n` is the row's element count. The quantized types only see rows whose
// length is a whole number of blocks (a multiple of 32), so all eight elements exist; the float
// types may be asked past the end of the row and return 0 there, without reading it.
//
// Blocks are read with 16-bit loads: every block size is even and every field of interest starts
// at an even byte offset, but blocks such as Q4_0's 18 bytes are only 2-byte aligned, so wider
// loads would be misaligned. Scales stored as f16 are widened with unpackHalf2x16.
//
// The arithmetic follows the CPU reference (src/quant.rs) operation by operation, and `precise`
// stops the compiler from fusing a multiply and an add into one rounding, so a dequantized value
// equals the reference bit for bit.
#extension GL_EXT_shader_16bit_storage : require

layout(buffer_reference, std430, buffer_reference_align = 2) readonly buffer W16 { uint16_t v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) readonly buffer W32 { float v[]; };

// Byte `k` (any offset) of the block that starts at halfword `hb`.
uint q_byte(W16 w, uint hb, uint k) {
    return (uint(w.v[hb + (k >> 1)]) >> ((k & 1u) * 8u)) & 0xFFu;
}

// Eight bytes starting at the even byte offset `k`, packed little-endian into two words.
uvec2 q_bytes8(W16 w, uint hb, uint k) {
    uint h = hb + (k >> 1);
    return uvec2(uint(w.v[h]) | (uint(w.v[h + 1u]) << 16),
                 uint(w.v[h + 2u]) | (uint(w.v[h + 3u]) << 16));
}

// Byte i (0..7) of an eight-byte group.
uint q_pick(uvec2 b, uint i) {
    return ((i < 4u ? b.x : b.y) >> ((i & 3u) * 8u)) & 0xFFu;
}

float q_half(W16 w, uint h) {
    return unpackHalf2x16(uint(w.v[h])).x;
}

#if defined(WTYPE_F32)
const uint QK = 1u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W32 w = W32(row);
    for (uint i = 0u; i < 8u; i++) {
        v[i] = e + i < n ? w.v[e + i] : 0.0;
    }
}

#elif defined(WTYPE_F16) || defined(WTYPE_BF16)
const uint QK = 1u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    for (uint i = 0u; i < 8u; i++) {
        uint h = e + i < n ? uint(w.v[e + i]) : 0u;
#if defined(WTYPE_F16)
        v[i] = unpackHalf2x16(h).x;
#else
        // bfloat16 is the top half of an f32.
        v[i] = uintBitsToFloat(h << 16);
#endif
    }
}

#elif defined(WTYPE_Q4_0)
// f16 d, then 16 bytes: byte j holds element j (low nibble) and j + 16 (high nibble).
const uint QK = 32u;
const uint BLOCK_HALFS = 9u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    uint hb = (e / QK) * BLOCK_HALFS;
    uint j = e % QK;
    float d = q_half(w, hb);
    uvec2 b = q_bytes8(w, hb, 2u + (j & 15u));
    uint shift = j >= 16u ? 4u : 0u;
    for (uint i = 0u; i < 8u; i++) {
        int q = int((q_pick(b, i) >> shift) & 0xFu) - 8;
        v[i] = float(q) * d;
    }
}

#elif defined(WTYPE_Q4_1)
// f16 d, f16 m, then nibbles as in Q4_0; x = q d + m.
const uint QK = 32u;
const uint BLOCK_HALFS = 10u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    uint hb = (e / QK) * BLOCK_HALFS;
    uint j = e % QK;
    float d = q_half(w, hb);
    float m = q_half(w, hb + 1u);
    uvec2 b = q_bytes8(w, hb, 4u + (j & 15u));
    uint shift = j >= 16u ? 4u : 0u;
    for (uint i = 0u; i < 8u; i++) {
        float q = float((q_pick(b, i) >> shift) & 0xFu);
        precise float x = q * d + m;
        v[i] = x;
    }
}

#elif defined(WTYPE_Q5_0)
// f16 d, a 32-bit word whose bit i is element i's fifth bit, then nibbles as in Q4_0.
const uint QK = 32u;
const uint BLOCK_HALFS = 11u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    uint hb = (e / QK) * BLOCK_HALFS;
    uint j = e % QK;
    float d = q_half(w, hb);
    uint qh = uint(w.v[hb + 1u]) | (uint(w.v[hb + 2u]) << 16);
    uvec2 b = q_bytes8(w, hb, 6u + (j & 15u));
    uint shift = j >= 16u ? 4u : 0u;
    for (uint i = 0u; i < 8u; i++) {
        uint q = ((q_pick(b, i) >> shift) & 0xFu) | (((qh >> (j + i)) & 1u) << 4);
        v[i] = float(int(q) - 16) * d;
    }
}

#elif defined(WTYPE_Q8_0)
// f16 d, then 32 signed bytes in order.
const uint QK = 32u;
const uint BLOCK_HALFS = 17u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    uint hb = (e / QK) * BLOCK_HALFS;
    uint j = e % QK;
    float d = q_half(w, hb);
    uvec2 b = q_bytes8(w, hb, 2u + j);
    for (uint i = 0u; i < 8u; i++) {
        int q = bitfieldExtract(int(i < 4u ? b.x : b.y), int((i & 3u) * 8u), 8);
        v[i] = float(q) * d;
    }
}

#elif defined(WTYPE_Q4_K) || defined(WTYPE_Q5_K)
// f16 d, f16 dmin, 12 bytes of six-bit scales and mins (bytes 4..15), [Q5_K: 32 bytes of fifth
// bits], then 128 nibble bytes in four 32-byte chunks: chunk c holds group 2c in its low nibbles
// and group 2c + 1 in its high nibbles. Each 32-element group g has x = (d sc_g) q - (dmin m_g).
const uint QK = 256u;
#if defined(WTYPE_Q4_K)
const uint BLOCK_HALFS = 72u;
const uint QS = 16u;
#else
const uint BLOCK_HALFS = 88u;
const uint QH = 16u;
const uint QS = 48u;
#endif
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    uint hb = (e / QK) * BLOCK_HALFS;
    uint j = e % QK;
    uint g = j / 32u;
    uint within = j % 32u;
    float d = q_half(w, hb);
    float dmin = q_half(w, hb + 1u);
    // Groups 0-3: low six bits of bytes 4+g (scale) and 8+g (min). Groups 4-7: low/high nibble
    // of byte 12+(g-4), topped with the spare two bits of bytes 4+(g-4) and 8+(g-4).
    uint sc, m;
    if (g < 4u) {
        sc = q_byte(w, hb, 4u + g) & 63u;
        m = q_byte(w, hb, 8u + g) & 63u;
    } else {
        uint lo = q_byte(w, hb, 12u + g - 4u);
        sc = (lo & 0xFu) | ((q_byte(w, hb, g) >> 6) << 4);
        m = (lo >> 4) | ((q_byte(w, hb, 4u + g) >> 6) << 4);
    }
    float scale = d * float(sc);
    float offset = dmin * float(m);
    uvec2 b = q_bytes8(w, hb, QS + (g / 2u) * 32u + within);
    uint shift = (g & 1u) * 4u;
#if defined(WTYPE_Q5_K)
    uvec2 h = q_bytes8(w, hb, QH + within);
#endif
    for (uint i = 0u; i < 8u; i++) {
        uint q = (q_pick(b, i) >> shift) & 0xFu;
#if defined(WTYPE_Q5_K)
        q |= ((q_pick(h, i) >> g) & 1u) << 4;
#endif
        precise float x = scale * float(q) - offset;
        v[i] = x;
    }
}

#elif defined(WTYPE_Q6_K)
// 128 low-nibble bytes, 64 high-pair bytes, 16 signed scales, f16 d. In half h (128 elements),
// element 128h + k takes its low bits from byte 64h + k % 64 (low nibble for k < 64, high
// otherwise) and its top two bits from bits 2(k / 32) of byte 128 + 32h + k % 32. Every 16
// elements share one scale.
const uint QK = 256u;
const uint BLOCK_HALFS = 105u;
void dequant8(uint64_t row, uint e, uint n, out float v[8]) {
    W16 w = W16(row);
    uint hb = (e / QK) * BLOCK_HALFS;
    uint j = e % QK;
    uint half_ = j / 128u;
    uint k = j % 128u;
    float d = q_half(w, hb + 104u);
    int sc = bitfieldExtract(int(q_byte(w, hb, 192u + j / 16u)), 0, 8);
    float scale = d * float(sc);
    uvec2 lo = q_bytes8(w, hb, 64u * half_ + k % 64u);
    uvec2 hi = q_bytes8(w, hb, 128u + 32u * half_ + k % 32u);
    uint lshift = k < 64u ? 0u : 4u;
    uint hshift = 2u * (k / 32u);
    for (uint i = 0u; i < 8u; i++) {
        uint q = ((q_pick(lo, i) >> lshift) & 0xFu) | (((q_pick(hi, i) >> hshift) & 3u) << 4);
        v[i] = scale * float(int(q) - 32);
    }
}

#else
#error "define one WTYPE_*"
#endif
