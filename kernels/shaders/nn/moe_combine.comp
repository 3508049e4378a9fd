#version 460
// Weighted sum of the chosen experts' outputs, one invocation per output element:
// out[j] = sum over k of w[k] · rows[k·n + j]. The k weights are read from a buffer (the router
// writes them on the device), so nothing goes back to the host between the router and here.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In rows;
    F32In w;
    F32Buf out_;
    uint n;
    uint k;
} p;

void main() {
    uint j = flat_index();
    if (j >= p.n) return;
    float acc = 0.0;
    for (uint s = 0; s < p.k; s++) {
        acc += p.w.v[s] * p.rows.v[s * p.n + j];
    }
    p.out_.v[j] = acc;
}
