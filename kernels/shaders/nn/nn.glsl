// Shared pieces of the nn kernels: workgroup-wide reductions and a few math helpers.
//
// A reduction first combines the lanes of each subgroup with subgroup arithmetic, then every
// subgroup writes one partial to shared memory and every invocation folds the partials in the
// same order, so all invocations get the same, deterministic result. The host keeps
// workgroup size / subgroup size <= NN_MAX_PARTIALS. Each reduction must be reached by the whole
// workgroup (uniform control flow); it ends with a barrier so the partials can be reused.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require

#define NN_MAX_PARTIALS 64

layout(buffer_reference, std430, buffer_reference_align = 4) readonly buffer U32In { uint v[]; };

#define NN_NEG_INF uintBitsToFloat(0xff800000u)

shared float nn_partial[NN_MAX_PARTIALS];

// The row a workgroup works on, from a 2-D grid of workgroups (so more than 65535 rows fit).
uint nn_group_index() {
    return gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
}

float wg_sum(float v) {
    v = subgroupAdd(v);
    if (subgroupElect()) nn_partial[gl_SubgroupID] = v;
    barrier();
    float total = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) total += nn_partial[i];
    barrier();
    return total;
}

float wg_max(float v) {
    v = subgroupMax(v);
    if (subgroupElect()) nn_partial[gl_SubgroupID] = v;
    barrier();
    float m = nn_partial[0];
    for (uint i = 1; i < gl_NumSubgroups; i++) m = max(m, nn_partial[i]);
    barrier();
    return m;
}

#ifdef NN_ARGMAX
shared uint nn_partial_index[NN_MAX_PARTIALS];

// Whether (v, i) comes before (bv, bi) in the order "larger value first, then lower index".
bool nn_before(float v, uint i, float bv, uint bi) {
    return v > bv || (v == bv && i < bi);
}

// The workgroup's first (value, index) pair in that order. Lanes with nothing to offer pass
// (-inf, 0xffffffff).
void wg_argmax(inout float v, inout uint i) {
    float m = subgroupMax(v);
    uint mi = subgroupMin(v == m ? i : 0xffffffffu);
    if (subgroupElect()) {
        nn_partial[gl_SubgroupID] = m;
        nn_partial_index[gl_SubgroupID] = mi;
    }
    barrier();
    v = nn_partial[0];
    i = nn_partial_index[0];
    for (uint s = 1; s < gl_NumSubgroups; s++) {
        if (nn_before(nn_partial[s], nn_partial_index[s], v, i)) {
            v = nn_partial[s];
            i = nn_partial_index[s];
        }
    }
    barrier();
}
#endif

// tanh written through exp so that large |u| saturates to ±1 instead of overflowing to NaN.
float nn_tanh(float u) {
    return 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
}
