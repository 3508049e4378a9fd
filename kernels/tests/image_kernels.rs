//! The image-model ops (conv2d in f32/f16/bf16, group norm with and without SiLU, ×2 nearest
//! upsampling) against their references in `reference::image`, over sweeps of shapes. Skips
//! (with a message) when no Vulkan device exists, unless HALO_REQUIRE_VULKAN=1.

mod common;

use common::device;

use halo_kernels::ops::{self, Conv2d, F32s, Weights};
use halo_kernels::quant::{self, WeightType};
use halo_kernels::reference::image as r;
use halo_kernels::reference::{max_rel_diff, Rng};
use halo_kernels::{Buffer, Device, MemoryKind, OwnerId, VulkanError};

const OWNER: OwnerId = OwnerId(12);

fn upload_bytes(dev: &Device, bytes: &[u8]) -> Buffer {
    let mut b = dev
        .alloc(MemoryKind::Device, bytes.len().max(4) as u64, OWNER)
        .unwrap();
    dev.write(&mut b, 0, bytes).unwrap();
    b
}

fn upload(dev: &Device, v: &[f32]) -> Buffer {
    upload_bytes(
        dev,
        &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    )
}

fn zeros(dev: &Device, n: usize) -> Buffer {
    dev.alloc(MemoryKind::Device, (n.max(1) * 4) as u64, OWNER)
        .unwrap()
}

fn run(dev: &Device, f: impl FnOnce(&mut halo_kernels::Stream) -> Result<(), VulkanError>) {
    let mut s = dev.stream().unwrap();
    f(&mut s).unwrap();
    s.finish().unwrap();
}

/// Weights of `ty` as the GPU reads them and as f32 (dequantized) for the reference.
fn weights(ty: WeightType, n: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let bytes = quant::random_weights(ty, n, seed);
    let mut f = vec![0.0; n];
    quant::dequantize(ty, &bytes, &mut f).unwrap();
    (bytes, f)
}

/// The GPU sums the taps in another order, in f32; |Δ| ≤ 2e-5 · Σ|w·x| per output is far above
/// that rounding and far below an indexing mistake.
fn check_conv(what: &str, got: &[f32], x: &[f32], w: &[f32], shape: Conv2d) {
    let want = r::conv2d(
        x,
        w,
        None,
        shape.n as usize,
        shape.ci as usize,
        shape.h as usize,
        shape.w as usize,
        shape.co as usize,
        shape.k as usize,
        shape.stride as usize,
        shape.pad as usize,
    );
    let absx: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let absw: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let scale = r::conv2d(
        &absx,
        &absw,
        None,
        shape.n as usize,
        shape.ci as usize,
        shape.h as usize,
        shape.w as usize,
        shape.co as usize,
        shape.k as usize,
        shape.stride as usize,
        shape.pad as usize,
    );
    assert_eq!(got.len(), want.len());
    for i in 0..got.len() {
        let tol = 2e-5 * scale[i] + 1e-30;
        assert!(
            (got[i] - want[i]).abs() <= tol,
            "{what}: output {i} is {}, reference {} (tolerance {tol:e})",
            got[i],
            want[i]
        );
    }
}

