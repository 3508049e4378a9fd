#version 460
// Causal grouped-query attention over a KV cache, flash style: scores are never stored beyond
// one tile, and the softmax is taken online (a running maximum and sum per query row, with the
// output rescaled whenever the maximum grows).
//
// Layouts: q and out are n_q × n_heads × HEAD_DIM; each cache is n_kv_heads × capacity ×
// HEAD_DIM, f32 or f16 (flag bits 0 and 1 for K and V). Query heads kv·group .. kv·group + group - 1
// share kv head kv. A workgroup takes one kv head (z) and ROWS query rows, where row r stands for
// query token r / group and query head kv·group + r % group, so the rows of one workgroup share
// every K/V tile it loads. Query token t sits at position first_pos + t and sees keys at
// positions j <= first_pos + t (and j > first_pos + t - window with a sliding window).
//
// Per tile of TILE keys: load K and V into shared memory; compute ROWS × TILE scores; per row,
// update the running maximum; turn scores into weights; update the running sums and the output
// accumulators, which each invocation keeps for up to MAX_OUT (row, dim) elements.
//
// Passes: one dispatch covers the key positions pass_begin..pass_end. The host splits the keys
// into several passes only where the driver caps the loop iterations of one invocation
// (llvmpipe, see Limits::max_loop_iterations); elsewhere one pass covers them all. A pass that
// is not a row block's first resumes from the running state the previous one left: per (kv
// head, row) the maximum and the sum in `state`, and the output still unnormalized in `out`.
// Only the pass holding a block's last key divides by the sum.
#include "common.glsl"
#include "nn.glsl"

layout(constant_id = 2) const uint HEAD_DIM = 128;
layout(constant_id = 3) const uint ROWS = 4;
layout(constant_id = 4) const uint TILE = 16;
// K rows are padded by one value so that invocations reading different keys at the same
// dimension hit different shared-memory banks.
const uint K_STRIDE = HEAD_DIM + 1;
#define MAX_OUT 8
// Masked scores; finite so that no inf - inf ever happens.
#define MASKED -1.0e30

layout(push_constant) uniform Push {
    F32In q;
    uint64_t k;
    uint64_t v;
    F32Buf out_;
    F32Buf state;     // [n_kv_heads · n_q · group][max, sum] between passes
    uint n_heads;
    uint n_kv_heads;
    uint n_q;
    uint first_pos;
    uint capacity;
    float scale;
    uint window;      // 0: no sliding window
    float softcap;    // 0: no soft capping
    uint flags;       // bit 0: K is f16, bit 1: V is f16
    uint n_blocks;
    uint pass_begin;  // the key positions this dispatch covers
    uint pass_end;
} p;

shared float q_sh[ROWS * HEAD_DIM];
shared float k_sh[TILE * K_STRIDE];
shared float v_sh[TILE * HEAD_DIM];
shared float s_sh[ROWS * TILE];
shared float m_sh[ROWS];
shared float l_sh[ROWS];
shared float alpha_sh[ROWS];

float load_cache(uint64_t addr, bool half_floats, uint idx) {
    if (half_floats) {
        vec2 pair = unpackHalf2x16(U32In(addr).v[idx >> 1]);
        return (idx & 1u) != 0u ? pair.y : pair.x;
    }
    return F32In(addr).v[idx];
}

