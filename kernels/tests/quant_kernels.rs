//! The quantized-weight kernels (matvec, matmul, get_rows, matvec_indexed, matmul_indexed) for
//! every weight type on a real Vulkan device (lavapipe in CI), against the CPU references in
//! `halo_kernels::quant` and `halo_kernels::reference` and the gguf-py fixtures. Skips (with a message) when no device exists, unless
//! HALO_REQUIRE_VULKAN=1.

mod common;

use std::path::PathBuf;

use common::device;

use halo_kernels::ops::{self, F32s, U32s, Weights};
use halo_kernels::quant::{self, WeightType};
use halo_kernels::reference::{self, Rng};
use halo_kernels::{Buffer, Device, MemoryKind, OwnerId, VulkanError};

const OWNER: OwnerId = OwnerId(11);

/// `bytes` in a new device buffer, preceded by `pad` zero bytes.
fn upload(dev: &Device, bytes: &[u8], pad: usize) -> Buffer {
    let mut data = vec![0u8; pad];
    data.extend_from_slice(bytes);
    let mut buf = dev
        .alloc(MemoryKind::Device, data.len().max(4) as u64, OWNER)
        .unwrap();
    dev.write(&mut buf, 0, &data).unwrap();
    buf
}

fn upload_u32(dev: &Device, v: &[u32]) -> Buffer {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    upload(dev, &bytes, 0)
}

fn out_buffer(dev: &Device, len: usize) -> Buffer {
    dev.alloc(MemoryKind::Device, (len.max(1) * 4) as u64, OWNER)
        .unwrap()
}

/// A weight matrix on the device together with its CPU copy.
struct Matrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
    buffer: Buffer,
    offset: u64,
}

impl Matrix {
    /// Random weights; `shifted` places them a few bytes into the buffer (the smallest offset
    /// the type's loads allow), so rows also start at unaligned addresses.
    fn new(
        dev: &Device,
        ty: WeightType,
        rows: usize,
        cols: usize,
        seed: u64,
        shifted: bool,
    ) -> Self {
        let bytes = quant::random_weights(ty, rows * cols, seed);
        let offset = match (shifted, ty) {
            (false, _) => 0,
            (true, WeightType::F32) => 4,
            (true, _) => 2,
        };
        let buffer = upload(dev, &bytes, offset);
        Matrix {
            ty,
            rows,
            cols,
            bytes,
            buffer,
            offset: offset as u64,
        }
    }

    fn weights(&self) -> Weights<'_> {
        Weights {
            buffer: &self.buffer,
            offset: self.offset,
            ty: self.ty,
            rows: self.rows as u64,
            cols: self.cols as u64,
        }
    }

    fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).unwrap()
    }

    /// Row `r`, dequantized on the CPU.
    fn row(&self, r: usize) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut out = vec![0.0; self.cols];
        quant::dequantize(self.ty, &self.bytes[r * rb..(r + 1) * rb], &mut out).unwrap();
        out
    }

    /// The reference W·x and, per row, Σ|w·x| (the scale of the rounding error any summation
    /// order can make).
    fn reference(&self, x: &[f32]) -> (Vec<f32>, Vec<f64>) {
        let y = quant::matvec(self.ty, &self.bytes, self.rows, self.cols, x).unwrap();
        let scale = (0..self.rows)
            .map(|r| {
                self.row(r)
                    .iter()
                    .zip(x)
                    .map(|(&w, &v)| (f64::from(w) * f64::from(v)).abs())
                    .sum()
            })
            .collect();
        (y, scale)
    }
}

/// The GPU sums in a different order from the reference (strided per thread, then a tree across
/// subgroups, in f32 rather than f64), so results agree only up to rounding: we allow
/// |Δ| ≤ 1e-4 · Σ|w·x| for the row, which is far above f32 summation error for these lengths and
/// far below any indexing or decoding mistake (those change the result by O(Σ|w·x|)).
fn assert_close(what: &str, got: &[f32], want: &[f32], scale: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let tol = 1e-4 * s + 1e-30;
        let diff = (f64::from(g) - f64::from(w)).abs();
        assert!(
            diff <= tol,
            "{what}: element {i}: gpu {g} vs reference {w} (|Δ| {diff:e} > {tol:e})"
        );
    }
}

