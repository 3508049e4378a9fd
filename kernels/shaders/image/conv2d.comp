#version 460
// 2-D convolution over NCHW f32 activations as an implicit GEMM: no im2col buffer.
//
// out[n, co, oy, ox] = bias[co] + Σ w[co, ci, ky, kx] · x[n, ci, oy·s − pad + ky, ox·s − pad + kx]
// (taps outside the input count as 0). As a matrix product: M = output channels, N = every
// output pixel of every image, K = ci · kh · kw, with W the M × K matrix the weights already are
// (row-major [co][ci][ky][kx]). Each workgroup computes a 64 × 64 tile (64 channels by 64
// pixels) walking K 32 at a time: the weight slice is read with the weight type's dequant8 (f32,
// f16, bf16) and the input slice is gathered straight from x, each K index mapped to its
// (ci, ky, kx) and each pixel to its (n, oy, ox). Every thread accumulates 4 × 4 outputs.
// A dispatch may cover only the pixels first..pixels (whole output rows, when the host cuts a
// convolution into row bands across submissions); each output is summed in the same order
// whichever band computes it.
#include "common.glsl"
#include "quant.glsl"

#if defined(WTYPE_F32)
const uint WBYTES = 4u;
#else
const uint WBYTES = 2u;
#endif

// The tile; the host launches (TM / 4) · (TN / 4) = 256 invocations per workgroup.
const uint TM = 64u;
const uint TN = 64u;
const uint BK = 32u;
const uint STRIDE = BK + 1u;
const uint TPM = TM / 4u;

layout(push_constant) uniform Push {
    uint64_t w;       // [co][ci][kh][kw] in the weight type
    F32In x;          // [n][ci][h][w]
    F32In bias;       // [co], or 0 for none
    F32Buf y;         // [n][co][oh][ow]
    uint ci;
    uint h;
    uint w_in;
    uint co;
    uint oh;
    uint ow;
    uint k;           // kernel size (square)
    uint stride;
    uint pad;
    uint pixels;      // the end of this dispatch's pixels (at most n · oh · ow)
    uint tiles_m;
    uint has_bias;
    uint first;       // its first pixel
} p;

shared float ws[TM * STRIDE];
shared float xs[TN * STRIDE];
// Where each of the tile's pixels starts in x (its image's channel 0, before the taps), and its
// top-left input position; y0 = NONE past the last pixel.
shared uint px_base[TN];
shared int px_y0[TN];
shared int px_x0[TN];

const int NONE = -2147483647;

void main() {
    uint tile = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint m0 = (tile % p.tiles_m) * TM;
    uint n0 = p.first + (tile / p.tiles_m) * TN;
    if (n0 >= p.pixels) return;
    uint t = gl_LocalInvocationID.x;
    uint kk = p.k * p.k;
    uint kdim = p.ci * kk;
    uint plane = p.h * p.w_in;

    for (uint r = t; r < TN; r += gl_WorkGroupSize.x) {
        uint q = n0 + r;
        if (q < p.pixels) {
            uint img = q / (p.oh * p.ow);
            uint rem = q % (p.oh * p.ow);
            px_base[r] = img * p.ci * plane;
            px_y0[r] = int((rem / p.ow) * p.stride) - int(p.pad);
            px_x0[r] = int((rem % p.ow) * p.stride) - int(p.pad);
        } else {
            px_base[r] = 0u;
            px_y0[r] = NONE;
            px_x0[r] = 0;
        }
    }
    barrier();

    uint tm = t % TPM;
    uint tn = t / TPM;
    float acc[4][4];
    for (uint i = 0u; i < 4u; i++) {
        for (uint j = 0u; j < 4u; j++) acc[i][j] = 0.0;
    }
    uint row_bytes = kdim * WBYTES;

    for (uint k0 = 0u; k0 < kdim; k0 += BK) {
        for (uint g = t; g < TM * (BK / 8u); g += gl_WorkGroupSize.x) {
            uint r = g / (BK / 8u);
            uint part = g % (BK / 8u);
            float v[8];
            if (m0 + r < p.co) {
                dequant8(p.w + uint64_t(m0 + r) * row_bytes, k0 + part * 8u, kdim, v);
            } else {
                for (uint i = 0u; i < 8u; i++) v[i] = 0.0;
            }
            for (uint i = 0u; i < 8u; i++) ws[r * STRIDE + part * 8u + i] = v[i];
        }
        // Neighbouring threads take neighbouring pixels of one K index: their reads of x lie
        // along a row of the input.
        for (uint idx = t; idx < TN * BK; idx += gl_WorkGroupSize.x) {
            uint r = idx % TN;
            uint c = idx / TN;
            uint kq = k0 + c;
            float v = 0.0;
            int y0 = px_y0[r];
            if (kq < kdim && y0 != NONE) {
                uint ch = kq / kk;
                uint tap = kq % kk;
                int iy = y0 + int(tap / p.k);
                int ix = px_x0[r] + int(tap % p.k);
                if (iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w_in)) {
                    v = p.x.v[px_base[r] + ch * plane + uint(iy) * p.w_in + uint(ix)];
                }
            }
            xs[r * STRIDE + c] = v;
        }
        barrier();
        for (uint c = 0u; c < BK; c++) {
            float a[4];
            float b[4];
            for (uint i = 0u; i < 4u; i++) {
                a[i] = ws[(tm + i * TPM) * STRIDE + c];
                b[i] = xs[(tn + i * (TN / 4u)) * STRIDE + c];
            }
            for (uint i = 0u; i < 4u; i++) {
                for (uint j = 0u; j < 4u; j++) acc[i][j] += a[i] * b[j];
            }
        }
        barrier();
    }

    uint per_image = p.oh * p.ow;
    for (uint j = 0u; j < 4u; j++) {
        uint q = n0 + tn + j * (TN / 4u);
        if (q >= p.pixels) continue;
        uint img = q / per_image;
        uint rem = q % per_image;
        for (uint i = 0u; i < 4u; i++) {
            uint m = m0 + tm + i * TPM;
            if (m < p.co) {
                float b = p.has_bias != 0u ? p.bias.v[m] : 0.0;
                p.y.v[(img * p.co + m) * per_image + rem] = acc[i][j] + b;
            }
        }
    }
}
