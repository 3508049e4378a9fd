#version 460
// Adds one value per channel: out[i] = x[i] + b[i / plane] for NCHW activations, where b has
// one value per (image, channel) (the resnet blocks' projected time embedding). In place is
// allowed.
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32In b;
    F32Buf out_;
    uint plane;
    uint n;
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    p.out_.v[i] = p.x.v[i] + p.b.v[i / p.plane];
}
