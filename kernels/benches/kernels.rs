//! `cargo bench -p halo-kernels`: throughput of the kernels on the current Vulkan device, printed
//! as figures (nothing is asserted).
//!
//! - memory bandwidth, measured in the same run with a device-side buffer copy (bytes read +
//!   bytes written per second), which is the roofline the other figures are compared with;
//! - for every weight type, matvec (token generation) and matmul (prompt processing) as GB/s of
//!   weights read and as a percentage of that bandwidth, next to the CPU reference's figure;
//! - for every weight type, the mixture-of-experts matmul (matmul_indexed) over the same weights
//!   taken as HALO_BENCH_EXPERTS stacked experts, each token routed to 2 of them at random;
//! - loading weights from a memory-mapped file by copy and by zero-copy import.
//!
//! Sizes: HALO_BENCH_ROWS (default 2048), HALO_BENCH_COLS (4096), HALO_BENCH_TOKENS (64),
//! HALO_BENCH_EXPERTS (8; must divide the rows).
//! HALO_VULKAN_DEVICE picks the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_kernels::ops::{self, F32s, U32s, Weights};
use halo_kernels::quant::{self, WeightType};
use halo_kernels::reference::{self, Rng};
use halo_kernels::{Device, DeviceOptions, HostMemory, LoadStrategy, MemoryKind, OwnerId};