#[test]
fn conv2d_matches_the_reference() {
    let Some(dev) = device() else { return };
    // (n, ci, h, w, co, k, stride, pad): SDXL's 3×3 same-size and stride-2 downsampling, 1×1
    // projections, one input channel, odd sizes, more channels than one tile, non-square.
    let shapes = [
        (1, 4, 8, 8, 32, 3, 1, 1),
        (2, 3, 5, 7, 5, 3, 1, 1),
        (1, 16, 9, 9, 16, 3, 2, 1),
        (1, 32, 8, 6, 70, 1, 1, 0),
        (1, 1, 3, 3, 1, 3, 1, 1),
        (1, 20, 17, 13, 130, 3, 1, 1),
        (3, 8, 4, 12, 8, 3, 2, 1),
    ];
    let mut rng = Rng::new(3);
    for (i, &(n, ci, h, w, co, k, stride, pad)) in shapes.iter().enumerate() {
        let shape = Conv2d {
            n,
            ci,
            h,
            w,
            co,
            k,
            stride,
            pad,
        };
        let x = rng.f32s(shape.in_len() as usize, 1.0);
        for ty in [WeightType::F32, WeightType::F16, WeightType::BF16] {
            let (wb, wf) = weights(ty, (co * ci * k * k) as usize, 100 + i as u64);
            let bias = rng.f32s(co as usize, 0.5);
            let (xb, wbuf, bb) = (
                upload(&dev, &x),
                upload_bytes(&dev, &wb),
                upload(&dev, &bias),
            );
            let y = zeros(&dev, shape.out_len() as usize);
            let wv = Weights {
                buffer: &wbuf,
                offset: 0,
                ty,
                rows: co,
                cols: ci * k * k,
            };
            run(&dev, |s| {
                ops::conv2d(
                    s,
                    shape,
                    wv,
                    Some(F32s::all(&bb)),
                    F32s::all(&xb),
                    F32s::all(&y),
                )
            });
            let got = dev.read_f32(&y, 0, shape.out_len()).unwrap();
            // Take the bias off so the check scales with the products alone.
            let (oh, ow) = shape.out_hw();
            let plane = (oh * ow) as usize;
            let got: Vec<f32> = got
                .iter()
                .enumerate()
                .map(|(j, v)| v - bias[(j / plane) % co as usize])
                .collect();
            check_conv(&format!("{shape:?} {ty}"), &got, &x, &wf, shape);
        }
    }
}