/// Dequantized values: the GPU performs the same f32 operations as the reference and is told not
/// to fuse multiply-adds, so it should match exactly; we still allow a relative 1e-6 (a few
/// ulps) in case a driver contracts `q·d + m` into one fused rounding regardless.
fn assert_dequant_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let same = g.to_bits() == w.to_bits()
            || (g.is_nan() && w.is_nan())
            || (g - w).abs() <= 1e-6 * w.abs();
        assert!(same, "{what}: element {i}: gpu {g:e} vs reference {w:e}");
    }
}

fn shapes(ty: WeightType) -> Vec<(usize, usize)> {
    let b = ty.block_elems();
    let mut out = Vec::new();
    for rows in [1, 3, 64, 67, 300] {
        for cols in [b, 2 * b, 7 * b, 4096] {
            out.push((rows, cols));
        }
    }
    out.push((2, 16384));
    out
}

#[test]
fn matvec_matches_the_reference_for_every_type() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(5);
    for ty in WeightType::ALL {
        let mut cases = Vec::new();
        let mut s = dev.stream().unwrap();
        for (i, (rows, cols)) in shapes(ty).into_iter().enumerate() {
            let m = Matrix::new(&dev, ty, rows, cols, i as u64 + 100, i % 2 == 1);
            let x = rng.f32s(cols, 1.0);
            let gx = dev.upload_f32(&x, OWNER).unwrap();
            let gy = out_buffer(&dev, rows);
            ops::matvec(
                &mut s,
                m.weights(),
                F32s::all(&gx),
                F32s::all(&gy).sub(0, rows as u64),
            )
            .unwrap();
            cases.push((m, x, gx, gy));
        }
        s.finish().unwrap();
        for (m, x, _gx, gy) in &cases {
            let got = dev.read_f32(gy, 0, m.rows as u64).unwrap();
            let (want, scale) = m.reference(x);
            assert_close(
                &format!("matvec {ty} {}x{}", m.rows, m.cols),
                &got,
                &want,
                &scale,
            );
        }
    }
}

#[test]
fn matmul_matches_the_reference_for_every_type() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(6);
    for ty in WeightType::ALL {
        // Odd sizes on every side so partial tiles are covered; float types get a column count
        // that is not a multiple of 8 or of the kernel's column step.
        let cols = if ty.is_quantized() {
            7 * ty.block_elems()
        } else {
            37
        };
        let m = Matrix::new(&dev, ty, 67, cols, 7, true);
        let mut s = dev.stream().unwrap();
        let mut cases = Vec::new();
        for n in [1usize, 2, 3, 5, 8, 12, 33, 67] {
            let x = rng.f32s(n * cols, 1.0);
            let gx = dev.upload_f32(&x, OWNER).unwrap();
            let gy = out_buffer(&dev, n * m.rows);
            ops::matmul(
                &mut s,
                m.weights(),
                F32s::all(&gx),
                F32s::all(&gy).sub(0, (n * m.rows) as u64),
                n as u64,
            )
            .unwrap();
            cases.push((n, x, gx, gy));
        }
        s.finish().unwrap();
        for (n, x, _gx, gy) in &cases {
            let got = dev.read_f32(gy, 0, (n * m.rows) as u64).unwrap();
            for i in 0..*n {
                let (want, scale) = m.reference(&x[i * cols..(i + 1) * cols]);
                assert_close(
                    &format!("matmul {ty} n={n} input row {i}"),
                    &got[i * m.rows..(i + 1) * m.rows],
                    &want,
                    &scale,
                );
            }
        }
    }
}

