//! The nn ops (norms, activations, softmax, rope, attention, KV-cache stores, top-k, the MoE
//! combine) against
//! their references in `reference::nn`, over sweeps of shapes. Skips (with a message) when no
//! Vulkan device exists, unless HALO_REQUIRE_VULKAN=1.

mod common;

use common::device;

use halo_kernels::ops::{self, AttentionParams, F32s, KvCache, U32s};
use halo_kernels::reference::nn as r;
use halo_kernels::reference::{max_rel_diff, Rng};
use halo_kernels::{Buffer, Device, MemoryKind, OwnerId, VulkanError};

const OWNER: OwnerId = OwnerId(11);

fn zeros(dev: &Device, n: usize) -> Buffer {
    dev.alloc(MemoryKind::Device, (n.max(1) * 4) as u64, OWNER)
        .unwrap()
}

fn upload_u32(dev: &Device, v: &[u32]) -> Buffer {
    let mut b = zeros(dev, v.len());
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    dev.write(&mut b, 0, &bytes).unwrap();
    b
}

fn read_u32(dev: &Device, b: &Buffer, n: usize) -> Vec<u32> {
    dev.read(b, 0, n as u64 * 4)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read(dev: &Device, b: &Buffer, n: usize) -> Vec<f32> {
    dev.read_f32(b, 0, n as u64).unwrap()
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_rel_diff(got, want);
    eprintln!("{what}: max relative difference {d:e}");
    assert!(d <= tol, "{what}: max relative difference {d:e} > {tol:e}");
}

/// (rows, row_len): single values, odd lengths, lengths around and beyond the workgroup size,
/// a long row, many rows.
const ROW_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (5, 255),
    (4, 257),
    (2, 1000),
    (2, 8193),
    (700, 64),
    (3, 128),
];

#[test]
fn rms_norm_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(21);
    for (i, &(rows, len)) in ROW_SHAPES.iter().enumerate() {
        let x = rng.f32s(rows * len, 3.0);
        let w = rng.f32s(len, 1.0);
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let gw = dev.upload_f32(&w, OWNER).unwrap();
        let out = zeros(&dev, x.len());
        let offset = if i % 2 == 0 { 0.0 } else { 1.0 };
        let mut s = dev.stream().unwrap();
        let weight = (i % 3 != 2).then(|| F32s::all(&gw));
        ops::rms_norm(
            &mut s,
            F32s::all(&gx),
            weight,
            F32s::all(&out),
            len as u64,
            1e-6,
            offset,
        )
        .unwrap();
        s.finish().unwrap();
        let want = r::rms_norm(&x, (i % 3 != 2).then_some(&w[..]), len, 1e-6, offset);
        check(
            &format!("rms_norm {rows}x{len}"),
            &read(&dev, &out, x.len()),
            &want,
            1e-5,
        );
    }
}

#[test]
fn rms_norm_per_head_in_place_over_many_rows() {
    let Some(dev) = device() else { return };
    // 70 000 rows of 4: more rows than one grid dimension holds.
    let (rows, len) = (70_000, 4);
    let mut rng = Rng::new(22);
    let x = rng.f32s(rows * len, 2.0);
    let w = rng.f32s(len, 1.0);
    let gx = dev.upload_f32(&x, OWNER).unwrap();
    let gw = dev.upload_f32(&w, OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    let all = F32s::all(&gx);
    ops::rms_norm(
        &mut s,
        all,
        Some(F32s::all(&gw)),
        all,
        len as u64,
        1e-5,
        1.0,
    )
    .unwrap();
    s.finish().unwrap();
    let want = r::rms_norm(&x, Some(&w), len, 1e-5, 1.0);
    check("rms_norm in place", &read(&dev, &gx, x.len()), &want, 1e-5);
}

#[test]
fn layer_norm_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(23);
    for (i, &(rows, len)) in ROW_SHAPES.iter().enumerate() {
        // Offset from zero so the mean matters.
        let x: Vec<f32> = rng.f32s(rows * len, 2.0).iter().map(|v| v + 5.0).collect();
        let w = rng.f32s(len, 1.0);
        let b = rng.f32s(len, 1.0);
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let gw = dev.upload_f32(&w, OWNER).unwrap();
        let gb = dev.upload_f32(&b, OWNER).unwrap();
        let out = zeros(&dev, x.len());
        let use_w = i % 3 != 1;
        let use_b = i % 2 == 0;
        let mut s = dev.stream().unwrap();
        ops::layer_norm(
            &mut s,
            F32s::all(&gx),
            use_w.then(|| F32s::all(&gw)),
            use_b.then(|| F32s::all(&gb)),
            F32s::all(&out),
            len as u64,
            1e-5,
        )
        .unwrap();
        s.finish().unwrap();
        let want = r::layer_norm(
            &x,
            use_w.then_some(&w[..]),
            use_b.then_some(&b[..]),
            len,
            1e-5,
        );
        check(
            &format!("layer_norm {rows}x{len}"),
            &read(&dev, &out, x.len()),
            &want,
            1e-5,
        );
    }
}