/// A convolution cut into row bands (uneven, some crossing from one image to the next) writes
/// only its rows, and the bands together equal the whole convolution bit for bit.
#[test]
fn conv2d_in_row_bands_equals_the_whole() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(5);
    // (n, ci, h, w, co, k, stride, pad) and band ends (the last is n · oh).
    type Shape = (u64, u64, u64, u64, u64, u64, u64, u64);
    let cases: [(Shape, &[u64]); 3] = [
        ((1, 8, 9, 7, 12, 3, 1, 1), &[1, 4, 9]),
        ((2, 5, 6, 11, 70, 3, 1, 1), &[5, 7, 8, 12]),
        ((3, 4, 8, 8, 6, 3, 2, 1), &[3, 3, 10, 12]),
    ];
    for ((n, ci, h, w, co, k, stride, pad), ends) in cases {
        let shape = Conv2d {
            n,
            ci,
            h,
            w,
            co,
            k,
            stride,
            pad,
        };
        let (oh, ow) = shape.out_hw();
        assert_eq!(*ends.last().unwrap(), n * oh);
        let x = rng.f32s(shape.in_len() as usize, 1.0);
        let (wb, wf) = weights(WeightType::F16, (co * ci * k * k) as usize, 7);
        let bias = rng.f32s(co as usize, 0.5);
        let (xb, wbuf, bb) = (
            upload(&dev, &x),
            upload_bytes(&dev, &wb),
            upload(&dev, &bias),
        );
        let wv = Weights {
            buffer: &wbuf,
            offset: 0,
            ty: WeightType::F16,
            rows: co,
            cols: ci * k * k,
        };
        let whole = zeros(&dev, shape.out_len() as usize);
        run(&dev, |s| {
            ops::conv2d(
                s,
                shape,
                wv,
                Some(F32s::all(&bb)),
                F32s::all(&xb),
                F32s::all(&whole),
            )
        });
        let whole = dev.read_f32(&whole, 0, shape.out_len()).unwrap();
        let plane = (oh * ow) as usize;
        let unbiased: Vec<f32> = whole
            .iter()
            .enumerate()
            .map(|(j, v)| v - bias[(j / plane) % co as usize])
            .collect();
        check_conv(&format!("{shape:?}"), &unbiased, &x, &wf, shape);

        let sentinel = -12345.0f32;
        let banded = upload(&dev, &vec![sentinel; shape.out_len() as usize]);
        let mut start = 0;
        for &end in ends {
            run(&dev, |s| {
                ops::conv2d_rows(
                    s,
                    shape,
                    wv,
                    Some(F32s::all(&bb)),
                    F32s::all(&xb),
                    F32s::all(&banded),
                    start..end,
                )
            });
            let got = dev.read_f32(&banded, 0, shape.out_len()).unwrap();
            // Output j is image j / (co · plane), row (j % plane) / ow of it.
            for (j, v) in got.iter().enumerate() {
                let img = j / (co as usize * plane);
                let row = (img * oh as usize + (j % plane) / ow as usize) as u64;
                if row < end {
                    assert_eq!(
                        v.to_bits(),
                        whole[j].to_bits(),
                        "{shape:?}: output {j} after rows ..{end}"
                    );
                } else {
                    assert_eq!(
                        *v, sentinel,
                        "{shape:?}: output {j} written before its band"
                    );
                }
            }
            start = end;
        }
    }
    let shape = Conv2d {
        n: 1,
        ci: 1,
        h: 4,
        w: 4,
        co: 1,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let (wbuf, x, y) = (zeros(&dev, 9), zeros(&dev, 16), zeros(&dev, 16));
    let mut s = dev.stream().unwrap();
    let e = ops::conv2d_rows(
        &mut s,
        shape,
        Weights {
            buffer: &wbuf,
            offset: 0,
            ty: WeightType::F32,
            rows: 1,
            cols: 9,
        },
        None,
        F32s::all(&x),
        F32s::all(&y),
        2..5,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rows 2..5 are not within the 4"), "{e}");
}

#[test]
fn conv2d_refuses_bad_shapes() {
    let Some(dev) = device() else { return };
    let shape = Conv2d {
        n: 1,
        ci: 2,
        h: 4,
        w: 4,
        co: 3,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let wbuf = zeros(&dev, 54);
    let x = zeros(&dev, 32);
    let y = zeros(&dev, 48);
    let mut s = dev.stream().unwrap();
    let w = |rows, cols, ty| Weights {
        buffer: &wbuf,
        offset: 0,
        ty,
        rows,
        cols,
    };
    let cases = [
        (
            ops::conv2d(
                &mut s,
                shape,
                w(3, 17, WeightType::F32),
                None,
                F32s::all(&x),
                F32s::all(&y),
            ),
            "weights are 3×17",
        ),
        (
            ops::conv2d(
                &mut s,
                shape,
                w(3, 18, WeightType::Q8_0),
                None,
                F32s::all(&x),
                F32s::all(&y),
            ),
            "must be f32, f16 or bf16",
        ),
        (
            ops::conv2d(
                &mut s,
                Conv2d {
                    k: 7,
                    pad: 0,
                    ..shape
                },
                w(3, 98, WeightType::F32),
                None,
                F32s::all(&x),
                F32s::all(&y),
            ),
            "does not fit",
        ),
        (
            ops::conv2d(
                &mut s,
                shape,
                w(3, 18, WeightType::F32),
                None,
                F32s::all(&x).sub(0, 31),
                F32s::all(&y),
            ),
            "x has 31 values",
        ),
    ];
    for (result, want) in cases {
        let e = result.unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} does not contain {want:?}");
    }
}

#[test]
fn group_norm_matches_the_reference() {
    let Some(dev) = device() else { return };
    // (images, channels, plane, groups): SDXL-like 32 groups, the tiny model's 8, one channel
    // per group, a group larger than the workgroup many times over, a single group.
    let shapes = [
        (1, 64, 64, 32),
        (2, 16, 9, 8),
        (1, 8, 5, 8),
        (1, 32, 4096, 4),
        (3, 6, 10, 1),
        // The VAE's 256-channel resnet input at 1024² holds 8 Mi values per group: more loop
        // iterations than lavapipe allows one invocation at one value per iteration.
        (1, 8, 1 << 20, 1),
    ];
    let mut rng = Rng::new(5);
    for &(n, c, plane, groups) in &shapes {
        // An offset mean tests the two-pass variance.
        let x: Vec<f32> = rng
            .f32s(n * c * plane, 2.0)
            .iter()
            .map(|v| v + 3.0)
            .collect();
        let w = rng.f32s(c, 1.0);
        let b = rng.f32s(c, 1.0);
        for silu in [false, true] {
            let (xb, wb, bb) = (upload(&dev, &x), upload(&dev, &w), upload(&dev, &b));
            let out = zeros(&dev, x.len());
            run(&dev, |s| {
                ops::group_norm(
                    s,
                    F32s::all(&xb),
                    F32s::all(&wb),
                    F32s::all(&bb),
                    F32s::all(&out),
                    c as u64,
                    plane as u64,
                    groups as u64,
                    1e-5,
                    silu,
                )
            });
            let got = dev.read_f32(&out, 0, x.len() as u64).unwrap();
            let want = r::group_norm(&x, &w, &b, c, plane, groups, 1e-5, silu);
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-4, "({n}, {c}, {plane}, {groups}) silu={silu}: {d:e}");
        }
    }
    // In place.
    let x = rng.f32s(2 * 8 * 16, 1.0);
    let (w, b) = (vec![1.5; 8], vec![0.25; 8]);
    let (xb, wb, bb) = (upload(&dev, &x), upload(&dev, &w), upload(&dev, &b));
    run(&dev, |s| {
        ops::group_norm(
            s,
            F32s::all(&xb),
            F32s::all(&wb),
            F32s::all(&bb),
            F32s::all(&xb),
            8,
            16,
            4,
            1e-6,
            true,
        )
    });
    let got = dev.read_f32(&xb, 0, x.len() as u64).unwrap();
    assert!(max_rel_diff(&got, &r::group_norm(&x, &w, &b, 8, 16, 4, 1e-6, true)) < 1e-4);
    let mut s = dev.stream().unwrap();
    let e = ops::group_norm(
        &mut s,
        F32s::all(&xb),
        F32s::all(&wb),
        F32s::all(&bb),
        F32s::all(&xb),
        8,
        16,
        3,
        1e-6,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("do not split into 3 groups"), "{e}");
    // Where loops are capped, a group too large for one workgroup is refused, not miscomputed.
    if s.limits().max_loop_iterations.is_some() {
        let n = 24 << 20;
        let big = zeros(&dev, n);
        let e = ops::group_norm(
            &mut s,
            F32s::all(&big),
            F32s::all(&wb).sub(0, 1),
            F32s::all(&bb).sub(0, 1),
            F32s::all(&big),
            1,
            n as u64,
            1,
            1e-6,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("caps loops"), "{e}");
    }
}