#[test]
fn get_rows_matches_dequantize_and_zeroes_bad_ids() {
    let Some(dev) = device() else { return };
    for ty in WeightType::ALL {
        for cols in [ty.block_elems(), 3 * ty.block_elems(), 4096] {
            let m = Matrix::new(&dev, ty, 67, cols, 9, cols == 4096);
            let ids = [0u32, 66, 5, 5, 33, 67, u32::MAX, 1];
            let gids = upload_u32(&dev, &ids);
            let out = out_buffer(&dev, ids.len() * cols);
            let mut s = dev.stream().unwrap();
            ops::get_rows(
                &mut s,
                m.weights(),
                U32s::all(&gids),
                F32s::all(&out).sub(0, (ids.len() * cols) as u64),
            )
            .unwrap();
            s.finish().unwrap();
            let got = dev.read_f32(&out, 0, (ids.len() * cols) as u64).unwrap();
            for (i, &id) in ids.iter().enumerate() {
                let want = if (id as usize) < m.rows {
                    m.row(id as usize)
                } else {
                    vec![0.0; cols]
                };
                assert_dequant_eq(
                    &format!("get_rows {ty} cols={cols} id {id}"),
                    &got[i * cols..(i + 1) * cols],
                    &want,
                );
            }
        }
    }
}

fn fixture(name: &str, ext: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "fixtures", "quant"]
        .iter()
        .collect::<PathBuf>()
        .join(format!("{name}.{ext}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// GPU get_rows against gguf-py's dequantization (512 columns per row), tying the shaders to
/// the independent oracle and not only to our CPU reference.
#[test]
fn get_rows_matches_the_gguf_fixtures() {
    let Some(dev) = device() else { return };
    const COLS: usize = 512;
    for ty in WeightType::ALL {
        let raw = fixture(ty.name(), "bin");
        let want: Vec<f32> = fixture(ty.name(), "f32")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let rows = want.len() / COLS;
        let w = upload(&dev, &raw, 0);
        // Every row, in reverse order.
        let ids: Vec<u32> = (0..rows as u32).rev().collect();
        let gids = upload_u32(&dev, &ids);
        let out = out_buffer(&dev, want.len());
        let mut s = dev.stream().unwrap();
        let weights = Weights {
            buffer: &w,
            offset: 0,
            ty,
            rows: rows as u64,
            cols: COLS as u64,
        };
        ops::get_rows(&mut s, weights, U32s::all(&gids), F32s::all(&out)).unwrap();
        s.finish().unwrap();
        let got = dev.read_f32(&out, 0, want.len() as u64).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let r = id as usize;
            assert_dequant_eq(
                &format!("fixture {ty} row {r}"),
                &got[i * COLS..(i + 1) * COLS],
                &want[r * COLS..(r + 1) * COLS],
            );
        }
    }
}

#[test]
fn matvec_indexed_picks_each_slots_expert() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(8);
    let (experts, rows) = (8usize, 5usize);
    for ty in WeightType::ALL {
        let cols = if ty.is_quantized() {
            2 * ty.block_elems()
        } else {
            40
        };
        let m = Matrix::new(&dev, ty, experts * rows, cols, 21, true);
        let rb = m.row_bytes();
        // The last two ids are out of range: those slots must come back as zeros.
        let ids = [3u32, 0, 7, 3, 8, u32::MAX];
        let gids = upload_u32(&dev, &ids);
        for x_per_slot in [false, true] {
            let x_slots = if x_per_slot { ids.len() } else { 1 };
            let x = rng.f32s(x_slots * cols, 1.0);
            let gx = dev.upload_f32(&x, OWNER).unwrap();
            let gy = out_buffer(&dev, ids.len() * rows);
            let mut s = dev.stream().unwrap();
            ops::matvec_indexed(
                &mut s,
                m.weights(),
                rows as u64,
                U32s::all(&gids),
                F32s::all(&gx),
                x_per_slot,
                F32s::all(&gy).sub(0, (ids.len() * rows) as u64),
            )
            .unwrap();
            s.finish().unwrap();
            let got = dev.read_f32(&gy, 0, (ids.len() * rows) as u64).unwrap();
            for (k, &id) in ids.iter().enumerate() {
                let what = format!("indexed {ty} x_per_slot={x_per_slot} slot {k} expert {id}");
                let got = &got[k * rows..(k + 1) * rows];
                if id as usize >= experts {
                    assert!(got.iter().all(|&v| v == 0.0), "{what}: {got:?}");
                    continue;
                }
                let xs = if x_per_slot {
                    &x[k * cols..(k + 1) * cols]
                } else {
                    &x[..]
                };
                let e = id as usize;
                let expert = Matrix {
                    ty,
                    rows,
                    cols,
                    bytes: m.bytes[e * rows * rb..(e + 1) * rows * rb].to_vec(),
                    buffer: m.buffer.clone(),
                    offset: 0,
                };
                let (want, scale) = expert.reference(xs);
                assert_close(&what, got, &want, &scale);
            }
        }
    }
}

