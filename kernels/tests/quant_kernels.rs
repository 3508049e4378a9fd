//! The quantized-weight kernels (matvec, matmul, get_rows, matvec_indexed) for every weight type
//! on a real Vulkan device (lavapipe in CI), against the CPU reference in `halo_kernels::quant`
//! and the gguf-py fixtures. Skips (with a message) when no device exists, unless
//! HALO_REQUIRE_VULKAN=1.

mod common;

use std::path::PathBuf;

use common::device;

use halo_kernels::ops::{self, F32s, U32s, Weights};
use halo_kernels::quant::{self, WeightType};
use halo_kernels::reference::Rng;
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
        for n in [1usize, 2, 5, 33, 67] {
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

fn is_bad_argument<T: std::fmt::Debug>(r: Result<T, VulkanError>) -> bool {
    matches!(r, Err(VulkanError::BadArgument { .. }))
}

#[test]
fn bad_arguments_are_errors() {
    let Some(dev) = device() else { return };
    let ty = WeightType::Q4_K;
    let m = Matrix::new(&dev, ty, 4, 512, 1, false);
    let x = dev.upload_f32(&vec![0.0; 1024], OWNER).unwrap();
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

    // Nothing was recorded by the failures; valid calls still work afterwards.
    ops::matvec_indexed(&mut s, w, 2, idv, xs.sub(0, 1024), true, ys.sub(0, 4)).unwrap();
    s.finish().unwrap();
}
