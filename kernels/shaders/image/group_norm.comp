#version 460
// Group norm over NCHW activations, one workgroup per (image, group): the group's channels are
// contiguous, so it is one run of (channels / groups) · h · w values. y = (x − mean) /
// sqrt(var + eps) · weight[c] + bias[c] (per channel), then SiLU when `silu` is set (resnet
// blocks normalize and activate in one pass). The variance is taken around the mean in a second
// pass. In place is allowed.
#include "common.glsl"
#include "../nn/nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32In w;          // [channels]
    F32In b;          // [channels]
    F32Buf out_;
    uint plane;       // h · w
    uint per_group;   // channels per group
    uint groups;      // groups per image
    uint n_groups;    // images · groups
    float eps;
    uint silu;
} p;

void main() {
    uint g = nn_group_index();
    if (g >= p.n_groups) return;
    uint len = p.plane * p.per_group;
    uint base = g * len;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;

    float s = 0.0;
    for (uint i = tid; i < len; i += wg) s += p.x.v[base + i];
    float mean = wg_sum(s) / float(len);
    float ss = 0.0;
    for (uint i = tid; i < len; i += wg) {
        float d = p.x.v[base + i] - mean;
        ss += d * d;
    }
    float inv = inversesqrt(wg_sum(ss) / float(len) + p.eps);

    uint c0 = (g % p.groups) * p.per_group; // the group's first channel within its image
    for (uint i = tid; i < len; i += wg) {
        uint c = c0 + i / p.plane;
        float y = (p.x.v[base + i] - mean) * inv * p.w.v[c] + p.b.v[c];
        if (p.silu != 0u) y = y / (1.0 + exp(-y));
        p.out_.v[base + i] = y;
    }
}