#[test]
fn activations_match_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(24);
    for n in [1usize, 257, 100_003] {
        // Wide enough to reach the saturated ends of tanh and the sigmoid.
        let x = rng.f32s(n, 12.0);
        let up = rng.f32s(n, 2.0);
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let gu = dev.upload_f32(&up, OWNER).unwrap();
        let outs: Vec<Buffer> = (0..4).map(|_| zeros(&dev, n)).collect();
        let mut s = dev.stream().unwrap();
        let (x_, u_) = (F32s::all(&gx), F32s::all(&gu));
        ops::silu(&mut s, x_, F32s::all(&outs[0])).unwrap();
        ops::gelu_tanh(&mut s, x_, F32s::all(&outs[1])).unwrap();
        ops::swiglu(&mut s, x_, u_, F32s::all(&outs[2])).unwrap();
        ops::geglu(&mut s, x_, u_, F32s::all(&outs[3])).unwrap();
        s.finish().unwrap();
        check("silu", &read(&dev, &outs[0], n), &r::silu(&x), 1e-5);
        check(
            "gelu_tanh",
            &read(&dev, &outs[1], n),
            &r::gelu_tanh(&x),
            1e-5,
        );
        check(
            "swiglu",
            &read(&dev, &outs[2], n),
            &r::swiglu(&x, &up),
            1e-5,
        );
        check("geglu", &read(&dev, &outs[3], n), &r::geglu(&x, &up), 1e-5);
    }
}

#[test]
fn softmax_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(25);
    for (i, &(rows, len)) in ROW_SHAPES.iter().enumerate() {
        let mut x = rng.f32s(rows * len, 10.0);
        // Masked entries in the first row of longer shapes.
        if len > 8 {
            for v in x.iter_mut().take(len).step_by(3) {
                *v = f32::NEG_INFINITY;
            }
        }
        let scale = [1.0, 0.125, 3.0][i % 3];
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let out = zeros(&dev, x.len());
        let mut s = dev.stream().unwrap();
        ops::softmax(&mut s, F32s::all(&gx), F32s::all(&out), len as u64, scale).unwrap();
        s.finish().unwrap();
        let want = r::softmax(&x, len, scale);
        check(
            &format!("softmax {rows}x{len} scale {scale}"),
            &read(&dev, &out, x.len()),
            &want,
            1e-5,
        );
    }
}

#[test]
fn rope_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(26);
    // (tokens, heads, head_dim, rotary_dims, base, neox, largest position)
    let cases = [
        (5, 4, 64, 64, 10_000.0, false, 200),
        (5, 4, 64, 64, 10_000.0, true, 200),
        (3, 3, 80, 32, 1e6, false, 300),
        (3, 3, 80, 32, 1e6, true, 300),
        (2, 2, 7, 4, 10_000.0, true, 50),
        (4, 8, 128, 128, 1e6, true, 4096),
        (4, 2, 256, 64, 10_000.0, false, 100_000),
    ];
    for (tokens, heads, dim, rot, base, neox, max_pos) in cases {
        let x = rng.f32s(tokens * heads * dim, 1.0);
        let pos: Vec<u32> = (0..tokens)
            .map(|t| {
                if t == 0 {
                    max_pos
                } else {
                    (rng.next_u64() % max_pos as u64) as u32
                }
            })
            .collect();
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let gp = upload_u32(&dev, &pos);
        let out = zeros(&dev, x.len());
        let mut s = dev.stream().unwrap();
        let args = (heads as u64, dim as u64, rot as u64);
        ops::rope(
            &mut s,
            F32s::all(&gx),
            U32s::all(&gp).sub(0, tokens as u64),
            F32s::all(&out),
            args.0,
            args.1,
            args.2,
            base,
            neox,
        )
        .unwrap();
        // And in place.
        ops::rope(
            &mut s,
            F32s::all(&gx),
            U32s::all(&gp).sub(0, tokens as u64),
            F32s::all(&gx),
            args.0,
            args.1,
            args.2,
            base,
            neox,
        )
        .unwrap();
        s.finish().unwrap();
        let want = r::rope(&x, &pos, heads, dim, rot, base, neox);
        // theta = pos · freq is an f32 on the GPU: its rounding grows with the position.
        let tol = 2e-6 + 2.5e-7 * max_pos as f32;
        let what = format!("rope {tokens}x{heads}x{dim} rot {rot} base {base} neox {neox}");
        check(&what, &read(&dev, &out, x.len()), &want, tol);
        check(&what, &read(&dev, &gx, x.len()), &want, tol);
    }
}