const OWNER: OwnerId = OwnerId(1);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` (which records `reps` repetitions and waits) until at least `min` has passed;
/// returns the best time per repetition.
fn best_of(min: Duration, mut f: impl FnMut() -> Duration) -> Duration {
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < min && runs < 50) {
        best = best.min(f());
        runs += 1;
    }
    best
}

fn gbs(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is accepted and ignored.
    let dev = match Device::open(&DeviceOptions {
        selector: std::env::var(halo_kernels::DEVICE_ENV).ok(),
        ..Default::default()
    }) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no Vulkan device: {e}");
            return;
        }
    };
    let info = dev.info();
    println!(
        "device: {} ({}, {} {}), Vulkan {}",
        info.name, info.device_type, info.driver_name, info.driver_info, info.api_version
    );
    let rows = env("HALO_BENCH_ROWS", 2048);
    let cols = env("HALO_BENCH_COLS", 4096);
    let tokens = env("HALO_BENCH_TOKENS", 64);
    let min = Duration::from_millis(env("HALO_BENCH_MS", 1500));
    let experts = env("HALO_BENCH_EXPERTS", 8).max(1);
    let moe_k: u64 = 2.min(experts);
    if !rows.is_multiple_of(experts) {
        eprintln!("HALO_BENCH_EXPERTS = {experts} does not divide HALO_BENCH_ROWS = {rows}");
        return;
    }

    // Roofline: a large device-to-device copy.
    let copy_bytes: u64 = (256u64 << 20).min(info.limits.max_memory_allocation_size / 2);
    let src = dev.alloc(MemoryKind::Device, copy_bytes, OWNER).unwrap();
    let dst = dev.alloc(MemoryKind::Device, copy_bytes, OWNER).unwrap();
    let t = best_of(min, || {
        let mut s = dev.stream().unwrap();
        let t0 = Instant::now();
        for _ in 0..4 {
            s.copy(&src, 0, &dst, 0, copy_bytes).unwrap();
        }
        s.finish().unwrap();
        t0.elapsed() / 4
    });
    let bandwidth = gbs(2 * copy_bytes, t);
    println!(
        "memory bandwidth (copy of {} MiB, read+write): {bandwidth:.1} GB/s",
        copy_bytes >> 20
    );
    drop((src, dst));

    println!();
    println!(
        "{rows}x{cols} weights; matmul with {tokens} tokens; MoE as {experts} experts of {} rows, \
         {tokens} tokens of k = {moe_k}; best of >= {} ms each",
        rows / experts,
        min.as_millis()
    );
    println!(
        "{:<6} {:>10} {:>12} {:>8} {:>12} {:>12} {:>12} {:>8} {:>12} {:>12} {:>12}",
        "type",
        "weights",
        "matvec GB/s",
        "% bw",
        "CPU GB/s",
        "GPU/CPU",
        "matmul GB/s",
        "% bw",
        "GFLOP/s",
        "moe GB/s",
        "moe GFLOP/s"
    );
    let mut rng = Rng::new(5);
    let x = rng.f32s((cols * tokens) as usize, 1.0);
    // Each token picks moe_k distinct experts at random; the lists are routed once, on the CPU.
    let mut ids = Vec::new();
    for _ in 0..tokens {
        let mut pool: Vec<u32> = (0..experts as u32).collect();
        for _ in 0..moe_k {
            let i = (rng.next_u64() % pool.len() as u64) as usize;
            ids.push(pool.swap_remove(i));
        }
    }
    let (counts, pairs) = reference::nn::moe_route(&ids, experts as usize, tokens as usize);
    let to_bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut counts_b = dev.alloc(MemoryKind::Device, experts * 4, OWNER).unwrap();
    dev.write(&mut counts_b, 0, &to_bytes(&counts)).unwrap();
    let mut pairs_b = dev
        .alloc(MemoryKind::Device, (experts * tokens).max(1) * 4, OWNER)
        .unwrap();
    dev.write(&mut pairs_b, 0, &to_bytes(&pairs)).unwrap();
    let moe_y = dev
        .alloc(
            MemoryKind::Device,
            (rows / experts * tokens * moe_k).max(1) * 4,
            OWNER,
        )
        .unwrap();
    for ty in WeightType::ALL {
        let w_bytes = quant::random_weights(ty, (rows * cols) as usize, 7);
        let size = w_bytes.len() as u64;
        let mut wb = dev.alloc(MemoryKind::Device, size, OWNER).unwrap();
        dev.write(&mut wb, 0, &w_bytes).unwrap();
        let w = Weights {
            buffer: &wb,
            offset: 0,
            ty,
            rows,
            cols,
        };
        let xb = dev.upload_f32(&x, OWNER).unwrap();
        let yb = dev
            .alloc(MemoryKind::Device, rows * tokens * 4, OWNER)
            .unwrap();
        let reps = 8;
        let tv = best_of(min, || {
            let mut s = dev.stream().unwrap();
            let t0 = Instant::now();
            for _ in 0..reps {
                ops::matvec(
                    &mut s,
                    w,
                    F32s::all(&xb).sub(0, cols),
                    F32s::all(&yb).sub(0, rows),
                )
                .unwrap();
            }
            s.finish().unwrap();
            t0.elapsed() / reps
        });
        let tm = best_of(min, || {
            let mut s = dev.stream().unwrap();
            let t0 = Instant::now();
            ops::matmul(&mut s, w, F32s::all(&xb), F32s::all(&yb), tokens).unwrap();
            s.finish().unwrap();
            t0.elapsed()
        });
        let tc = best_of(min / 3, || {
            let t0 = Instant::now();
            std::hint::black_box(
                quant::matvec(
                    ty,
                    &w_bytes,
                    rows as usize,
                    cols as usize,
                    &x[..cols as usize],
                )
                .unwrap(),
            );
            t0.elapsed()
        });
        let te = best_of(min, || {
            let mut s = dev.stream().unwrap();
            let t0 = Instant::now();
            ops::matmul_indexed(
                &mut s,
                w,
                rows / experts,
                U32s::all(&counts_b),
                U32s::all(&pairs_b).sub(0, experts * tokens),
                tokens,
                moe_k,
                F32s::all(&xb),
                false,
                F32s::all(&moe_y).sub(0, rows / experts * tokens * moe_k),
            )
            .unwrap();
            s.finish().unwrap();
            t0.elapsed()
        });
        let flops = 2.0 * (rows * cols * tokens) as f64;
        let moe_flops = flops * moe_k as f64 / experts as f64;
        println!(
            "{:<6} {:>7.1} MB {:>12.2} {:>7.1}% {:>12.2} {:>11.1}x {:>12.2} {:>7.1}% {:>12.1} {:>12.2} {:>12.1}",
            ty.name(),
            size as f64 / 1e6,
            gbs(size, tv),
            100.0 * gbs(size, tv) / bandwidth,
            gbs(size, tc),
            tc.as_secs_f64() / tv.as_secs_f64(),
            gbs(size, tm),
            100.0 * gbs(size, tm) / bandwidth,
            flops / tm.as_secs_f64() / 1e9,
            gbs(size, te),
            moe_flops / te.as_secs_f64() / 1e9,
        );
    }

    println!();
    load_bench(&dev);
}

struct Mapped(memmap2::Mmap);

impl HostMemory for Mapped {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Loads a 256 MiB file of 64 tensors by copy and by import.
fn load_bench(dev: &Device) {
    let size: u64 = 256 << 20;
    let mut file = tempfile::tempfile().unwrap();
    let chunk: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..(size >> 20) {
        std::io::Write::write_all(&mut file, &chunk).unwrap();
    }
    // SAFETY: the temp file is private to this process and not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    // Touch every page so both strategies start from a warm page cache.
    let sum: u64 = map.iter().step_by(4096).map(|b| *b as u64).sum();
    std::hint::black_box(sum);
    let host: Arc<dyn HostMemory> = Arc::new(Mapped(map));
    let per = size / 64;
    let tensors: Vec<_> = (0..64).map(|i| i * per..(i + 1) * per).collect();
    let mut strategies = vec![LoadStrategy::Copy];
    if dev.features().host_import {
        strategies.push(LoadStrategy::Import);
    }
    for s in strategies {
        let t = best_of(Duration::from_millis(500), || {
            let w = dev.load_weights(host.clone(), &tensors, s, OWNER).unwrap();
            let e = w.elapsed;
            drop(w);
            e
        });
        let ms = t.as_secs_f64() * 1e3;
        match s {
            // Nothing is copied, so a rate would be meaningless.
            LoadStrategy::Import => println!(
                "load 256 MiB ({s:?}): {ms:.3} ms (zero-copy: the GPU maps the file's pages)"
            ),
            _ => println!(
                "load 256 MiB ({s:?}): {ms:.3} ms, {:.2} GB/s (bytes copied into device memory)",
                gbs(size, t)
            ),
        }
    }
}
