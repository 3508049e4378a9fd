#version 460
// Adaptive layer norm's modulation and gating (DiT, Flux), over rows of row_len values in
// groups of rows_per_batch rows (one group per image), with one vector per group read at
// a[g · vec_stride + c] (a column range of the block's modulation output):
//   mode 0:  out = x · (1 + a) + b   (a the scale, b the shift)
//   mode 1:  out = x + a · y         (a the gate; y the branch's output)
// In place is allowed (out may be x).
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32In y;
    F32In a;
    F32In b;
    F32Buf out_;
    uint row_len;
    uint rows_per_batch;
    uint vec_stride;
    uint mode;
    uint n;
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    uint c = i % p.row_len;
    uint g = (i / p.row_len) / p.rows_per_batch;
    float a = p.a.v[g * p.vec_stride + c];
    if (p.mode == 0u) {
        p.out_.v[i] = p.x.v[i] * (1.0 + a) + p.b.v[g * p.vec_stride + c];
    } else {
        p.out_.v[i] = p.x.v[i] + a * p.y.v[i];
    }
}
