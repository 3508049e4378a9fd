//! The nn ops (norms, activations, softmax, rope, attention, KV-cache stores, top-k, the MoE
//! routing and combine) against their references in `reference::nn`, over sweeps of shapes.
//! Skips (with a message) when no Vulkan device exists, unless HALO_REQUIRE_VULKAN=1.

mod common;

use common::device;

use halo_kernels::ops::{self, AttentionParams, F32s, KvCache, RopeParams, U32s, Yarn};
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
        let outs: Vec<Buffer> = (0..7).map(|_| zeros(&dev, n)).collect();
        let mut s = dev.stream().unwrap();
        let (x_, u_) = (F32s::all(&gx), F32s::all(&gu));
        ops::silu(&mut s, x_, F32s::all(&outs[0])).unwrap();
        ops::gelu_tanh(&mut s, x_, F32s::all(&outs[1])).unwrap();
        ops::swiglu(&mut s, x_, u_, F32s::all(&outs[2])).unwrap();
        ops::geglu(&mut s, x_, u_, F32s::all(&outs[3])).unwrap();
        ops::gelu(&mut s, x_, F32s::all(&outs[4])).unwrap();
        ops::quick_gelu(&mut s, x_, F32s::all(&outs[5])).unwrap();
        ops::geglu_erf(&mut s, x_, u_, F32s::all(&outs[6])).unwrap();
        s.finish().unwrap();
        check("gelu", &read(&dev, &outs[4], n), &r::gelu(&x), 1e-5);
        check(
            "quick_gelu",
            &read(&dev, &outs[5], n),
            &r::quick_gelu(&x),
            1e-5,
        );
        check(
            "geglu_erf",
            &read(&dev, &outs[6], n),
            &r::geglu_erf(&x, &up),
            1e-5,
        );
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
    // (tokens, heads, head_dim, rotary_dims, base, neox, largest position, freq_scale, factors,
    // yarn)
    let cases = [
        (5, 4, 64, 64, 10_000.0, false, 200, 1.0, false, None),
        (5, 4, 64, 64, 10_000.0, true, 200, 1.0, false, None),
        (3, 3, 80, 32, 1e6, false, 300, 1.0, false, None),
        (3, 3, 80, 32, 1e6, true, 300, 1.0, false, None),
        (2, 2, 7, 4, 10_000.0, true, 50, 1.0, false, None),
        (4, 8, 128, 128, 1e6, true, 4096, 1.0, false, None),
        (4, 2, 256, 64, 10_000.0, false, 100_000, 1.0, false, None),
        // Linear scaling (gemma3's global layers: 1/8) and per-pair factors (Llama 3.1).
        (4, 2, 64, 64, 1e6, true, 5000, 0.125, false, None),
        (4, 4, 64, 64, 500_000.0, false, 5000, 1.0, true, None),
        (3, 2, 32, 16, 10_000.0, true, 700, 0.5, true, None),
        // YaRN: a 4x extension of a 256-token and of Qwen3's 32768-token context.
        (
            4,
            4,
            64,
            64,
            1e6,
            true,
            5000,
            0.25,
            false,
            Some(Yarn::new(64, 1e6, 4.0, 256, 32.0, 1.0, 1.0)),
        ),
        (
            3,
            2,
            128,
            128,
            1e6,
            true,
            40_000,
            0.25,
            false,
            Some(Yarn::new(128, 1e6, 4.0, 32768, 32.0, 1.0, 1.0)),
        ),
    ];
    for (tokens, heads, dim, rot, base, neox, max_pos, freq_scale, with_factors, yarn) in cases {
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
        // Factors between 1 and 8, as Llama 3.1's are.
        let factors: Vec<f32> = (0..rot / 2)
            .map(|_| 1.0 + 7.0 * rng.next_f32().abs().min(1.0))
            .collect();
        let gx = dev.upload_f32(&x, OWNER).unwrap();
        let gp = upload_u32(&dev, &pos);
        let gf = dev.upload_f32(&factors, OWNER).unwrap();
        let out = zeros(&dev, x.len());
        let mut s = dev.stream().unwrap();
        let params = RopeParams {
            n_heads: heads as u64,
            head_dim: dim as u64,
            rotary_dims: rot as u64,
            freq_base: base,
            freq_scale,
            freq_factors: with_factors.then(|| F32s::all(&gf)),
            neox,
            yarn,
        };
        let positions = U32s::all(&gp).sub(0, tokens as u64);
        ops::rope(&mut s, F32s::all(&gx), positions, F32s::all(&out), params).unwrap();
        // And in place.
        ops::rope(&mut s, F32s::all(&gx), positions, F32s::all(&gx), params).unwrap();
        s.finish().unwrap();
        let want = r::rope(
            &x,
            &pos,
            heads,
            dim,
            rot,
            base,
            freq_scale,
            with_factors.then_some(&factors[..]),
            neox,
            yarn,
        );
        // theta = pos · freq is an f32 on the GPU: its rounding grows with the position.
        let tol = 2e-6 + 2.5e-7 * max_pos as f32;
        let what = format!(
            "rope {tokens}x{heads}x{dim} rot {rot} base {base} neox {neox} scale {freq_scale} \
             factors {with_factors} yarn {yarn:?}"
        );
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
        // Contexts long enough to take several passes where the driver caps loop iterations
        // (lavapipe): Qwen3's 128-wide heads decoding at 8000 and prefilling at 4000, Gemma's
        // 256, one with a window, and 64-wide heads at 8000.
        (8, 2, 128, 1, 8000, true, None, None),
        (8, 2, 128, 16, 4000, false, None, None),
        (4, 4, 256, 1, 4000, false, None, Some(50.0)),
        (8, 2, 128, 5, 6000, true, Some(3000), None),
        (8, 2, 64, 1, 8000, true, None, None),
    ];
    let capped = dev.stream().unwrap().limits().max_loop_iterations.is_some();
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
        let passes = ops::attention_passes(&s, &params).unwrap();
        if capped && first >= 4000 && dim >= 128 {
            assert!(passes > 1, "{params:?} in one pass on a capped device");
        }
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
        let state = zeros(&dev, ops::attention_state_len(&params) as usize);
        ops::attention(
            &mut s,
            F32s::all(&gq),
            kc,
            vc,
            F32s::all(&out),
            F32s::all(&state),
            params,
        )
        .unwrap();
        s.finish().unwrap();
        let want = r::attention(&q, &k, &v, cap, &params);
        check(
            &format!("attention {params:?} in {passes} passes"),
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

/// `n_tokens` rows of `k` distinct expert ids below `n_experts`, as a router writes them.
fn router_ids(rng: &mut Rng, n_tokens: usize, k: usize, n_experts: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(n_tokens * k);
    for _ in 0..n_tokens {
        let mut pool: Vec<u32> = (0..n_experts as u32).collect();
        for _ in 0..k {
            let i = (rng.next_u64() % pool.len() as u64) as usize;
            ids.push(pool.swap_remove(i));
        }
    }
    ids
}

#[test]
fn moe_route_lists_each_experts_pairs_in_order() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(31);
    // (tokens, k, experts): one token; a few; the largest batch the model code routes
    // (256 · 8 = 2048 ids) over 64 and 256 experts; more ids than that; every token on one
    // expert; no ids at all.
    let mut cases: Vec<(usize, usize, usize, Vec<u32>)> = [
        (1usize, 2usize, 8usize),
        (7, 2, 8),
        (256, 8, 64),
        (256, 8, 256),
        (300, 8, 128),
        (64, 1, 1),
        (4, 0, 8),
    ]
    .into_iter()
    .map(|(n, k, e)| (n, k, e, router_ids(&mut rng, n, k, e)))
    .collect();
    // Ids past the last expert belong to no list.
    let mut ids = router_ids(&mut rng, 5, 4, 16);
    ids[2] = 16;
    ids[9] = u32::MAX;
    ids[19] = 100;
    cases.push((5, 4, 16, ids));
    // An expert repeated within a token (no router does this): its list stops at n_tokens.
    cases.push((4, 3, 2, vec![0; 12]));
    for (n_tokens, k, experts, ids) in cases {
        let what = format!("moe_route n_tokens={n_tokens} k={k} experts={experts}");
        let gids = upload_u32(&dev, &ids);
        // Filled with a marker, so counts that were not written show up.
        let gcounts = upload_u32(&dev, &vec![0xdead_beef; experts]);
        let gpairs = upload_u32(&dev, &vec![0xdead_beef; experts * n_tokens]);
        let mut s = dev.stream().unwrap();
        ops::moe_route(
            &mut s,
            U32s::all(&gids).sub(0, ids.len() as u64),
            experts as u64,
            U32s::all(&gcounts).sub(0, experts as u64),
            U32s::all(&gpairs).sub(0, (experts * n_tokens) as u64),
            n_tokens as u64,
        )
        .unwrap();
        s.finish().unwrap();
        let (counts, pairs) = r::moe_route(&ids, experts, n_tokens);
        assert_eq!(read_u32(&dev, &gcounts, experts), counts, "{what}: counts");
        let got = read_u32(&dev, &gpairs, experts * n_tokens);
        for (e, &c) in counts.iter().enumerate() {
            let list = e * n_tokens..e * n_tokens + c as usize;
            assert_eq!(got[list.clone()], pairs[list], "{what}: expert {e}'s list");
        }
        // Without repeats within a token, every pair with a valid id is in exactly one list.
        let repeats = k > 0
            && ids
                .chunks(k)
                .any(|c| (1..c.len()).any(|i| c[..i].contains(&c[i])));
        if !repeats {
            let routed: u32 = counts.iter().sum();
            let valid = ids.iter().filter(|&&e| (e as usize) < experts).count() as u32;
            assert_eq!(routed, valid, "{what}: every valid pair is listed");
        }
    }
}