#[test]
fn upsample2x_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(9);
    for &(planes, h, w) in &[(1, 1, 1), (3, 5, 7), (8, 32, 32), (2, 1, 300)] {
        let x = rng.f32s(planes * h * w, 1.0);
        let xb = upload(&dev, &x);
        let out = zeros(&dev, x.len() * 4);
        run(&dev, |s| {
            ops::upsample2x(
                s,
                F32s::all(&xb),
                F32s::all(&out),
                planes as u64,
                h as u64,
                w as u64,
            )
        });
        let got = dev.read_f32(&out, 0, x.len() as u64 * 4).unwrap();
        assert_eq!(got, r::upsample2x(&x, planes, h, w), "({planes}, {h}, {w})");
    }
}

#[test]
fn seq_attention_matches_the_reference() {
    use halo_kernels::ops::SeqAttention;
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(21);
    // (batch, heads, head_dim, n_q, n_kv, causal, fused): UNet self-attention (8 heads of 40
    // on a few hundred pixels), cross-attention to 77 text tokens, the VAE's single 512-wide
    // head, CLIP's causal 77 tokens in a fused qkv buffer, a batch of two (CFG), odd sizes.
    // The last three have keys enough to take several passes where the driver caps loop
    // iterations (lavapipe): the VAE's mid block at 1024² (16384 keys; 64 of its queries),
    // UNet-wide heads over 9000 keys in a batch of two, and a causal one.
    let cases = [
        (1, 8, 40, 300, 300, false, false),
        (2, 4, 16, 64, 77, false, false),
        (1, 1, 512, 70, 70, false, false),
        (2, 4, 8, 77, 77, true, true),
        (1, 3, 5, 9, 9, false, true),
        (1, 2, 64, 33, 1, false, false),
        (1, 1, 512, 64, 16384, false, false),
        (2, 2, 64, 40, 9000, false, false),
        (1, 1, 128, 1500, 1500, true, false),
    ];
    let capped = dev.stream().unwrap().limits().max_loop_iterations.is_some();
    for &(b, h, d, nq, nkv, causal, fused) in &cases {
        let width = h * d;
        let (q, k, v, qs, kvs) = if fused {
            // One buffer of rows [q | k | v]; the views start at each part's first column.
            let qkv = rng.f32s(b * nq * 3 * width, 1.0);
            let k = qkv[width..].to_vec();
            let v = qkv[2 * width..].to_vec();
            (qkv, k, v, 3 * width, 3 * width)
        } else {
            (
                rng.f32s(b * nq * width, 1.0),
                rng.f32s(b * nkv * width, 1.0),
                rng.f32s(b * nkv * width, 1.0),
                width,
                width,
            )
        };
        let scale = 1.0 / (d as f32).sqrt();
        let p = SeqAttention {
            batch: b as u32,
            n_heads: h as u32,
            head_dim: d as u32,
            n_q: nq as u32,
            n_kv: nkv as u32,
            q_stride: qs as u32,
            kv_stride: kvs as u32,
            o_stride: width as u32,
            scale,
            causal,
        };
        let want = r::seq_attention(&q, &k, &v, b, h, d, nq, nkv, qs, kvs, width, scale, causal);
        let (qb, kb, vb) = (upload(&dev, &q), upload(&dev, &k), upload(&dev, &v));
        let out = zeros(&dev, want.len());
        let qlen = ((b * nq - 1) * qs + width) as u64;
        let kvlen = ((b * nkv - 1) * kvs + width) as u64;
        let state = zeros(&dev, ops::seq_attention_state_len(&p) as usize);
        let passes = ops::seq_attention_passes(&dev.stream().unwrap(), &p).unwrap();
        if capped && nkv >= 1500 {
            assert!(
                passes > 1,
                "{nkv} keys of {d} in one pass on a capped device"
            );
        }
        run(&dev, |s| {
            ops::seq_attention(
                s,
                &p,
                F32s::all(&qb).sub(0, qlen),
                F32s::all(&kb).sub(0, kvlen),
                F32s::all(&vb).sub(0, kvlen),
                F32s::all(&out),
                F32s::all(&state),
            )
        });
        let got = dev.read_f32(&out, 0, want.len() as u64).unwrap();
        let diff = max_rel_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{:?} in {passes} passes: {diff:e}",
            (b, h, d, nq, nkv, causal, fused)
        );
    }
}

