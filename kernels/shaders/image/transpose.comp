#version 460
// Batched 2-D transpose: out[b][c][r] = x[b][r][c] for `batch` matrices of rows × cols. Turns
// NCHW activations (rows = channels, cols = pixels) into token rows (NHWC) for the attention
// blocks' linear layers, and back. One invocation per output value.
#include "common.glsl"

layout(push_constant) uniform Push {
    F32In x;
    F32Buf out_;
    uint rows;
    uint cols;
    uint batch;
} p;

void main() {
    uint i = flat_index();
    uint per = p.rows * p.cols;
    if (i >= p.batch * per) return;
    uint b = i / per;
    uint r = i % per;
    uint oc = r / p.rows; // output row = input column
    uint orr = r % p.rows; // output column = input row
    p.out_.v[i] = p.x.v[b * per + orr * p.cols + oc];
}
