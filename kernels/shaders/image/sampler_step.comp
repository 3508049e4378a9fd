#version 460
// One diffusion sampler update per latent value, with classifier-free guidance folded in, so
// a denoising step never takes the latents off the device:
//   e    = guided ? u + cfg·(c − u) : eps        (u, c: the unguided and guided predictions)
//   x0   = (x − sigma·e) · inv_alpha             (the predicted clean latents)
//   x'   = cx·x + cx0·x0 + cprev·prev + cnoise·noise
//   prev = x0                                    (when FLAG_WRITE_PREV; read before it when
//                                                  FLAG_READ_PREV)
//   next[k·n + i] = next_scale · x'  for k < copies (the next UNet call's input)
// Buffers whose flag is clear are never touched, so any address may stand in for them.
#include "common.glsl"

const uint FLAG_GUIDED = 1u;
const uint FLAG_READ_PREV = 2u;
const uint FLAG_WRITE_PREV = 4u;
const uint FLAG_NOISE = 8u;

layout(push_constant) uniform Push {
    F32In eps;
    F32Buf x;
    F32Buf prev;
    F32In noise;
    F32Buf next;
    uint n;
    uint flags;
    uint copies;
    float cfg;
    float sigma;
    float inv_alpha;
    float cx;
    float cx0;
    float cprev;
    float cnoise;
    float next_scale;
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
    float e;
    if ((p.flags & FLAG_GUIDED) != 0u) {
        float u = p.eps.v[i];
        float c = p.eps.v[p.n + i];
        e = u + p.cfg * (c - u);
    } else {
        e = p.eps.v[i];
    }
    float x = p.x.v[i];
    float x0 = (x - p.sigma * e) * p.inv_alpha;
    float y = p.cx * x + p.cx0 * x0;
    if ((p.flags & FLAG_READ_PREV) != 0u) y += p.cprev * p.prev.v[i];
    if ((p.flags & FLAG_NOISE) != 0u) y += p.cnoise * p.noise.v[i];
    if ((p.flags & FLAG_WRITE_PREV) != 0u) p.prev.v[i] = x0;
    p.x.v[i] = y;
    float s = p.next_scale * y;
    for (uint k = 0u; k < p.copies; k++) p.next.v[k * p.n + i] = s;
}