void main() {
    uint blk = nn_group_index();
    if (blk >= p.n_blocks) return;
    uint kvh = gl_WorkGroupID.z;
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;
    uint group = p.n_heads / p.n_kv_heads;
    uint row0 = blk * ROWS;
    uint rows_here = min(ROWS, p.n_q * group - row0);
    bool k_half = (p.flags & 1u) != 0u;
    bool v_half = (p.flags & 2u) != 0u;

    // The scale is folded into q.
    for (uint e = tid; e < ROWS * HEAD_DIM; e += wg) {
        uint r = e / HEAD_DIM;
        uint d = e % HEAD_DIM;
        float val = 0.0;
        if (r < rows_here) {
            uint gr = row0 + r;
            uint head = kvh * group + gr % group;
            val = p.q.v[((gr / group) * p.n_heads + head) * HEAD_DIM + d] * p.scale;
        }
        q_sh[e] = val;
    }
    // Keys any row of this workgroup can see, and the part of them this pass covers. The
    // conditions are uniform over the workgroup, so returning before a barrier is safe.
    uint first_token = row0 / group;
    uint last_token = (row0 + rows_here - 1) / group;
    uint key_end = p.first_pos + last_token + 1;
    uint key_begin = 0;
    if (p.window != 0) {
        uint newest = p.first_pos + first_token + 1;
        key_begin = newest > p.window ? newest - p.window : 0;
    }
    uint begin = max(key_begin, p.pass_begin);
    uint end = min(key_end, p.pass_end);
    if (begin >= end) return;
    bool resumed = key_begin < p.pass_begin;
    bool finishes = key_end <= p.pass_end;
    uint state_base = kvh * p.n_q * group + row0;

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
            uint gr = row0 + r;
            uint head = kvh * group + gr % group;
            a = p.out_.v[((gr / group) * p.n_heads + head) * HEAD_DIM + e % HEAD_DIM];
        }
        acc[i] = a;
    }
    uint cache_base = kvh * p.capacity;
    barrier();

    for (uint k0 = begin; k0 < end; k0 += TILE) {
        uint n_keys = min(TILE, end - k0);
        for (uint e = tid; e < TILE * HEAD_DIM; e += wg) {
            uint t = e / HEAD_DIM;
            uint d = e % HEAD_DIM;
            float kv = 0.0;
            float vv = 0.0;
            if (t < n_keys) {
                uint idx = (cache_base + k0 + t) * HEAD_DIM + d;
                kv = load_cache(p.k, k_half, idx);
                vv = load_cache(p.v, v_half, idx);
            }
            k_sh[t * K_STRIDE + d] = kv;
            v_sh[e] = vv;
        }
        barrier();

        // Loops whose trip count is the same for every invocation, and the dot product
        // unrolled by four: fewer back-edges (what llvmpipe's cap counts) and less looping.
        for (uint e0 = 0; e0 < ROWS * TILE; e0 += wg) {
            uint e = e0 + tid;
            uint r = e / TILE;
            uint t = e % TILE;
            float s = MASKED;
            if (e < ROWS * TILE && r < rows_here && t < n_keys) {
                uint key = k0 + t;
                uint pos = p.first_pos + (row0 + r) / group;
                if (key <= pos && (p.window == 0 || key + p.window > pos)) {
                    float dot = 0.0;
                    uint d = 0;
                    for (; d + 4 <= HEAD_DIM; d += 4) {
                        uint qi = r * HEAD_DIM + d;
                        uint ki = t * K_STRIDE + d;
                        dot += q_sh[qi] * k_sh[ki] + q_sh[qi + 1] * k_sh[ki + 1]
                            + q_sh[qi + 2] * k_sh[ki + 2] + q_sh[qi + 3] * k_sh[ki + 3];
                    }
                    for (; d < HEAD_DIM; d++) dot += q_sh[r * HEAD_DIM + d] * k_sh[t * K_STRIDE + d];
                    if (p.softcap > 0.0) dot = p.softcap * nn_tanh(dot / p.softcap);
                    s = dot;
                }
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
                uint gr = row0 + r;
                uint head = kvh * group + gr % group;
                float l = l_sh[r];
                float o = acc[i];
                if (finishes) o = l > 0.0 ? o / l : 0.0;
                p.out_.v[((gr / group) * p.n_heads + head) * HEAD_DIM + d] = o;
            }
        }
    }
    if (!finishes && tid < rows_here) {
        p.state.v[2u * (state_base + tid)] = m_sh[tid];
        p.state.v[2u * (state_base + tid) + 1u] = l_sh[tid];
    }
}