/// Attention with an additive bias shared by the batch (T5's relative position bias, with no
/// 1/√d scaling): T5-XXL-like heads over 512 tokens in a batch of two, a fused qkv, a scaled
/// case, and keys enough for several passes on a capped device. The wrong bias length is
/// refused.
#[test]
fn seq_attention_with_a_bias_matches_the_reference() {
    use halo_kernels::ops::SeqAttention;
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(22);
    // (batch, heads, head_dim, n_q, n_kv, scale, fused)
    let cases = [
        (2, 4, 64, 512, 512, 1.0, false),
        (1, 3, 8, 13, 13, 1.0, true),
        (1, 2, 16, 7, 9, 0.25, false),
        (1, 1, 128, 40, 3000, 1.0, false),
    ];
    for &(b, h, d, nq, nkv, scale, fused) in &cases {
        let width = h * d;
        let (q, k, v, qs, kvs) = if fused {
            let qkv = rng.f32s(b * nq * 3 * width, 0.5);
            let k = qkv[width..].to_vec();
            let v = qkv[2 * width..].to_vec();
            (qkv, k, v, 3 * width, 3 * width)
        } else {
            (
                rng.f32s(b * nq * width, 0.5),
                rng.f32s(b * nkv * width, 0.5),
                rng.f32s(b * nkv * width, 1.0),
                width,
                width,
            )
        };
        let bias = rng.f32s(h * nq * nkv, 3.0);
        let p = SeqAttention {
            batch: b as u32,
            n_heads: h as u32,
            head_dim: d as u32,
            n_q: nq as u32,
            n_kv: nkv as u32,
            q_stride: qs as u32,
            kv_stride: kvs as u32,
            o_stride: width as u32,
            scale,
            causal: false,
        };
        let want = r::seq_attention_biased(
            &q,
            &k,
            &v,
            b,
            h,
            d,
            nq,
            nkv,
            qs,
            kvs,
            width,
            scale,
            false,
            Some(&bias),
        );
        let plain = r::seq_attention(&q, &k, &v, b, h, d, nq, nkv, qs, kvs, width, scale, false);
        assert!(max_rel_diff(&plain, &want) > 1e-2, "the bias matters here");
        let (qb, kb, vb, bb) = (
            upload(&dev, &q),
            upload(&dev, &k),
            upload(&dev, &v),
            upload(&dev, &bias),
        );
        let out = zeros(&dev, want.len());
        let qlen = ((b * nq - 1) * qs + width) as u64;
        let kvlen = ((b * nkv - 1) * kvs + width) as u64;
        let state = zeros(&dev, ops::seq_attention_state_len(&p) as usize);
        let passes = ops::seq_attention_passes(&dev.stream().unwrap(), &p).unwrap();
        run(&dev, |s| {
            ops::seq_attention_biased(
                s,
                &p,
                F32s::all(&qb).sub(0, qlen),
                F32s::all(&kb).sub(0, kvlen),
                F32s::all(&vb).sub(0, kvlen),
                Some(F32s::all(&bb)),
                F32s::all(&out),
                F32s::all(&state),
            )
        });
        let got = dev.read_f32(&out, 0, want.len() as u64).unwrap();
        let diff = max_rel_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{:?} in {passes} passes: {diff:e}",
            (b, h, d, nq, nkv, scale, fused)
        );
        let mut s = dev.stream().unwrap();
        let e = ops::seq_attention_biased(
            &mut s,
            &p,
            F32s::all(&qb).sub(0, qlen),
            F32s::all(&kb).sub(0, kvlen),
            F32s::all(&vb).sub(0, kvlen),
            Some(F32s::all(&bb).sub(0, bias.len() as u64 - 1)),
            F32s::all(&out),
            F32s::all(&state),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bias has"), "{e}");
    }
}

