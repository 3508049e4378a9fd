#version 460
// Copies `width` columns of each of `rows` rows between strided layouts:
// out[r · out_stride + c] = x[r · x_stride + c] (the views start at the first column), as a
// column concatenation needs (Flux's single blocks join attention and MLP outputs).
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32Buf out_;
    uint width;
    uint x_stride;
    uint out_stride;
    uint n;           // rows · width
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    uint r = i / p.width;
    uint c = i % p.width;
    p.out_.v[r * p.out_stride + c] = p.x.v[r * p.x_stride + c];
}
