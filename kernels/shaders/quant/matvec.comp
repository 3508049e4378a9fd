#version 460
// y = W x for a quantized (or f16/bf16/f32) weight matrix: token generation's matrix-vector
// product. With an id buffer it is the mixture-of-experts form: slot k (workgroup z) multiplies
// expert ids[k]'s matrix by its own input (or the shared one) into its own output rows.
//
// Each workgroup computes ROWS consecutive rows (specialization constant 2). Its threads walk
// the row eight elements at a time, thread t taking the eight-element groups t, t + WG, ...;
// each group of x is loaded once and used for all ROWS rows. Sums are kept in f32, reduced
// within each subgroup with subgroupAdd and then across subgroups through shared memory.
#include "common.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#include "quant.glsl"

layout(constant_id = 2) const uint ROWS = 1;

layout(push_constant) uniform Push {
    uint64_t w;            // row 0 of expert 0
    F32In x;
    F32Buf y;
    uint64_t ids;          // expert id per slot; 0 when not indexed
    uint64_t expert_bytes; // bytes from one expert's matrix to the next
    uint row_bytes;
    uint rows;             // rows per matrix
    uint cols;
    uint x_stride;         // elements between slots' inputs (0: all slots share one input)
    uint n_experts;
} p;

shared float partial[ROWS * gl_WorkGroupSize.x];

void main() {
    uint slot = gl_WorkGroupID.z;
    uint row0 = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * ROWS;
    uint64_t base = p.w;
    // An expert id past the end cannot be read safely: its rows come out as zeros.
    bool valid = true;
    if (p.ids != 0ul) {
        uint expert = U32Buf(p.ids).v[slot];
        valid = expert < p.n_experts;
        base += uint64_t(min(expert, p.n_experts - 1u)) * p.expert_bytes;
    }
    uint xo = slot * p.x_stride;

    float acc[ROWS];
    for (uint r = 0u; r < ROWS; r++) {
        acc[r] = 0.0;
    }
    uint groups = (p.cols + 7u) / 8u;
    if (valid) {
        for (uint gi = gl_LocalInvocationID.x; gi < groups; gi += gl_WorkGroupSize.x) {
            uint e = gi * 8u;
            float xv[8];
            for (uint i = 0u; i < 8u; i++) {
                xv[i] = e + i < p.cols ? p.x.v[xo + e + i] : 0.0;
            }
            for (uint r = 0u; r < ROWS; r++) {
                if (row0 + r < p.rows) {
                    float wv[8];
                    dequant8(base + uint64_t(row0 + r) * p.row_bytes, e, p.cols, wv);
                    float s = 0.0;
                    for (uint i = 0u; i < 8u; i++) {
                        s += wv[i] * xv[i];
                    }
                    acc[r] += s;
                }
            }
        }
    }

    for (uint r = 0u; r < ROWS; r++) {
        float s = subgroupAdd(acc[r]);
        if (subgroupElect()) {
            partial[r * gl_NumSubgroups + gl_SubgroupID] = s;
        }
    }
    barrier();
    uint r = gl_LocalInvocationID.x;
    if (r < ROWS && row0 + r < p.rows) {
        float s = 0.0;
        for (uint i = 0u; i < gl_NumSubgroups; i++) {
            s += partial[r * gl_NumSubgroups + i];
        }
        p.y.v[slot * p.rows + row0 + r] = s;
    }
}
