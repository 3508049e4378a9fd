#version 460
// Writes new K or V rows into a KV cache. src is n_tokens × n_kv_heads × head_dim (f32); the
// cache is n_kv_heads × capacity × head_dim and token t goes to position first_pos + t. With
// STORE_F16 the cache holds f16 values, written two at a time (head_dim is even), one
// invocation per pair; otherwise one invocation per value.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In src;
    uint64_t dst;
    uint n;           // values (f32) or pairs (f16) to write
    uint n_kv_heads;
    uint head_dim;
    uint capacity;
    uint first_pos;
} p;

void main() {
    uint i = flat_index();
    if (i >= p.n) return;
#ifdef STORE_F16
    uint e = 2 * i;
#else
    uint e = i;
#endif
    uint per_token = p.n_kv_heads * p.head_dim;
    uint token = e / per_token;
    uint rem = e % per_token;
    uint head = rem / p.head_dim;
    uint d = rem % p.head_dim;
    uint at = (head * p.capacity + p.first_pos + token) * p.head_dim + d;
#ifdef STORE_F16
    U32Buf(p.dst).v[at / 2] = packHalf2x16(vec2(p.src.v[e], p.src.v[e + 1]));
#else
    F32Buf(p.dst).v[at] = p.src.v[e];
#endif
}
