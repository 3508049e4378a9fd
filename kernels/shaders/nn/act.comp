#version 460
// Activations, one invocation per element: silu(x) = x / (1 + e^-x); the tanh form of gelu,
// x/2 · (1 + tanh(sqrt(2/pi) · (x + 0.044715 x³))); the exact gelu, x/2 · (1 + erf(x / sqrt 2)),
// with erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); CLIP's quick gelu,
// x / (1 + e^(-1.702 x)). With GATED the result is multiplied by `up` (swiglu, geglu).
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
#elif defined(ACT_GELU_ERF)
    float z = abs(x) * 0.7071067811865476;
    float t = 1.0 / (1.0 + 0.3275911 * z);
    float poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
               + t * (-1.453152027 + t * 1.061405429))));
    float erf_abs = 1.0 - poly * exp(-z * z);
    return 0.5 * x * (1.0 + (x < 0.0 ? -erf_abs : erf_abs));
#elif defined(ACT_QUICK_GELU)
    return x / (1.0 + exp(-1.702 * x));
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