/// Router output for `n_tokens` tokens: each picks `k` distinct experts from `from` (in random
/// order, as a router ranks them), always including `forced` when given.
fn route_ids(
    rng: &mut Rng,
    n_tokens: usize,
    k: usize,
    from: &[u32],
    forced: Option<u32>,
) -> Vec<u32> {
    let mut ids = Vec::with_capacity(n_tokens * k);
    for _ in 0..n_tokens {
        let mut pool: Vec<u32> = from
            .iter()
            .copied()
            .filter(|e| Some(*e) != forced)
            .collect();
        let mut chosen: Vec<u32> = forced.into_iter().collect();
        while chosen.len() < k {
            let i = (rng.next_u64() % pool.len() as u64) as usize;
            chosen.push(pool.swap_remove(i));
        }
        // Shuffle, so the forced expert is not always the first slot.
        for i in (1..k).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            chosen.swap(i, j);
        }
        ids.extend(chosen);
    }
    ids
}

/// What the output rows of pairs routed to no expert must still hold afterwards.
const UNWRITTEN: f32 = -12345.0;

#[test]
fn matmul_indexed_matches_the_reference_for_every_type() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(9);
    let (experts, k, rows) = (8usize, 2usize, 67usize);
    let all: Vec<u32> = (0..experts as u32).collect();
    // (tokens, experts the router picks from, an expert every token picks). Token counts 1, 7,
    // 40, 70 and 100; few or all experts used, so that some lists are empty and others run over
    // several tiles with a partial last one (40 entries with 16-wide tiles, 100 with 64-wide).
    let cases: Vec<(usize, Vec<u32>, Option<u32>)> = vec![
        (1, all.clone(), None),
        (7, vec![1, 4, 6], None),
        (40, vec![2, 3], None),
        (70, all.clone(), None),
        (100, all.clone(), Some(5)),
    ];
    for ty in WeightType::ALL {
        let cols = match ty.block_elems() {
            1 => 37,
            32 => 7 * 32,
            b => 2 * b,
        };
        let m = Matrix::new(&dev, ty, experts * rows, cols, 31, true);
        let dense: Vec<Vec<f32>> = (0..m.rows).map(|r| m.row(r)).collect();
        for (ci, (n_tokens, from, forced)) in cases.iter().enumerate() {
            let n_tokens = *n_tokens;
            let n_pairs = n_tokens * k;
            let mut ids = route_ids(&mut rng, n_tokens, k, from, *forced);
            if ci == cases.len() - 1 {
                // Ids past the last expert route their pair nowhere: its rows stay unwritten.
                ids[3] = experts as u32;
                ids[n_pairs - 2] = u32::MAX;
            }
            let (counts, pairs) = reference::nn::moe_route(&ids, experts, n_tokens);
            let gcounts = upload_u32(&dev, &counts);
            let gpairs = upload_u32(&dev, &pairs);
            for x_per_pair in [false, true] {
                let what =
                    format!("matmul_indexed {ty} n_tokens={n_tokens} x_per_pair={x_per_pair}");
                let x_rows = if x_per_pair { n_pairs } else { n_tokens };
                let x = rng.f32s(x_rows * cols, 1.0);
                let gx = dev.upload_f32(&x, OWNER).unwrap();
                let mut want = vec![UNWRITTEN; n_pairs * rows];
                let gy = dev.upload_f32(&want, OWNER).unwrap();
                let mut s = dev.stream().unwrap();
                ops::matmul_indexed(
                    &mut s,
                    m.weights(),
                    rows as u64,
                    U32s::all(&gcounts),
                    U32s::all(&gpairs),
                    n_tokens as u64,
                    k as u64,
                    F32s::all(&gx),
                    x_per_pair,
                    F32s::all(&gy),
                )
                .unwrap();
                s.finish().unwrap();
                let got = dev.read_f32(&gy, 0, (n_pairs * rows) as u64).unwrap();
                reference::quant::matmul_indexed(
                    ty, &m.bytes, rows, cols, &counts, &pairs, n_tokens, k, &x, x_per_pair,
                    &mut want,
                );
                for (p, &id) in ids.iter().enumerate() {
                    let got = &got[p * rows..(p + 1) * rows];
                    let want = &want[p * rows..(p + 1) * rows];
                    let what = format!("{what} pair {p} expert {id}");
                    if id as usize >= experts {
                        assert!(got.iter().all(|&v| v == UNWRITTEN), "{what}: {got:?}");
                        continue;
                    }
                    let xr = if x_per_pair { p } else { p / k };
                    let xs = &x[xr * cols..(xr + 1) * cols];
                    let scale: Vec<f64> = (0..rows)
                        .map(|r| {
                            dense[id as usize * rows + r]
                                .iter()
                                .zip(xs)
                                .map(|(&w, &v)| (f64::from(w) * f64::from(v)).abs())
                                .sum()
                        })
                        .collect();
                    assert_close(&what, got, want, &scale);
                }
            }
        }
    }
}

