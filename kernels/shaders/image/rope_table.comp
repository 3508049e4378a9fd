#version 460
// Rotary position embedding from a table, in place, for position ids of any number of axes
// (Flux's three: frame, row, column): the host works out each token's angles, the kernel turns
// each adjacent pair of a head's values by them:
//   x[2j] ← x[2j]·cos − x[2j+1]·sin,  x[2j+1] ← x[2j+1]·cos + x[2j]·sin
// with (cos, sin) = table[token][j]. Token t's row starts row_stride floats after token t − 1's;
// head h is the head_dim values from h · head_dim. One invocation per pair.
#include "common.glsl"

layout(push_constant) uniform Push {
    F32Buf x;
    F32In table;      // [tokens][head_dim / 2][cos, sin]
    uint heads;
    uint half_dim;    // head_dim / 2
    uint row_stride;
    uint n;           // tokens · heads · half_dim
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    uint per_token = p.heads * p.half_dim;
    uint t = i / per_token;
    uint h = (i % per_token) / p.half_dim;
    uint j = i % p.half_dim;
    uint at = t * p.row_stride + h * 2u * p.half_dim + 2u * j;
    uint tab = 2u * (t * p.half_dim + j);
    float c = p.table.v[tab];
    float s = p.table.v[tab + 1u];
    float a = p.x.v[at];
    float b = p.x.v[at + 1u];
    p.x.v[at] = a * c - b * s;
    p.x.v[at + 1u] = b * c + a * s;
}
