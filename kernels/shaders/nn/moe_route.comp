#version 460
// Mixture-of-experts routing for a batch: turns the router's ids (n_tokens rows of k expert ids;
// pair p = t·k + s) into one list per expert of the pairs that chose it, in increasing order, so
// the indexed matmul can run each expert's weights over all of its tokens at once.
//
// One workgroup per expert. Invocation i takes a contiguous run of pairs, counts the ones that
// chose this expert, and an exclusive prefix sum of those counts over the workgroup (in shared
// memory, ordered by local invocation index) gives each run's place in the list; a second pass
// over the run writes the pair indices there. The result does not depend on subgroup size or
// scheduling. Ids not below n_experts match no workgroup, so those pairs are in no list.
#include "common.glsl"
#include "nn.glsl"

layout(push_constant) uniform Push {
    U32In ids;
    U32Buf counts;
    U32Buf pairs;
    uint n_pairs;   // n_tokens · k
    uint n_tokens;  // capacity of each list
    uint n_experts;
} p;

shared uint scan[gl_WorkGroupSize.x];

void main() {
    uint expert = nn_group_index();
    if (expert >= p.n_experts) return; // uniform: the whole workgroup leaves together
    uint tid = gl_LocalInvocationID.x;
    uint wg = gl_WorkGroupSize.x;
    uint per = (p.n_pairs + wg - 1u) / wg;
    uint begin = min(tid * per, p.n_pairs);
    uint end = min(begin + per, p.n_pairs);

    uint mine = 0u;
    for (uint i = begin; i < end; i++) {
        if (p.ids.v[i] == expert) mine++;
    }

    // Inclusive Hillis-Steele scan of the per-invocation counts.
    scan[tid] = mine;
    barrier();
    for (uint off = 1u; off < wg; off <<= 1u) {
        uint add = tid >= off ? scan[tid - off] : 0u;
        barrier();
        scan[tid] += add;
        barrier();
    }
    uint at = scan[tid] - mine;
    uint total = scan[wg - 1u];

    // A token lists each expert at most once, so n_tokens entries suffice; should the ids
    // repeat an expert within a token anyway, the list is cut at n_tokens so that nothing is
    // written past it.
    uint list = expert * p.n_tokens;
    for (uint i = begin; i < end && at < p.n_tokens; i++) {
        if (p.ids.v[i] == expert) {
            p.pairs.v[list + at] = i;
            at++;
        }
    }
    if (tid == 0u) p.counts.v[expert] = min(total, p.n_tokens);
}