/// A whole mixture-of-experts feed-forward block for a batch, as the model code records it:
/// router, routing, gate and up over each token's input, SwiGLU, down over each pair's own
/// input, combine; against the same chain of CPU references.
#[test]
fn moe_batch_chain_matches_the_references() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(10);
    let (experts, k, n_tokens, d, ff) = (8usize, 2usize, 37usize, 64usize, 96usize);
    let ty = WeightType::Q8_0;
    let gate = Matrix::new(&dev, ty, experts * ff, d, 41, false);
    let up = Matrix::new(&dev, ty, experts * ff, d, 42, true);
    let down = Matrix::new(&dev, ty, experts * d, ff, 43, false);
    let logits = rng.f32s(n_tokens * experts, 2.0);
    let h = rng.f32s(n_tokens * d, 1.0);
    let n_pairs = n_tokens * k;

    let g_logits = dev.upload_f32(&logits, OWNER).unwrap();
    let g_h = dev.upload_f32(&h, OWNER).unwrap();
    let g_ids = out_buffer(&dev, n_pairs);
    let g_w = out_buffer(&dev, n_pairs);
    let g_counts = out_buffer(&dev, experts);
    let g_pairs = out_buffer(&dev, experts * n_tokens);
    let g_gate = out_buffer(&dev, n_pairs * ff);
    let g_up = out_buffer(&dev, n_pairs * ff);
    let g_down = out_buffer(&dev, n_pairs * d);
    let g_out = out_buffer(&dev, n_tokens * d);
    let (counts, pairs) = (U32s::all(&g_counts), U32s::all(&g_pairs));
    let (nt, kk) = (n_tokens as u64, k as u64);
    let mut s = dev.stream().unwrap();
    ops::softmax_top_k(
        &mut s,
        F32s::all(&g_logits),
        experts as u64,
        kk,
        true,
        U32s::all(&g_ids),
        F32s::all(&g_w),
    )
    .unwrap();
    ops::moe_route(&mut s, U32s::all(&g_ids), experts as u64, counts, pairs, nt).unwrap();
    let (xh, xg, xu) = (F32s::all(&g_h), F32s::all(&g_gate), F32s::all(&g_up));
    let xd = F32s::all(&g_down);
    let (fg, fu) = (ff as u64, ff as u64);
    ops::matmul_indexed(
        &mut s,
        gate.weights(),
        fg,
        counts,
        pairs,
        nt,
        kk,
        xh,
        false,
        xg,
    )
    .unwrap();
    ops::matmul_indexed(
        &mut s,
        up.weights(),
        fu,
        counts,
        pairs,
        nt,
        kk,
        xh,
        false,
        xu,
    )
    .unwrap();
    ops::swiglu(&mut s, xg, xu, xg).unwrap();
    let dd = d as u64;
    ops::matmul_indexed(
        &mut s,
        down.weights(),
        dd,
        counts,
        pairs,
        nt,
        kk,
        xg,
        true,
        xd,
    )
    .unwrap();
    ops::moe_combine(&mut s, xd, F32s::all(&g_w), F32s::all(&g_out), dd, kk).unwrap();
    s.finish().unwrap();
    let got = dev.read_f32(&g_out, 0, (n_tokens * d) as u64).unwrap();

    let (ids, w) = reference::nn::softmax_top_k(&logits, experts, k, true);
    let (c, p) = reference::nn::moe_route(&ids, experts, n_tokens);
    let mut yg = vec![0.0; n_pairs * ff];
    let mut yu = vec![0.0; n_pairs * ff];
    let mut yd = vec![0.0; n_pairs * d];
    let r = reference::quant::matmul_indexed;
    r(
        ty,
        &gate.bytes,
        ff,
        d,
        &c,
        &p,
        n_tokens,
        k,
        &h,
        false,
        &mut yg,
    );
    r(
        ty, &up.bytes, ff, d, &c, &p, n_tokens, k, &h, false, &mut yu,
    );
    let act = reference::nn::swiglu(&yg, &yu);
    r(
        ty,
        &down.bytes,
        d,
        ff,
        &c,
        &p,
        n_tokens,
        k,
        &act,
        true,
        &mut yd,
    );
    let want = reference::nn::moe_combine(&yd, &w, k);
    // Each step rounds to f32 where the references keep f64 sums, and random weights make the
    // sums cancel, so single elements can be far smaller than their rounding error. We allow
    // 1e-4 of the largest value of the token's output row: well above the rounding of a chain of
    // sums this short, well below what a routing or indexing slip changes (the row's scale).
    for t in 0..n_tokens {
        let (g, w) = (&got[t * d..(t + 1) * d], &want[t * d..(t + 1) * d]);
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "MoE chain: token {t} element {j}: gpu {a} vs reference {b} (row scale {scale})"
            );
        }
    }
}

