#version 460
// out[i, :] = row ids[i] of the weight matrix, dequantized to f32 (embedding lookup). One
// workgroup per id; its threads take eight-element groups of the row in turn. An id past the
// last row cannot be read safely: its output row is written as zeros.
#include "common.glsl"
#include "quant.glsl"

layout(push_constant) uniform Push {
    uint64_t w;
    U32Buf ids;
    F32Buf out_;
    uint row_bytes;
    uint rows;
    uint cols;
    uint n_ids;
} p;

void main() {
    uint i = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    if (i >= p.n_ids) return;
    uint id = p.ids.v[i];
    bool valid = id < p.rows;
    uint64_t row = p.w + uint64_t(valid ? id : 0u) * p.row_bytes;
    uint o = i * p.cols;
    for (uint e = gl_LocalInvocationID.x * 8u; e < p.cols; e += gl_WorkGroupSize.x * 8u) {
        float v[8];
        if (valid) {
            dequant8(row, e, p.cols, v);
        } else {
            for (uint k = 0u; k < 8u; k++) v[k] = 0.0;
        }
        for (uint k = 0u; k < 8u && e + k < p.cols; k++) {
            p.out_.v[o + e + k] = v[k];
        }
    }
}