/// Fills an f32 or f16 cache of n_kv_heads × capacity × head_dim with random values for
/// positions 0..filled; returns the buffer and the values the GPU will read (f16-rounded).
fn random_cache(
    dev: &Device,
    rng: &mut Rng,
    n_kv: usize,
    cap: usize,
    dim: usize,
    f16: bool,
) -> (Buffer, Vec<f32>) {
    let vals: Vec<f32> = rng.f32s(n_kv * cap * dim, 1.0);
    if f16 {
        let rounded: Vec<f32> = vals.iter().map(|v| r::round_f16(*v)).collect();
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| r::f32_to_f16_bits(*v).to_le_bytes())
            .collect();
        let mut b = dev
            .alloc(MemoryKind::Device, bytes.len() as u64, OWNER)
            .unwrap();
        dev.write(&mut b, 0, &bytes).unwrap();
        (b, rounded)
    } else {
        (dev.upload_f32(&vals, OWNER).unwrap(), vals)
    }
}

#[test]
fn attention_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(27);
    // (heads, kv heads, head_dim, n_q, first_pos, f16 cache, window, softcap)
    let cases = [
        (8, 2, 64, 37, 0, false, None, None),
        (8, 2, 64, 1, 300, true, None, None),
        (8, 2, 128, 37, 0, true, None, None),
        (8, 2, 128, 1, 300, false, None, None),
        (8, 2, 80, 37, 0, false, None, None),
        (8, 2, 80, 1, 300, true, None, None),
        (8, 2, 64, 37, 20, false, Some(16), None),
        (8, 2, 128, 1, 300, true, Some(100), Some(30.0)),
        (4, 4, 256, 5, 40, false, None, Some(50.0)),
        (6, 1, 17, 9, 3, false, Some(5), None),
    ];
    for (nh, nkv, dim, n_q, first, f16, window, softcap) in cases {
        let cap = first + n_q + 3;
        let q = rng.f32s(n_q * nh * dim, 2.0);
        let (gk, k) = random_cache(&dev, &mut rng, nkv, cap, dim, f16);
        let (gv, v) = random_cache(&dev, &mut rng, nkv, cap, dim, f16);
        let gq = dev.upload_f32(&q, OWNER).unwrap();
        let out = zeros(&dev, q.len());
        let params = AttentionParams {
            n_heads: nh as u32,
            n_kv_heads: nkv as u32,
            head_dim: dim as u32,
            n_q_tokens: n_q as u32,
            first_pos: first as u32,
            capacity: cap as u32,
            scale: 1.0 / (dim as f32).sqrt(),
            sliding_window: window,
            softcap,
        };
        let mut s = dev.stream().unwrap();
        let kc = KvCache {
            buffer: &gk,
            offset: 0,
            f16,
        };
        let vc = KvCache {
            buffer: &gv,
            offset: 0,
            f16,
        };
        ops::attention(&mut s, F32s::all(&gq), kc, vc, F32s::all(&out), params).unwrap();
        s.finish().unwrap();
        let want = r::attention(&q, &k, &v, cap, &params);
        check(
            &format!("attention {params:?}"),
            &read(&dev, &out, q.len()),
            &want,
            1e-4,
        );
    }
}

#[test]
fn kv_store_writes_f32_and_f16_caches() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(28);
    let (n_kv, dim, cap) = (3usize, 80usize, 50usize);
    for f16 in [false, true] {
        for (first, n) in [(0usize, 37usize), (37, 1), (40, 10)] {
            let src = rng.f32s(n * n_kv * dim, 4.0);
            let gs = dev.upload_f32(&src, OWNER).unwrap();
            let bytes = n_kv * cap * dim * if f16 { 2 } else { 4 } + 8;
            let cache = dev.alloc(MemoryKind::Device, bytes as u64, OWNER).unwrap();
            let mut s = dev.stream().unwrap();
            s.zero(&cache, 0, bytes as u64).unwrap();
            let kc = KvCache {
                buffer: &cache,
                offset: 8,
                f16,
            };
            let args = (n_kv as u64, dim as u64, cap as u64);
            ops::kv_store(
                &mut s,
                F32s::all(&gs),
                kc,
                args.0,
                args.1,
                args.2,
                first as u64,
                n as u64,
            )
            .unwrap();
            s.finish().unwrap();
            let mut want = vec![0.0f32; n_kv * cap * dim];
            r::kv_store(&mut want, &src, n_kv, dim, cap, first, f16);
            let raw = dev.read(&cache, 8, (bytes - 8) as u64).unwrap();
            let got: Vec<f32> = if f16 {
                raw.chunks_exact(2)
                    .map(|c| r::f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                    .collect()
            } else {
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            };
            // Conversion to f16 rounds to nearest: exact agreement expected.
            assert_eq!(got, want, "kv_store f16={f16} first={first} n={n}");
        }
    }
}

