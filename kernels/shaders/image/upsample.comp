#version 460
// Nearest-neighbour ×2 upsampling of NCHW activations: out[nc, y, x] = in[nc, y / 2, x / 2].
// One invocation per output value.
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32Buf out_;
    uint h;           // input height
    uint w;           // input width
    uint planes;      // images · channels
} p;

void main() {
    uint i = flat_index();
    uint ow = p.w * 2u;
    uint per_plane = p.h * 2u * ow;
    if (i >= p.planes * per_plane) return;
    uint plane = i / per_plane;
    uint r = i % per_plane;
    uint y = (r / ow) / 2u;
    uint x = (r % ow) / 2u;
    p.out_.v[i] = p.x.v[(plane * p.h + y) * p.w + x];
}
