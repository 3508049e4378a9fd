#version 460
// Softmax of scale·x over each row, one workgroup per row. Each invocation keeps a running
// maximum and a sum of exponentials relative to it over its share of the row; the workgroup
// then agrees on the row maximum, rescales the partial sums to it and adds them, and a last
// pass writes exp(scale·x - max) / sum. -inf entries (masked out) get probability 0.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32Buf out_;
    uint row_len;
    uint n_rows;
    float scale;
} p;

void main() {
    uint row = nn_group_index();
    if (row >= p.n_rows) return;
    uint base = row * p.row_len;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;

    float m = NN_NEG_INF;
    float s = 0.0;
    for (uint i = tid; i < p.row_len; i += wg) {
        float v = p.x.v[base + i] * p.scale;
        if (v == NN_NEG_INF) continue;
        if (v > m) {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s += exp(v - m);
        }
    }
    float row_max = wg_max(m);
    float mine = m == NN_NEG_INF ? 0.0 : s * exp(m - row_max);
    float inv = 1.0 / wg_sum(mine);

    for (uint i = tid; i < p.row_len; i += wg) {
        float v = p.x.v[base + i] * p.scale;
        p.out_.v[base + i] = v == NN_NEG_INF ? 0.0 : exp(v - row_max) * inv;
    }
}
