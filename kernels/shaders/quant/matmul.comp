#version 460
// Y = X Wᵀ for n input rows (prompt processing): x is n × cols, y is n × rows, both row-major.
//
// Each workgroup computes a TM × TN tile of outputs (TM weight rows by TN input rows,
// specialization constants 2 and 3). It walks the columns BK at a time: the threads dequantize
// the TM × BK slice of W and copy the TN × BK slice of X into shared memory, then each thread
// accumulates a 4 × 4 block of the tile from shared memory. Weight rows are dequantized once
// per tile rather than once per input row, which is what makes this faster than n matvecs.
// The tiles are numbered along one flat index spread over a 2-D grid, so any count fits.
#include "common.glsl"
#include "quant.glsl"

layout(constant_id = 2) const uint TM = 64;
layout(constant_id = 3) const uint TN = 64;
// Columns per step: a multiple of 32 always lies inside one block of every type.
const uint BK = 32u;
const uint STRIDE = BK + 1u; // padding staggers the rows across shared-memory banks
const uint TPM = TM / 4u;    // threads along the weight rows; TN / 4 along the input rows

layout(push_constant) uniform Push {
    uint64_t w;
    F32In x;
    F32Buf y;
    uint row_bytes;
    uint rows;
    uint cols;
    uint n;
    uint tiles_m; // tiles along the weight rows
} p;

shared float ws[TM * STRIDE];
shared float xs[TN * STRIDE];

void main() {
    uint tile = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint m0 = (tile % p.tiles_m) * TM;
    uint n0 = (tile / p.tiles_m) * TN;
    if (n0 >= p.n) return; // the whole workgroup leaves together
    uint t = gl_LocalInvocationID.x;
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
                dequant8(p.w + uint64_t(m0 + r) * p.row_bytes, k0 + part * 8u, p.cols, v);
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
            bool inside = n0 + r < p.n && k0 + c < p.cols;
            xs[r * STRIDE + c] = inside ? p.x.v[(n0 + r) * p.cols + k0 + c] : 0.0;
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

    for (uint i = 0u; i < 4u; i++) {
        uint m = m0 + tm + i * TPM;
        for (uint j = 0u; j < 4u; j++) {
            uint nn = n0 + tn + j * (TN / 4u);
            if (m < p.rows && nn < p.n) {
                p.y.v[nn * p.rows + m] = acc[i][j];
            }
        }
    }
}