#[test]
fn top_k_and_the_router_match_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(29);
    // (rows, row_len, k)
    for (rows, len, k) in [
        (5usize, 128usize, 8usize),
        (3, 10_000, 5),
        (2, 7, 7),
        (300, 64, 4),
    ] {
        let mut x = rng.f32s(rows * len, 4.0);
        // Ties: repeated values must come out in index order.
        for row in 0..rows {
            x[row * len + len / 2] = 5.0;
            x[row * len + len - 1] = 5.0;
            x[row * len + 1] = 5.0;
        }
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let n = rows * k;
        let bufs: Vec<Buffer> = (0..6).map(|_| zeros(&dev, n)).collect();
        let mut s = dev.stream().unwrap();
        let lx = F32s::all(&gx);
        let (rl, kk) = (len as u64, k as u64);
        ops::top_k(
            &mut s,
            lx,
            rl,
            kk,
            U32s::all(&bufs[0]).sub(0, n as u64),
            F32s::all(&bufs[1]).sub(0, n as u64),
        )
        .unwrap();
        ops::softmax_top_k(
            &mut s,
            lx,
            rl,
            kk,
            false,
            U32s::all(&bufs[2]).sub(0, n as u64),
            F32s::all(&bufs[3]).sub(0, n as u64),
        )
        .unwrap();
        ops::softmax_top_k(
            &mut s,
            lx,
            rl,
            kk,
            true,
            U32s::all(&bufs[4]).sub(0, n as u64),
            F32s::all(&bufs[5]).sub(0, n as u64),
        )
        .unwrap();
        s.finish().unwrap();
        let (ids, vals) = r::top_k(&x, len, k);
        assert_eq!(
            read_u32(&dev, &bufs[0], n),
            ids,
            "top_k ids {rows}x{len} k={k}"
        );
        assert_eq!(read(&dev, &bufs[1], n), vals, "top_k values");
        for (renorm, i) in [(false, 2), (true, 4)] {
            let (ids, vals) = r::softmax_top_k(&x, len, k, renorm);
            assert_eq!(
                read_u32(&dev, &bufs[i], n),
                ids,
                "router ids renorm={renorm}"
            );
            check(
                &format!("router probabilities {rows}x{len} renorm={renorm}"),
                &read(&dev, &bufs[i + 1], n),
                &vals,
                1e-5,
            );
        }
    }
}

#[test]
fn moe_combine_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(30);
    // Fixed edge cases (one expert, one value, more than one workgroup), then random sizes.
    let mut shapes = vec![(1usize, 1usize), (1, 300), (8, 1), (2, 70_000)];
    for _ in 0..6 {
        let k = 1 + (rng.next_u64() % 8) as usize;
        let n = 1 + (rng.next_u64() % 5000) as usize;
        shapes.push((k, n));
    }
    for (k, n) in shapes {
        let rows = rng.f32s(k * n, 3.0);
        // Router weights: positive, as softmax probabilities are.
        let w: Vec<f32> = rng.f32s(k, 0.5).iter().map(|v| v + 0.5).collect();
        let gr = dev.upload_f32(&rows, OWNER).unwrap();
        let gw = dev.upload_f32(&w, OWNER).unwrap();
        let out = zeros(&dev, n);
        let mut s = dev.stream().unwrap();
        ops::moe_combine(
            &mut s,
            F32s::all(&gr),
            F32s::all(&gw),
            F32s::all(&out),
            n as u64,
        )
        .unwrap();
        s.finish().unwrap();
        check(
            &format!("moe_combine k={k} n={n}"),
            &read(&dev, &out, n),
            &r::moe_combine(&rows, &w),
            1e-5,
        );
    }
}