#[test]
fn transpose_and_add_channel_match_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(31);
    for &(b, rows, cols) in &[(1, 1, 1), (2, 3, 5), (1, 64, 300), (3, 17, 1)] {
        let x = rng.f32s(b * rows * cols, 1.0);
        let xb = upload(&dev, &x);
        let out = zeros(&dev, x.len());
        run(&dev, |s| {
            ops::transpose(
                s,
                F32s::all(&xb),
                F32s::all(&out),
                b as u64,
                rows as u64,
                cols as u64,
            )
        });
        let got = dev.read_f32(&out, 0, x.len() as u64).unwrap();
        let mut want = vec![0.0; x.len()];
        for i in 0..b {
            for r in 0..rows {
                for c in 0..cols {
                    want[i * rows * cols + c * rows + r] = x[i * rows * cols + r * cols + c];
                }
            }
        }
        assert_eq!(got, want, "({b}, {rows}, {cols})");
    }
    let (planes, plane) = (6, 37);
    let x = rng.f32s(planes * plane, 1.0);
    let bias = rng.f32s(planes, 1.0);
    let (xb, bb) = (upload(&dev, &x), upload(&dev, &bias));
    run(&dev, |s| {
        ops::add_channel(
            s,
            F32s::all(&xb),
            F32s::all(&bb),
            F32s::all(&xb),
            plane as u64,
        )
    });
    let got = dev.read_f32(&xb, 0, x.len() as u64).unwrap();
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i / plane])
        .collect();
    assert_eq!(got, want);
}

#[test]
fn upsample_to_a_size_picks_the_nearest_source() {
    let Some(dev) = device() else { return };
    // 3 → 5 (a UNet level upsampled to an odd skip size): sources 0, 0, 1, 1, 2.
    let x: Vec<f32> = (0..2 * 3 * 2).map(|v| v as f32).collect();
    let xb = upload(&dev, &x);
    let out = zeros(&dev, 2 * 5 * 4);
    run(&dev, |s| {
        ops::upsample_nearest(s, F32s::all(&xb), F32s::all(&out), 2, (3, 2), (5, 4))
    });
    let got = dev.read_f32(&out, 0, 40).unwrap();
    let mut want = Vec::new();
    for p in 0..2 {
        for y in [0, 0, 1, 1, 2] {
            for xx in [0, 0, 1, 1] {
                want.push(x[(p * 3 + y) * 2 + xx]);
            }
        }
    }
    assert_eq!(got, want);
}

