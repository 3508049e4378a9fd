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

// One value's contributions and its output, 0 / nothing past the group's end.
float centred_sq(uint base, uint len, uint j, float mean) {
    float d = j < len ? p.x.v[base + j] - mean : 0.0;
    return d * d;
}

void normalize_at(uint base, uint len, uint j, float mean, float inv, uint c0) {
    if (j >= len) return;
    uint c = c0 + j / p.plane;
    float y = (p.x.v[base + j] - mean) * inv * p.w.v[c] + p.b.v[c];
    if (p.silu != 0u) y = y / (1.0 + exp(-y));
    p.out_.v[base + j] = y;
}

void main() {
    uint g = nn_group_index();
    if (g >= p.n_groups) return;
    uint len = p.plane * p.per_group;
    uint base = g * len;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;

    // Each loop takes four values per iteration, written out rather than looped: llvmpipe
    // caps the loop iterations of an invocation (see Limits::max_loop_iterations), and a
    // group at 1024² holds millions of values.
    uint step = 4u * wg;
    float s = 0.0;
    for (uint i = tid; i < len; i += step) {
        s += p.x.v[base + i];
        if (i + wg < len) s += p.x.v[base + i + wg];
        if (i + 2u * wg < len) s += p.x.v[base + i + 2u * wg];
        if (i + 3u * wg < len) s += p.x.v[base + i + 3u * wg];
    }
    float mean = wg_sum(s) / float(len);
    float ss = 0.0;
    for (uint i = tid; i < len; i += step) {
        ss += centred_sq(base, len, i, mean) + centred_sq(base, len, i + wg, mean)
            + centred_sq(base, len, i + 2u * wg, mean) + centred_sq(base, len, i + 3u * wg, mean);
    }
    float inv = inversesqrt(wg_sum(ss) / float(len) + p.eps);

    uint c0 = (g % p.groups) * p.per_group; // the group's first channel within its image
    for (uint i = tid; i < len; i += step) {
        normalize_at(base, len, i, mean, inv, c0);
        normalize_at(base, len, i + wg, mean, inv, c0);
        normalize_at(base, len, i + 2u * wg, mean, inv, c0);
        normalize_at(base, len, i + 3u * wg, mean, inv, c0);
    }
}
