// Shared declarations for halo's compute kernels.
//
// Buffers are passed as buffer device addresses in push constants (no descriptor sets), so a
// kernel can address any allocation regardless of maxStorageBufferRange. Workgroup size comes
// from specialization constant 0 and the device's subgroup size from constant 1.
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_buffer_reference2 : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
layout(constant_id = 1) const uint SUBGROUP_SIZE = 32;

layout(buffer_reference, std430, buffer_reference_align = 4) buffer F32Buf { float v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) readonly buffer F32In { float v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) buffer U32Buf { uint v[]; };

// A flat index over a 2-D dispatch, so element counts above 65535 workgroups fit.
uint flat_index() {
    return gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * gl_WorkGroupSize.x;
}