#[test]
fn moe_combine_matches_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(30);
    // (tokens, k, n): fixed edge cases (one expert, one value, more than one workgroup, a
    // batch), then random sizes.
    let mut shapes = vec![
        (1usize, 1usize, 1usize),
        (1, 1, 300),
        (1, 8, 1),
        (1, 2, 70_000),
        (70, 2, 1000),
        (256, 8, 64),
    ];
    for _ in 0..6 {
        let t = 1 + (rng.next_u64() % 40) as usize;
        let k = 1 + (rng.next_u64() % 8) as usize;
        let n = 1 + (rng.next_u64() % 2000) as usize;
        shapes.push((t, k, n));
    }
    for (t, k, n) in shapes {
        let rows = rng.f32s(t * k * n, 3.0);
        // Router weights: positive, as softmax probabilities are.
        let w: Vec<f32> = rng.f32s(t * k, 0.5).iter().map(|v| v + 0.5).collect();
        let gr = dev.upload_f32(&rows, OWNER).unwrap();
        let gw = dev.upload_f32(&w, OWNER).unwrap();
        let out = zeros(&dev, t * n);
        let mut s = dev.stream().unwrap();
        ops::moe_combine(
            &mut s,
            F32s::all(&gr),
            F32s::all(&gw),
            F32s::all(&out),
            n as u64,
            k as u64,
        )
        .unwrap();
        s.finish().unwrap();
        check(
            &format!("moe_combine tokens={t} k={k} n={n}"),
            &read(&dev, &out, t * n),
            &r::moe_combine(&rows, &w, k),
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
    let rope = |n_heads, rotary_dims| RopeParams {
        rotary_dims,
        ..RopeParams::plain(n_heads, 16, 1e4, false)
    };
    is_bad(ops::rope(&mut s, fa, pos, fa, rope(2, 5)), "rotary_dims");
    is_bad(ops::rope(&mut s, fa, pos, fa, rope(2, 32)), "rotary_dims");
    is_bad(ops::rope(&mut s, fa, pos, fa, rope(3, 16)), "heads");
    is_bad(
        ops::rope(&mut s, fa, U32s::all(&ids), fa, rope(2, 16)),
        "positions",
    );
    is_bad(
        ops::rope(
            &mut s,
            fa,
            pos,
            fa,
            RopeParams {
                freq_scale: 0.0,
                ..rope(2, 16)
            },
        ),
        "freq_scale",
    );
    is_bad(
        ops::rope(
            &mut s,
            fa,
            pos,
            fa,
            RopeParams {
                freq_factors: Some(fb.sub(0, 3)),
                ..rope(2, 16)
            },
        ),
        "freq_factors",
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
    let state = fb.sub(0, 8);
    ops::attention(&mut s, q, cache, cache, fa.sub(32, 32), state, good).unwrap();
    is_bad(
        ops::attention(&mut s, q, cache, cache, fa.sub(32, 32), fb.sub(0, 7), good),
        "state has",
    );
    let attn = |p: AttentionParams, s: &mut halo_kernels::Stream| {
        ops::attention(s, q, cache, cache, fa.sub(32, 32), state, p)
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
        ops::attention(&mut s, q, odd, cache, fa.sub(32, 32), state, good),
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
    // moe_combine: rows, weights and out that do not agree on n_tokens, and k = 0.
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 8), fb.sub(0, 0), 0, 4),
        "rows",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 4), fb.sub(0, 8), 8, 4),
        "rows",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 8), fb.sub(0, 10), 8, 4),
        "out",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 7), fb.sub(0, 8), 4, 4),
        "weights",
    );
    is_bad(
        ops::moe_combine(&mut s, fa, fb.sub(0, 8), fb.sub(0, 8), 4, 0),
        "k = 0",
    );
    // moe_route: ids not a whole number per token, counts not one per expert, pairs not
    // n_tokens per expert.
    let ids5 = U32s::all(&ids).sub(0, 5);
    let idv = U32s::all(&ids);
    is_bad(
        ops::moe_route(&mut s, ids5, 4, idv.sub(0, 4), idv.sub(0, 8), 2),
        "ids",
    );
    is_bad(
        ops::moe_route(&mut s, ids5, 4, idv.sub(0, 4), idv.sub(0, 0), 0),
        "ids",
    );
    is_bad(
        ops::moe_route(&mut s, idv.sub(0, 4), 4, idv.sub(0, 3), idv.sub(0, 8), 2),
        "counts",
    );
    is_bad(
        ops::moe_route(&mut s, idv.sub(0, 4), 4, idv.sub(0, 4), idv.sub(0, 7), 2),
        "pairs",
    );
    // Lists past 32-bit offsets (only the lengths are checked before anything is recorded).
    let counts = U32s {
        len: 1 << 20,
        ..idv
    };
    let lists = U32s {
        len: 1 << 32,
        ..idv
    };
    is_bad(
        ops::moe_route(&mut s, idv.sub(0, 0), 1 << 20, counts, lists, 1 << 12),
        "32 bits",
    );
    // Valid calls still work afterwards.
    ops::moe_combine(&mut s, fa.sub(0, 16), fa.sub(16, 4), fb.sub(0, 8), 4, 2).unwrap();
    ops::moe_route(&mut s, idv.sub(0, 4), 4, idv.sub(8, 4), idv.sub(16, 8), 2).unwrap();
    s.finish().unwrap();
}