/// Every combination the samplers use (guided or not; the previous x0 read, kept, both or
/// neither; noise or none), at lengths around the workgroup size: the new latents, the kept
/// x0 and the next input match the reference to f32 rounding (the GPU may fuse a multiply-add).
#[test]
fn sampler_step_matches_the_reference() {
    use halo_kernels::ops::SamplerUpdate;
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(77);
    let mut case = 0;
    for &n in &[1usize, 255, 256, 1000] {
        for guided in [false, true] {
            for (prev, keep) in [(false, false), (false, true), (true, true), (true, false)] {
                for noisy in [false, true] {
                    case += 1;
                    let up = SamplerUpdate {
                        guidance: guided.then_some(4.5),
                        sigma: 2.5,
                        inv_alpha: 0.75,
                        x: 0.9,
                        x0: -0.4,
                        prev: prev.then_some(0.3),
                        noise: noisy.then_some(1.7),
                        keep_x0: keep,
                        next_scale: 0.25,
                    };
                    let copies = if guided { 2 } else { 1 };
                    let eps = rng.f32s(n * copies, 1.0);
                    let x = rng.f32s(n, 3.0);
                    let p = rng.f32s(n, 1.0);
                    let z = rng.f32s(n, 1.0);
                    let (eb, xb, pb, zb) = (
                        upload(&dev, &eps),
                        upload(&dev, &x),
                        upload(&dev, &p),
                        upload(&dev, &z),
                    );
                    let nb = zeros(&dev, n * copies);
                    run(&dev, |s| {
                        ops::sampler_step(
                            s,
                            &up,
                            F32s::all(&eb),
                            F32s::all(&xb),
                            (prev || keep).then(|| F32s::all(&pb)),
                            noisy.then(|| F32s::all(&zb)),
                            F32s::all(&nb),
                        )
                    });
                    let (mut wx, mut wp) = (x.clone(), p.clone());
                    let want_next = r::sampler_step(&up, &eps, &mut wx, &mut wp, &z, copies);
                    let what = format!("case {case}: n {n} {up:?}");
                    let close = |name: &str, got: &[f32], want: &[f32]| {
                        for (i, (g, w)) in got.iter().zip(want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{what}: {name}[{i}] {g} vs {w}"
                            );
                        }
                    };
                    close("x", &dev.read_f32(&xb, 0, n as u64).unwrap(), &wx);
                    close("prev", &dev.read_f32(&pb, 0, n as u64).unwrap(), &wp);
                    let got_next = dev.read_f32(&nb, 0, (n * copies) as u64).unwrap();
                    close("next", &got_next, &want_next);
                }
            }
        }
    }
}

