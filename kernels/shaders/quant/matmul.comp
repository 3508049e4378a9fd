#version 460
// Y = X Wᵀ for n input rows (prompt processing): x is n × cols, y is n × rows, both row-major.
//
// Each workgroup computes a TM × TN tile of outputs (TM weight rows by TN input rows,
// specialization constants 2 and 3). It walks the columns BK at a time: the threads dequantize
// the TM × BK slice of W and copy the TN × BK slice of X into shared memory, then each thread
// accumulates a 4 × 4 block of the tile from shared memory. Weight rows are dequantized once
// per tile rather than once per input row, which is what makes this faster than n matvecs.
// The tiles are numbered along one flat index spread over a 2-D grid, so any count fits.
//
// With INDEXED it is the mixture-of-experts form. W holds n_experts stacked matrices and
// workgroup z works for expert z: its TN "input rows" are entries n0.. of that expert's list of
// (token, slot) pairs (counts[z] entries at pairs[z·n..]). Pair q reads input row q (one input
// per pair) or q / k (the token's own input, shared by its k pairs) and writes output row q.
// Each expert's weights are thus dequantized once per tile for all the tokens routed to it.
// Tiles past the end of a list leave at once.
#include "common.glsl"
#include "quant.glsl"

layout(constant_id = 2) const uint TM = 64;
layout(constant_id = 3) const uint TN = 64;
// Columns per step: a multiple of 32 always lies inside one block of every type.
const uint BK = 32u;
const uint STRIDE = BK + 1u; // padding staggers the rows across shared-memory banks
const uint TPM = TM / 4u;    // threads along the weight rows; TN / 4 along the input rows

layout(push_constant) uniform Push {
    uint64_t w;            // row 0 (of expert 0 when INDEXED)
    F32In x;
    F32Buf y;
#ifdef INDEXED
    U32Buf counts;         // list length per expert
    U32Buf pairs;          // n_experts lists of up to n entries each
    uint64_t expert_bytes; // bytes from one expert's matrix to the next
#endif
    uint row_bytes;
    uint rows;             // rows per matrix
    uint cols;
    uint n;                // input rows; INDEXED: tokens, the capacity of each list
    uint tiles_m;          // tiles along the weight rows
#ifdef INDEXED
    uint k;                // pairs per token
    uint x_per_pair;       // 1: x has a row per pair; 0: a row per token
#endif
} p;

shared float ws[TM * STRIDE];
shared float xs[TN * STRIDE];

#ifdef INDEXED
const uint NONE = 0xffffffffu;
// The pair behind each of the tile's TN columns, or NONE past the end of the list.
shared uint tile_pairs[TN];
#endif

void main() {
    uint tile = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint m0 = (tile % p.tiles_m) * TM;
    uint n0 = (tile / p.tiles_m) * TN;
    uint t = gl_LocalInvocationID.x;
#ifdef INDEXED
    uint expert = gl_WorkGroupID.z;
    // Every invocation reads the same count, so the whole workgroup leaves together. A count
    // above the list's capacity, or a pair index past the end, is ignored rather than followed
    // outside x and y.
    uint count = min(p.counts.v[expert], p.n);
    if (n0 >= count) return;
    uint64_t wbase = p.w + uint64_t(expert) * p.expert_bytes;
    uint n_pairs = p.n * p.k;
    for (uint r = t; r < TN; r += gl_WorkGroupSize.x) {
        uint pair = NONE;
        if (n0 + r < count) {
            uint q = p.pairs.v[expert * p.n + n0 + r];
            if (q < n_pairs) pair = q;
        }
        tile_pairs[r] = pair;
    }
    barrier();
#else
    if (n0 >= p.n) return; // the whole workgroup leaves together
    uint64_t wbase = p.w;
#endif
    uint tm = t % TPM;
    uint tn = t / TPM;

    float acc[4][4];
    for (uint i = 0u; i < 4u; i++) {
        for (uint j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }

    for (uint k0 = 0u; k0 < p.cols; k0 += BK) {
        // The weight slice: TM rows of BK / 8 eight-element groups.
        for (uint g = t; g < TM * (BK / 8u); g += gl_WorkGroupSize.x) {
            uint r = g / (BK / 8u);
            uint part = g % (BK / 8u);
            float v[8];
            if (m0 + r < p.rows) {
                dequant8(wbase + uint64_t(m0 + r) * p.row_bytes, k0 + part * 8u, p.cols, v);
            } else {
                for (uint i = 0u; i < 8u; i++) v[i] = 0.0;
            }
            for (uint i = 0u; i < 8u; i++) {
                ws[r * STRIDE + part * 8u + i] = v[i];
            }
        }
        // The input slice, read along rows of X so neighbouring threads load neighbouring floats.
        for (uint idx = t; idx < TN * BK; idx += gl_WorkGroupSize.x) {
            uint r = idx / BK;
            uint c = idx % BK;
#ifdef INDEXED
            uint pair = tile_pairs[r];
            uint xr = p.x_per_pair != 0u ? pair : pair / p.k;
            bool inside = pair != NONE && k0 + c < p.cols;
#else
            uint xr = n0 + r;
            bool inside = xr < p.n && k0 + c < p.cols;
#endif
            xs[r * STRIDE + c] = inside ? p.x.v[xr * p.cols + k0 + c] : 0.0;
        }
        barrier();
        for (uint c = 0u; c < BK; c++) {
            float a[4];
            float b[4];
            for (uint i = 0u; i < 4u; i++) {
                a[i] = ws[(tm + i * TPM) * STRIDE + c];
                b[i] = xs[(tn + i * (TN / 4u)) * STRIDE + c];
            }
            for (uint i = 0u; i < 4u; i++) {
                for (uint j = 0u; j < 4u; j++) {
                    acc[i][j] += a[i] * b[j];
                }
            }
        }
        barrier();
    }

    for (uint j = 0u; j < 4u; j++) {
        uint col = tn + j * (TN / 4u);
#ifdef INDEXED
        uint yr = tile_pairs[col];
        bool keep = yr != NONE;
#else
        uint yr = n0 + col;
        bool keep = yr < p.n;
#endif
        for (uint i = 0u; i < 4u; i++) {
            uint m = m0 + tm + i * TPM;
            if (keep && m < p.rows) {
                p.y.v[yr * p.rows + m] = acc[i][j];
            }
        }
    }
}
