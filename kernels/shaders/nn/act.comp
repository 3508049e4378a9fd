#version 460
// Activations, one invocation per element: silu(x) = x / (1 + e^-x) and the tanh form of gelu,
// gelu(x) = x/2 · (1 + tanh(sqrt(2/pi) · (x + 0.044715 x³))). With GATED the result is
// multiplied by `up` (swiglu, geglu).
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32In up;
    F32Buf out_;
    uint n;
} p;

float act(float x) {
#if defined(ACT_SILU)
    return x / (1.0 + exp(-x));
#elif defined(ACT_GELU)
    const float k = 0.7978845608028654; // sqrt(2 / pi)
    return 0.5 * x * (1.0 + nn_tanh(k * (x + 0.044715 * x * x * x)));
#endif
}

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    float y = act(p.x.v[i]);
#ifdef GATED
    y *= p.up.v[i];
#endif
    p.out_.v[i] = y;
}
