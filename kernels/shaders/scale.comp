#version 460
// out[i] = a[i] * s for i < n.
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In a;
    F32Buf out_;
    uint n;
    float s;
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    p.out_.v[i] = p.a.v[i] * p.s;
}