fn is_bad(r: Result<(), VulkanError>, needle: &str) {
    match r {
        Err(e @ VulkanError::BadArgument { .. }) => {
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
        }
        other => panic!("expected a bad-argument error containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(dev) = device() else { return };
    let a = dev.upload_f32(&[1.0; 64], OWNER).unwrap();
    let b = dev.upload_f32(&[1.0; 10], OWNER).unwrap();
    let ids = upload_u32(&dev, &[0; 64]);
    let mut s = dev.stream().unwrap();
    let (fa, fb) = (F32s::all(&a), F32s::all(&b));
    is_bad(
        ops::rms_norm(&mut s, fa, None, fa, 10, 1e-6, 0.0),
        "whole number of rows",
    );
    is_bad(
        ops::rms_norm(&mut s, fa, Some(fb), fa, 16, 1e-6, 0.0),
        "weight",
    );
    is_bad(ops::rms_norm(&mut s, fa, None, fb, 16, 1e-6, 0.0), "out");
    is_bad(
        ops::layer_norm(&mut s, fa, None, Some(fb), fa, 16, 1e-6),
        "bias",
    );
    is_bad(ops::silu(&mut s, fa, fb), "out");
    is_bad(ops::swiglu(&mut s, fa, fb, fa), "up");
    is_bad(ops::softmax(&mut s, fa, fa, 0, 1.0), "rows");
    let pos = U32s::all(&ids).sub(0, 2);
    is_bad(
        ops::rope(&mut s, fa, pos, fa, 2, 16, 5, 1e4, false),
        "rotary_dims",
    );
    is_bad(
        ops::rope(&mut s, fa, pos, fa, 2, 16, 32, 1e4, false),
        "rotary_dims",
    );
    is_bad(
        ops::rope(&mut s, fa, pos, fa, 3, 16, 16, 1e4, false),
        "heads",
    );
    is_bad(
        ops::rope(&mut s, fa, U32s::all(&ids), fa, 2, 16, 16, 1e4, false),
        "positions",
    );
    let cache = KvCache {
        buffer: &a,
        offset: 0,
        f16: false,
    };
    let good = AttentionParams {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        n_q_tokens: 2,
        first_pos: 0,
        capacity: 8,
        scale: 1.0,
        sliding_window: None,
        softcap: None,
    };
    let q = fa.sub(0, 32);
    ops::attention(&mut s, q, cache, cache, fa.sub(32, 32), good).unwrap();
    let attn = |p: AttentionParams, s: &mut halo_kernels::Stream| {
        ops::attention(s, q, cache, cache, fa.sub(32, 32), p)
    };
    is_bad(
        attn(
            AttentionParams {
                n_kv_heads: 3,
                ..good
            },
            &mut s,
        ),
        "multiple",
    );
    is_bad(
        attn(
            AttentionParams {
                head_dim: 300,
                ..good
            },
            &mut s,
        ),
        "head_dim",
    );
    is_bad(
        attn(
            AttentionParams {
                first_pos: 7,
                ..good
            },
            &mut s,
        ),
        "capacity",
    );
    is_bad(
        attn(
            AttentionParams {
                sliding_window: Some(0),
                ..good
            },
            &mut s,
        ),
        "window",
    );
    is_bad(
        attn(
            AttentionParams {
                n_q_tokens: 3,
                ..good
            },
            &mut s,
        ),
        "q has",
    );
    is_bad(
        attn(
            AttentionParams {
                capacity: 64,
                ..good
            },
            &mut s,
        ),
        "outside",
    );
    let odd = KvCache {
        buffer: &a,
        offset: 2,
        f16: true,
    };
    is_bad(
        ops::attention(&mut s, q, odd, cache, fa.sub(32, 32), good),
        "multiple of 4",
    );
    is_bad(
        ops::kv_store(&mut s, fa.sub(0, 16), cache, 1, 8, 8, 7, 2),
        "capacity",
    );
    let half = KvCache {
        buffer: &a,
        offset: 0,
        f16: true,
    };
    is_bad(
        ops::kv_store(&mut s, fa.sub(0, 14), half, 1, 7, 8, 0, 2),
        "even",
    );
    let out_ids = U32s::all(&ids).sub(0, 8);
    is_bad(
        ops::top_k(&mut s, fa, 16, 17, out_ids, fa.sub(0, 8)),
        "k = 17",
    );
    is_bad(
        ops::top_k(&mut s, fa, 16, 2, out_ids, fa.sub(0, 7)),
        "out_vals",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 4), fb.sub(0, 8), 8),
        "rows",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 4), fa.sub(0, 15), 16),
        "out",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 0), fa.sub(0, 16), 16),
        "empty",
    );
    s.finish().unwrap();
}
