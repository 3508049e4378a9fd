#version 460
// Multi-head attention over whole sequences, flash style, for image models and text encoders:
// self-attention over thousands of pixels, cross-attention to a text context, (with `causal`)
// CLIP's causal text self-attention, and (with `bias`, added to the scaled scores) T5's
// relative position bias. No score matrix is stored beyond one tile: the
// softmax is taken online, with a running maximum and sum per query row and the output rescaled
// whenever the maximum grows.
//
// Layouts: every token is a row; head h's HEAD_DIM values start at column h · HEAD_DIM of the
// row. q rows are q_stride floats apart, k and v rows kv_stride apart, out rows o_stride apart,
// so q, k and v may be column ranges of one fused projection. Batch b's rows follow batch b − 1's
// (n_q rows of q, n_kv rows of k and v). Workgroup z works on (batch, head) z and ROWS query rows;
// each tile loads TILE keys and values into shared memory, computes ROWS × TILE scores (one
// invocation per score), updates the row statistics, and accumulates the output, of which each
// invocation keeps up to MAX_OUT (row, dim) elements.
//
// Passes: one dispatch covers the keys pass_begin..pass_end. The host splits the keys into
// several passes only where the driver caps the loop iterations of one invocation (llvmpipe,
// see Limits::max_loop_iterations); elsewhere one pass covers them all. A pass that is not the
// first resumes from the running state the previous one left: per (batch, head, row) the maximum
// and the sum in `state` (two floats), and the output still unnormalized in `out`. Only the
// last pass divides by the sum.
#include "common.glsl"
#include "../nn/nn.glsl"

layout(constant_id = 2) const uint HEAD_DIM = 64;
layout(constant_id = 3) const uint ROWS = 8;
layout(constant_id = 4) const uint TILE = 16;
const uint K_STRIDE = HEAD_DIM + 1;
#define MAX_OUT 16
#define MASKED -1.0e30

layout(push_constant) uniform Push {
    F32In q;
    F32In k;
    F32In v;
    F32Buf out_;
    F32Buf state;     // [batch · heads · n_q][max, sum] between passes
    F32In bias;       // [heads][n_q][n_kv] added to every batch's scores (T5), if has_bias
    uint n_heads;
    uint n_q;
    uint n_kv;
    uint q_stride;
    uint kv_stride;
    uint o_stride;
    float scale;
    uint causal;
    uint n_blocks;    // workgroups along the query rows of one (batch, head)
    uint pass_begin;  // the keys this dispatch covers
    uint pass_end;
    uint has_bias;
} p;

shared float q_sh[ROWS * HEAD_DIM];
shared float k_sh[TILE * K_STRIDE];
shared float v_sh[TILE * HEAD_DIM];
shared float s_sh[ROWS * TILE];
shared float m_sh[ROWS];
shared float l_sh[ROWS];
shared float alpha_sh[ROWS];

