#version 460
// out[i] = a[i] OP b[i % b_len] for i < n: elementwise add or multiply, with `b` broadcast
// when it is shorter (a row of weights applied to every row of `a`).
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In a;
    F32In b;
    F32Buf out_;
    uint n;
    uint b_len;
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    float x = p.a.v[i];
    float y = p.b.v[i % p.b_len];
#if defined(OP_ADD)
    p.out_.v[i] = x + y;
#elif defined(OP_MUL)
    p.out_.v[i] = x * y;
#endif
}