fn is_bad_argument<T: std::fmt::Debug>(r: Result<T, VulkanError>) -> bool {
    matches!(r, Err(VulkanError::BadArgument { .. }))
}

#[test]
fn bad_arguments_are_errors() {
    let Some(dev) = device() else { return };
    let ty = WeightType::Q4_K;
    let m = Matrix::new(&dev, ty, 4, 512, 1, false);
    let x = dev.upload_f32(&vec![0.0; 3072], OWNER).unwrap();
    let y = out_buffer(&dev, 64);
    let ids = upload_u32(&dev, &[0, 1]);
    let mut s = dev.stream().unwrap();
    let xs = F32s::all(&x);
    let ys = F32s::all(&y);
    let w = m.weights();

    // matvec: wrong x and y lengths.
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        w,
        xs.sub(0, 511),
        ys.sub(0, 4)
    )));
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        w,
        xs.sub(0, 512),
        ys.sub(0, 5)
    )));
    // Columns that are not a whole number of blocks.
    let ragged = Weights {
        cols: 384,
        rows: 2,
        ..w
    };
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        ragged,
        xs.sub(0, 384),
        ys.sub(0, 2)
    )));
    // Weights that run past the end of the buffer, or start misaligned.
    let past = Weights { rows: 5, ..w };
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        past,
        xs.sub(0, 512),
        ys.sub(0, 5)
    )));
    let shifted = Weights { offset: 144, ..w };
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        shifted,
        xs.sub(0, 512),
        ys.sub(0, 4)
    )));
    let odd = Weights {
        offset: 1,
        rows: 1,
        ..w
    };
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        odd,
        xs.sub(0, 512),
        ys.sub(0, 1)
    )));
    let f32_odd = Weights {
        ty: WeightType::F32,
        offset: 2,
        rows: 1,
        cols: 16,
        ..w
    };
    assert!(is_bad_argument(ops::matvec(
        &mut s,
        f32_odd,
        xs.sub(0, 16),
        ys.sub(0, 1)
    )));

    // matmul: x or y not n rows long.
    assert!(is_bad_argument(ops::matmul(
        &mut s,
        w,
        xs.sub(0, 1023),
        ys.sub(0, 8),
        2
    )));
    assert!(is_bad_argument(ops::matmul(
        &mut s,
        w,
        xs.sub(0, 1024),
        ys.sub(0, 7),
        2
    )));
    assert!(is_bad_argument(ops::matmul(
        &mut s,
        ragged,
        xs.sub(0, 768),
        ys.sub(0, 4),
        2
    )));

    // get_rows: output not ids × cols.
    let idv = U32s::all(&ids);
    assert!(is_bad_argument(ops::get_rows(
        &mut s,
        w,
        idv,
        ys.sub(0, 64)
    )));
    assert!(is_bad_argument(ops::get_rows(
        &mut s,
        ragged,
        idv,
        F32s::all(&x).sub(0, 768)
    )));

    // matvec_indexed: rows not a whole number of experts, wrong x or y lengths.
    assert!(is_bad_argument(ops::matvec_indexed(
        &mut s,
        w,
        3,
        idv,
        xs.sub(0, 512),
        false,
        ys.sub(0, 6)
    )));
    assert!(is_bad_argument(ops::matvec_indexed(
        &mut s,
        w,
        0,
        idv,
        xs.sub(0, 512),
        false,
        ys.sub(0, 0)
    )));
    assert!(is_bad_argument(ops::matvec_indexed(
        &mut s,
        w,
        2,
        idv,
        xs.sub(0, 512),
        true,
        ys.sub(0, 4)
    )));
    assert!(is_bad_argument(ops::matvec_indexed(
        &mut s,
        w,
        2,
        idv,
        xs.sub(0, 1024),
        true,
        ys.sub(0, 5)
    )));

    // matmul_indexed: two experts of two rows, three tokens of k = 2 (six pairs).
    let counts = upload_u32(&dev, &[0, 0]);
    let pairs = upload_u32(&dev, &[0; 6]);
    let (cv, pv) = (U32s::all(&counts), U32s::all(&pairs));
    let mi = |s: &mut halo_kernels::Stream,
              rows_per_expert: u64,
              counts: U32s<'_>,
              pairs: U32s<'_>,
              x_len: u64,
              x_per_pair: bool,
              y_len: u64| {
        ops::matmul_indexed(
            s,
            w,
            rows_per_expert,
            counts,
            pairs,
            3,
            2,
            xs.sub(0, x_len),
            x_per_pair,
            ys.sub(0, y_len),
        )
    };
    // Rows not a whole number of experts, or zero rows per expert.
    assert!(is_bad_argument(mi(&mut s, 3, cv, pv, 1536, false, 18)));
    assert!(is_bad_argument(mi(&mut s, 0, cv, pv, 1536, false, 0)));
    // counts not one per expert, pairs not n_tokens per expert.
    assert!(is_bad_argument(mi(
        &mut s,
        2,
        cv.sub(0, 1),
        pv,
        1536,
        false,
        12
    )));
    assert!(is_bad_argument(mi(
        &mut s,
        2,
        cv,
        pv.sub(0, 5),
        1536,
        false,
        12
    )));
    // x not a row per token (or per pair), y not a row per pair.
    assert!(is_bad_argument(mi(&mut s, 2, cv, pv, 1024, false, 12)));
    assert!(is_bad_argument(mi(&mut s, 2, cv, pv, 1536, true, 12)));
    assert!(is_bad_argument(mi(&mut s, 2, cv, pv, 1536, false, 6)));
    // Weights whose columns are not whole blocks.
    assert!(is_bad_argument(ops::matmul_indexed(
        &mut s,
        ragged,
        1,
        cv,
        pv,
        3,
        2,
        xs.sub(0, 3 * 384),
        false,
        ys.sub(0, 6)
    )));
    // tokens × k past 32 bits.
    assert!(is_bad_argument(ops::matmul_indexed(
        &mut s,
        w,
        2,
        cv,
        pv,
        3,
        1 << 31,
        xs.sub(0, 1536),
        false,
        ys.sub(0, 12)
    )));

    // Nothing was recorded by the failures; valid calls still work afterwards.
    ops::matvec_indexed(&mut s, w, 2, idv, xs.sub(0, 1024), true, ys.sub(0, 4)).unwrap();
    mi(&mut s, 2, cv, pv, 1536, false, 12).unwrap();
    s.finish().unwrap();
}
