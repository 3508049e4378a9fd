#version 460
// Weighted sum of the chosen experts' outputs for a batch of tokens, one invocation per output
// element: out[t·n + j] = sum over s < k of w[t·k + s] · rows[(t·k + s)·n + j]. The rows are
// pair-major (pair p = t·k + s), as the indexed matmul writes them. The weights are read from a
// buffer (the router writes them on the device), so nothing goes back to the host between the
// router and here.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In rows;
    F32In w;
    F32Buf out_;
    uint n;
    uint k;
    uint total; // n_tokens · n
} p;

void main() {
    uint i = flat_index();
    if (i >= p.total) return;
    uint t = i / p.n;
    uint j = i - t * p.n;
    uint pair = t * p.k;
    float acc = 0.0;
    for (uint s = 0; s < p.k; s++) {
        acc += p.w.v[pair + s] * p.rows.v[(pair + s) * p.n + j];
    }
    p.out_.v[i] = acc;
}
