#version 460
// Layer norm, one workgroup per row: y = (x - mean) / sqrt(var + eps) · w + b, with the weight
// and bias (row_len values each, shared by every row) optional. The variance is taken around
// the mean in a second pass, which stays accurate when the mean is large. In place is allowed.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32In w;
    F32In b;
    F32Buf out_;
    uint row_len;
    uint n_rows;
    float eps;
    uint has_weight;
    uint has_bias;
} p;

void main() {
    uint row = nn_group_index();
    if (row >= p.n_rows) return;
    uint base = row * p.row_len;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;
    float n = float(p.row_len);

    float s = 0.0;
    for (uint i = tid; i < p.row_len; i += wg) s += p.x.v[base + i];
    float mean = wg_sum(s) / n;

    float ss = 0.0;
    for (uint i = tid; i < p.row_len; i += wg) {
        float d = p.x.v[base + i] - mean;
        ss += d * d;
    }
    float inv = inversesqrt(wg_sum(ss) / n + p.eps);

    for (uint i = tid; i < p.row_len; i += wg) {
        float y = (p.x.v[base + i] - mean) * inv;
        if (p.has_weight != 0) y *= p.w.v[i];
        if (p.has_bias != 0) y += p.b.v[i];
        p.out_.v[base + i] = y;
    }
}