void main() {
    uint blk = nn_group_index();
    if (blk >= p.n_blocks) return;
    uint bh = gl_WorkGroupID.z;
    uint b = bh / p.n_heads;
    uint h = bh % p.n_heads;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;
    uint row0 = blk * ROWS;
    uint rows_here = min(ROWS, p.n_q - row0);
    uint q_base = (b * p.n_q) * p.q_stride + h * HEAD_DIM;
    uint kv_base = (b * p.n_kv) * p.kv_stride + h * HEAD_DIM;

    // The scale is folded into q.
    for (uint e = tid; e < ROWS * HEAD_DIM; e += wg) {
        uint r = e / HEAD_DIM;
        uint d = e % HEAD_DIM;
        q_sh[e] = r < rows_here ? p.q.v[q_base + (row0 + r) * p.q_stride + d] * p.scale : 0.0;
    }
    // The keys this workgroup's rows see, and the part of them this pass covers. The
    // conditions are uniform over the workgroup, so returning before a barrier is safe.
    uint key_end = p.causal != 0u ? min(p.n_kv, row0 + rows_here) : p.n_kv;
    uint begin = p.pass_begin;
    uint end = min(key_end, p.pass_end);
    if (begin >= end) return;
    bool resumed = begin > 0u;
    bool finishes = key_end <= p.pass_end;

    uint o_base = (b * p.n_q) * p.o_stride + h * HEAD_DIM;
    uint state_base = bh * p.n_q + row0;
    if (tid < ROWS) {
        float m = MASKED;
        float l = 0.0;
        if (resumed && tid < rows_here) {
            m = p.state.v[2u * (state_base + tid)];
            l = p.state.v[2u * (state_base + tid) + 1u];
        }
        m_sh[tid] = m;
        l_sh[tid] = l;
    }
    float acc[MAX_OUT];
    for (uint i = 0; i < MAX_OUT; i++) {
        uint e = tid + i * wg;
        uint r = e / HEAD_DIM;
        float a = 0.0;
        if (resumed && e < ROWS * HEAD_DIM && r < rows_here) {
            a = p.out_.v[o_base + (row0 + r) * p.o_stride + e % HEAD_DIM];
        }
        acc[i] = a;
    }
    barrier();

    for (uint k0 = begin; k0 < end; k0 += TILE) {
        uint n_keys = min(TILE, end - k0);
        for (uint e = tid; e < TILE * HEAD_DIM; e += wg) {
            uint t = e / HEAD_DIM;
            uint d = e % HEAD_DIM;
            float kv = 0.0;
            float vv = 0.0;
            if (t < n_keys) {
                uint idx = kv_base + (k0 + t) * p.kv_stride + d;
                kv = p.k.v[idx];
                vv = p.v.v[idx];
            }
            k_sh[t * K_STRIDE + d] = kv;
            v_sh[e] = vv;
        }
        barrier();

        for (uint e0 = 0; e0 < ROWS * TILE; e0 += wg) {
            uint e = e0 + tid;
            uint r = e / TILE;
            uint t = e % TILE;
            float s = MASKED;
            if (e < ROWS * TILE && r < rows_here && t < n_keys
                && (p.causal == 0u || k0 + t <= row0 + r)) {
                float dot = 0.0;
                uint d = 0;
                for (; d + 4 <= HEAD_DIM; d += 4) {
                    uint qi = r * HEAD_DIM + d;
                    uint ki = t * K_STRIDE + d;
                    dot += q_sh[qi] * k_sh[ki] + q_sh[qi + 1] * k_sh[ki + 1]
                        + q_sh[qi + 2] * k_sh[ki + 2] + q_sh[qi + 3] * k_sh[ki + 3];
                }
                for (; d < HEAD_DIM; d++) dot += q_sh[r * HEAD_DIM + d] * k_sh[t * K_STRIDE + d];
                if (p.has_bias != 0u) dot += p.bias.v[(h * p.n_q + row0 + r) * p.n_kv + k0 + t];
                s = dot;
            }
            if (e < ROWS * TILE) s_sh[e] = s;
        }
        barrier();

        if (tid < ROWS) {
            float old_max = m_sh[tid];
            float new_max = old_max;
            for (uint t = 0; t < TILE; t++) new_max = max(new_max, s_sh[tid * TILE + t]);
            alpha_sh[tid] = exp(old_max - new_max);
            m_sh[tid] = new_max;
        }
        barrier();

        for (uint e0 = 0; e0 < ROWS * TILE; e0 += wg) {
            uint e = e0 + tid;
            if (e < ROWS * TILE) {
                float s = s_sh[e];
                s_sh[e] = s <= MASKED ? 0.0 : exp(s - m_sh[e / TILE]);
            }
        }
        barrier();

        if (tid < ROWS) {
            float sum = 0.0;
            for (uint t = 0; t < TILE; t++) sum += s_sh[tid * TILE + t];
            l_sh[tid] = l_sh[tid] * alpha_sh[tid] + sum;
        }
        for (uint i = 0; i < MAX_OUT; i++) {
            uint e = tid + i * wg;
            if (e < ROWS * HEAD_DIM) {
                uint r = e / HEAD_DIM;
                uint d = e % HEAD_DIM;
                float o = acc[i] * alpha_sh[r];
                for (uint t = 0; t < n_keys; t++) o += s_sh[r * TILE + t] * v_sh[t * HEAD_DIM + d];
                acc[i] = o;
            }
        }
        barrier();
    }

    for (uint i = 0; i < MAX_OUT; i++) {
        uint e = tid + i * wg;
        if (e < ROWS * HEAD_DIM) {
            uint r = e / HEAD_DIM;
            uint d = e % HEAD_DIM;
            if (r < rows_here) {
                float l = l_sh[r];
                float o = acc[i];
                if (finishes) o = l > 0.0 ? o / l : 0.0;
                p.out_.v[o_base + (row0 + r) * p.o_stride + d] = o;
            }
        }
    }
    if (!finishes && tid < rows_here) {
        p.state.v[2u * (state_base + tid)] = m_sh[tid];
        p.state.v[2u * (state_base + tid) + 1u] = l_sh[tid];
    }
}