/// Rotary embedding from a table: Flux-like heads (24 of 128 in a fused qkv row, 3 of 8 alone),
/// odd token counts, against the reference; bad shapes refused.
#[test]
fn rope_table_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(41);
    // (tokens, heads, head_dim, row_stride)
    for &(t, h, d, stride) in &[(5, 3, 8, 24), (37, 24, 128, 3 * 24 * 128), (1, 1, 2, 2)] {
        let len = (t - 1) * stride + h * d;
        let x = rng.f32s(len, 1.0);
        let angles = rng.f32s(t * d / 2, 3.0);
        let table: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
        let (xb, tb) = (upload(&dev, &x), upload(&dev, &table));
        run(&dev, |s| {
            ops::rope_table(
                s,
                F32s::all(&xb).sub(0, len as u64),
                F32s::all(&tb),
                t as u64,
                h as u64,
                d as u64,
                stride as u64,
            )
        });
        let got = dev.read_f32(&xb, 0, len as u64).unwrap();
        let mut want = x.clone();
        r::rope_table(&mut want, &table, t, h, d, stride);
        let diff = max_rel_diff(&got, &want);
        assert!(diff < 1e-6, "{:?}: {diff:e}", (t, h, d, stride));
        // Values between the heads of a strided row are left alone.
        if stride > h * d {
            assert_eq!(got[h * d..stride], x[h * d..stride]);
        }
    }
    let (xb, tb) = (zeros(&dev, 16), zeros(&dev, 8));
    let mut s = dev.stream().unwrap();
    for (t, h, d, stride, want) in [
        (2, 1, 3, 4, "not even"),
        (2, 2, 4, 4, "hold less"),
        (3, 1, 4, 4, "the table has 8"),
    ] {
        let e = ops::rope_table(&mut s, F32s::all(&xb), F32s::all(&tb), t, h, d, stride)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// Modulation (x · (1 + scale) + shift) and gating (x + gate · y) with vectors read from
/// column ranges of one modulation buffer, per group of rows (two images), in place too.
#[test]
fn modulate_and_gate_match_the_reference() {
    use halo_kernels::ops::Modulation;
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(42);
    let (row, rows, groups) = (48usize, 7usize, 2usize);
    let stride = 6 * row;
    let n = row * rows * groups;
    let x = rng.f32s(n, 1.0);
    let y = rng.f32s(n, 1.0);
    let m = rng.f32s(groups * stride, 0.5);
    let (xb, yb, mb, out) = (
        upload(&dev, &x),
        upload(&dev, &y),
        upload(&dev, &m),
        zeros(&dev, n),
    );
    let part = |k: usize| F32s::all(&mb).sub((k * row) as u64, (groups * stride - k * row) as u64);
    run(&dev, |s| {
        ops::modulate(
            s,
            F32s::all(&xb),
            Modulation::ScaleShift {
                scale: part(1),
                shift: part(0),
            },
            F32s::all(&out),
            row as u64,
            rows as u64,
            stride as u64,
        )
    });
    let got = dev.read_f32(&out, 0, n as u64).unwrap();
    let want = r::modulate(&x, &m[row..], &m, row, rows, stride);
    assert!(max_rel_diff(&got, &want) < 1e-6);
    // Gate in place: x += gate · y.
    run(&dev, |s| {
        ops::modulate(
            s,
            F32s::all(&xb),
            Modulation::Gate {
                gate: part(2),
                y: F32s::all(&yb),
            },
            F32s::all(&xb),
            row as u64,
            rows as u64,
            stride as u64,
        )
    });
    let got = dev.read_f32(&xb, 0, n as u64).unwrap();
    let want = r::gate(&x, &m[2 * row..], &y, row, rows, stride);
    assert!(max_rel_diff(&got, &want) < 1e-6);
    let mut s = dev.stream().unwrap();
    let e = ops::modulate(
        &mut s,
        F32s::all(&xb).sub(0, n as u64 - 1),
        Modulation::Gate {
            gate: part(2),
            y: F32s::all(&yb),
        },
        F32s::all(&xb),
        row as u64,
        rows as u64,
        stride as u64,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not whole groups"), "{e}");
    let e = ops::modulate(
        &mut s,
        F32s::all(&xb),
        Modulation::ScaleShift {
            scale: F32s::all(&mb).sub(0, 10),
            shift: part(0),
        },
        F32s::all(&out),
        row as u64,
        rows as u64,
        stride as u64,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has 10 values"), "{e}");
}

/// A column concatenation from two parts, and the shapes it refuses.
#[test]
fn copy_cols_joins_columns() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(43);
    let (rows, a, b) = (9usize, 5usize, 12usize);
    let xa = rng.f32s(rows * a, 1.0);
    let xb = rng.f32s(rows * b, 1.0);
    let (ba, bb, out) = (
        upload(&dev, &xa),
        upload(&dev, &xb),
        zeros(&dev, rows * (a + b)),
    );
    let w = (a + b) as u64;
    run(&dev, |s| {
        ops::copy_cols(
            s,
            F32s::all(&ba),
            F32s::all(&out),
            rows as u64,
            a as u64,
            a as u64,
            w,
        )?;
        ops::copy_cols(
            s,
            F32s::all(&bb),
            F32s::all(&out).sub(a as u64, (rows * (a + b) - a) as u64),
            rows as u64,
            b as u64,
            b as u64,
            w,
        )
    });
    let got = dev.read_f32(&out, 0, (rows * (a + b)) as u64).unwrap();
    for r in 0..rows {
        assert_eq!(got[r * (a + b)..r * (a + b) + a], xa[r * a..(r + 1) * a]);
        assert_eq!(
            got[r * (a + b) + a..(r + 1) * (a + b)],
            xb[r * b..(r + 1) * b]
        );
    }
    let mut s = dev.stream().unwrap();
    let e = ops::copy_cols(
        &mut s,
        F32s::all(&ba),
        F32s::all(&out),
        rows as u64,
        6,
        5,
        w,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot hold 6 columns"), "{e}");
    let e = ops::copy_cols(&mut s, F32s::all(&ba), F32s::all(&out), 20, 5, 5, w)
        .unwrap_err()
        .to_string();
    assert!(e.contains("20 rows need"), "{e}");
}
