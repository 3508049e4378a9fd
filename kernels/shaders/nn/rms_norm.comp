#version 460
// RMS norm, one workgroup per row: y = x / sqrt(mean(x²) + eps) · (w + weight_offset), where the
// weight (row_len values, shared by every row) is optional. In place is allowed.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32In w;
    F32Buf out_;
    uint row_len;
    uint n_rows;
    float eps;
    float weight_offset;
    uint has_weight;
} p;

void main() {
    uint row = nn_group_index();
    if (row >= p.n_rows) return;
    uint base = row * p.row_len;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;

    float ss = 0.0;
    for (uint i = tid; i < p.row_len; i += wg) {
        float v = p.x.v[base + i];
        ss += v * v;
    }
    ss = wg_sum(ss);
    float inv = inversesqrt(ss / float(p.row_len) + p.eps);

    for (uint i = tid; i < p.row_len; i += wg) {
        float y = p.x.v[base + i] * inv;
        if (p.has_weight != 0) y *= p.w.v[i] + p.weight_offset;
        p.out_.v[base + i] = y;
    }
}
