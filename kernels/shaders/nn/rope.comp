#version 460
// Rotary position embedding. x is n_tokens × n_heads × head_dim; the first rotary_dims values of
// each head are rotated in pairs, the rest copied. Pair i (i < rotary_dims / 2) is (2i, 2i + 1)
// in normal mode and (i, i + rotary_dims / 2) in NEOX mode, and turns by
// theta = pos · freq_scale · base^(-2i / rotary_dims) / factor[i], where freq_scale is linear
// position scaling (1 / factor of the context extension) and factor[i] optional per-pair
// frequency divisors (Llama 3.1's rope_freqs; all 1 when there is no buffer).
//
// YaRN (ext_factor 1): pairs below corr_low keep the unscaled angle (extrapolation), pairs above
// corr_high the scaled one (interpolation), with a linear ramp between, and cos and sin are
// multiplied by mscale. With ext_factor 0 the angle is the scaled one and mscale is 1.
//
// One invocation per pair slot of a head; each reads and writes only its own two values, so in
// place is allowed.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    U32In pos;
    F32Buf out_;
    uint64_t factors; // rotary_dims / 2 floats, or 0
    uint total;       // n_tokens · n_heads · slots
    uint slots;       // ceil(head_dim / 2)
    uint n_heads;
    uint head_dim;
    uint rotary_dims;
    float log2_base;
    float freq_scale;
    uint neox;
    float ext_factor;
    float corr_low;
    float corr_high;
    float mscale;
} p;

// theta reduced to about [-pi, pi] before sin and cos: hardware sine units lose accuracy (or
// give up) far from zero, and positions times low frequencies get large. 2·pi is split into a
// high and a low part so that k · 2pi is subtracted almost exactly.
float reduce_angle(float theta) {
    const float inv_two_pi = 0.15915494309189535;
    const float two_pi_hi = 6.28318548202514648;
    const float two_pi_lo = -1.7484555314695172e-7;
    precise float k = round(theta * inv_two_pi);
    precise float r = fma(-k, two_pi_hi, theta);
    r = fma(-k, two_pi_lo, r);
    return r;
}

void main() {
    uint i = flat_index();
    if (i >= p.total) return;
    uint slot = i % p.slots;
    uint row = i / p.slots;
    uint token = row / p.n_heads;
    uint base = row * p.head_dim;
    uint half_rot = p.rotary_dims / 2;

    if (slot < half_rot) {
        uint a = p.neox != 0 ? slot : 2 * slot;
        uint b = p.neox != 0 ? slot + half_rot : 2 * slot + 1;
        float freq = exp2(-float(2 * slot) / float(p.rotary_dims) * p.log2_base);
        if (p.factors != 0ul) {
            freq /= F32In(p.factors).v[slot];
        }
        float pos = float(p.pos.v[token]);
        float theta = pos * freq * p.freq_scale;
        if (p.ext_factor != 0.0) {
            float y = (float(slot) - p.corr_low) / max(0.001, p.corr_high - p.corr_low);
            float ramp = (1.0 - clamp(y, 0.0, 1.0)) * p.ext_factor;
            theta = theta * (1.0 - ramp) + pos * freq * ramp;
        }
        theta = reduce_angle(theta);
        float c = cos(theta) * p.mscale;
        float s = sin(theta) * p.mscale;
        float x0 = p.x.v[base + a];
        float x1 = p.x.v[base + b];
        p.out_.v[base + a] = x0 * c - x1 * s;
        p.out_.v[base + b] = x0 * s + x1 * c;
    } else {
        uint a = 2 * slot;
        p.out_.v[base + a] = p.x.v[base + a];
        if (a + 1 < p.head_dim) p.out_.v[base + a + 1] = p.x.v[base + a + 1];
    }
}
