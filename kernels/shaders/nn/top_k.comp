#version 460
// The k largest values of each row with their indices, largest first, ties to the lower index;
// one workgroup per row. Selection runs k rounds of a workgroup arg-max, each over the values
// that come after the previous winner in the order (value descending, index ascending), so no
// list of chosen indices is kept. NaN values are never chosen.
//
// mode 0 writes the values themselves; mode 1 writes their softmax probabilities over the whole
// row (the MoE router), mode 2 those probabilities divided by the sum of the k chosen.
#define NN_ARGMAX
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    F32In x;
    U32Buf ids;
    F32Buf vals;
    uint row_len;
    uint n_rows;
    uint k;
    uint mode;
} p;

void main() {
    uint row = nn_group_index();
    if (row >= p.n_rows) return;
    uint base = row * p.row_len;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;

    float row_max = 0.0;
    float inv_sum = 1.0;
    if (p.mode != 0) {
        float m = NN_NEG_INF;
        for (uint i = tid; i < p.row_len; i += wg) m = max(m, p.x.v[base + i]);
        row_max = wg_max(m);
        float s = 0.0;
        for (uint i = tid; i < p.row_len; i += wg) {
            float v = p.x.v[base + i];
            if (v != NN_NEG_INF) s += exp(v - row_max);
        }
        inv_sum = 1.0 / wg_sum(s);
    }

    float prev_v = 0.0;
    uint prev_i = 0;
    float chosen = 0.0;
    for (uint j = 0; j < p.k; j++) {
        float bv = NN_NEG_INF;
        uint bi = 0xffffffffu;
        for (uint i = tid; i < p.row_len; i += wg) {
            float v = p.x.v[base + i];
            bool after = j == 0 || nn_before(prev_v, prev_i, v, i);
            if (after && nn_before(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        wg_argmax(bv, bi);
        prev_v = bv;
        prev_i = bi;
        if (tid == 0) {
            float out_v = bv;
            if (p.mode != 0) out_v = bv == NN_NEG_INF ? 0.0 : exp(bv - row_max) * inv_sum;
            chosen += out_v;
            p.ids.v[row * p.k + j] = bi;
            p.vals.v[row * p.k + j] = out_v;
        }
    }
    if (p.mode == 2 && tid == 0 && chosen > 0.0) {
        float inv = 1.0 / chosen;
        for (uint j = 0; j < p.k; j++) p.vals.v[row * p.k + j] *= inv;
    }
}
