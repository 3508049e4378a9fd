#version 460
// Nearest-neighbour upsampling of NCHW planes of h × w to oh × ow: out[y, x] = in[y·h / oh,
// x·w / ow] (integer division: PyTorch's "nearest" for these sizes, ×2 included). One
// invocation per output value.
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32Buf out_;
    uint h;
    uint w;
    uint oh;
    uint ow;
    uint planes;
} p;

void main() {
    uint i = flat_index();
    uint per_plane = p.oh * p.ow;
    if (i >= p.planes * per_plane) return;
    uint plane = i / per_plane;
    uint r = i % per_plane;
    uint y = (r / p.ow) * p.h / p.oh;
    uint x = (r % p.ow) * p.w / p.ow;
    p.out_.v[i] = p.x.v[(plane * p.h + y) * p.w + x];
}
