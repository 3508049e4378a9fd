//! The runtime on a real Vulkan device (lavapipe in CI): memory and its ledger, staging, host
//! import, barriers between dependent dispatches, batching, big buffers, the pipeline cache, and
//! errors instead of panics. Skips (with a message) when no device exists, unless
//! HALO_REQUIRE_VULKAN=1.

mod common;

use std::sync::Arc;

use common::device;

use halo_kernels::ops::{self, F32s};
use halo_kernels::reference::{self, max_rel_diff, Rng};
use halo_kernels::{
    Device, DeviceOptions, HostMemory, LoadStrategy, MemoryKind, OwnerId, VulkanError,
};

const OWNER: OwnerId = OwnerId(7);

#[test]
fn elementwise_ops_match_the_reference() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(1);
    for n in [1usize, 7, 255, 256, 257, 1000, 65_537, 300_007] {
        let a = rng.f32s(n, 10.0);
        let b_len = if n % 7 == 0 { 7 } else { n };
        let b = rng.f32s(b_len, 10.0);
        let ga = dev.upload_f32(&a, OWNER).unwrap();
        let gb = dev.upload_f32(&b, OWNER).unwrap();
        let outs: Vec<_> = (0..3)
            .map(|_| dev.alloc(MemoryKind::Device, n as u64 * 4, OWNER).unwrap())
            .collect();
        let mut s = dev.stream().unwrap();
        ops::add(&mut s, F32s::all(&ga), F32s::all(&gb), F32s::all(&outs[0])).unwrap();
        ops::mul(&mut s, F32s::all(&ga), F32s::all(&gb), F32s::all(&outs[1])).unwrap();
        ops::scale(&mut s, F32s::all(&ga), -0.375, F32s::all(&outs[2])).unwrap();
        s.finish().unwrap();
        let got = |i: usize| dev.read_f32(&outs[i], 0, n as u64).unwrap();
        // Single IEEE operations: the GPU must agree to the last bit or nearly.
        assert!(
            max_rel_diff(&got(0), &reference::add(&a, &b)) <= 1e-7,
            "add n={n}"
        );
        assert!(
            max_rel_diff(&got(1), &reference::mul(&a, &b)) <= 1e-7,
            "mul n={n}"
        );
        assert!(
            max_rel_diff(&got(2), &reference::scale(&a, -0.375)) <= 1e-7,
            "scale n={n}"
        );
    }
}

#[test]
fn dependent_dispatches_are_ordered_across_batches() {
    let Some(dev) = device() else { return };
    let n = 4099u64;
    let mut acc = dev.upload_f32(&vec![0.0; n as usize], OWNER).unwrap();
    let one = dev.upload_f32(&[1.0], OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    // 600 in-place adds: each reads what the previous wrote, across several submitted batches.
    for _ in 0..600 {
        ops::add(&mut s, F32s::all(&acc), F32s::all(&one), F32s::all(&acc)).unwrap();
    }
    s.finish().unwrap();
    let v = dev.read_f32(&acc, 0, n).unwrap();
    assert!(v.iter().all(|x| *x == 600.0), "{:?}", &v[..4]);
    // The host may write again once the stream has finished.
    dev.write_f32(&mut acc, 0, &[5.0]).unwrap();
    assert_eq!(dev.read_f32(&acc, 0, 2).unwrap(), [5.0, 600.0]);
}

#[test]
fn the_ledger_charges_owners_and_unload_returns_to_zero() {
    let Some(dev) = device() else { return };
    let owner = OwnerId(4242);
    // A small request opens one of the owner's small chunks, charged whole; a large one gets a
    // chunk of exactly its size.
    let a = dev.alloc(MemoryKind::Device, 1000, owner).unwrap();
    let b = dev.alloc(MemoryKind::Device, 300 << 20, owner).unwrap();
    let l = dev.ledger();
    let small = halo_kernels::SMALL_CHUNK;
    assert_eq!(l.owner(owner), small + (300 << 20));
    // What the device holds is what the owners are charged, always.
    assert_eq!(l.device_memory, l.total());
    // More small requests fill the same chunk before another opens.
    let more: Vec<_> = (0..8)
        .map(|_| dev.alloc(MemoryKind::Device, 4096, owner).unwrap())
        .collect();
    assert_eq!(dev.ledger().owner(owner), small + (300 << 20));
    drop(more);
    // A group allocation is charged exactly its requests, rounded to 256 bytes each.
    let group_owner = OwnerId(4243);
    let group = dev
        .alloc_many(
            &[
                (MemoryKind::Device, 1000),
                (MemoryKind::Device, 5 << 20),
                (MemoryKind::Readback, 77),
            ],
            group_owner,
        )
        .unwrap();
    assert_eq!(dev.ledger().owner(group_owner), 1024 + (5 << 20) + 256);
    assert_eq!(
        group.iter().map(|b| b.len()).collect::<Vec<_>>(),
        [1000, 5 << 20, 77]
    );
    drop(group);
    assert_eq!(dev.ledger().owner(group_owner), 0);
    // A stream keeps buffers alive until its work is done.
    let mut s = dev.stream().unwrap();
    ops::scale(&mut s, F32s::all(&a), 2.0, F32s::all(&a).sub(0, 250)).unwrap();
    drop(a);
    assert_eq!(dev.ledger().owner(owner), small + (300 << 20));
    s.finish().unwrap();
    drop(s);
    drop(b);
    assert_eq!(dev.ledger().owner(owner), 0);
}

#[test]
fn staging_copies_and_readback_work() {
    let Some(dev) = device() else { return };
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut up = dev
        .alloc(MemoryKind::Upload, data.len() as u64, OWNER)
        .unwrap();
    dev.write(&mut up, 0, &data).unwrap();
    let dst = dev
        .alloc(MemoryKind::Device, data.len() as u64, OWNER)
        .unwrap();
    let back = dev
        .alloc(MemoryKind::Readback, data.len() as u64, OWNER)
        .unwrap();
    let mut s = dev.stream().unwrap();
    s.copy(&up, 0, &dst, 0, data.len() as u64).unwrap();
    s.copy(&dst, 0, &back, 0, data.len() as u64).unwrap();
    s.zero(&back, 0, 16).unwrap();
    s.finish().unwrap();
    let got = dev.read(&back, 0, data.len() as u64).unwrap();
    assert_eq!(&got[..16], &[0u8; 16]);
    assert_eq!(&got[16..], &data[16..]);
}

struct MappedFile(memmap2::Mmap);

impl HostMemory for MappedFile {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[test]
fn mapped_files_import_without_a_copy() {
    let Some(dev) = device() else { return };
    if !dev.features().host_import {
        eprintln!("skipping: no VK_EXT_external_memory_host");
        return;
    }
    let values = Rng::new(3).f32s(3 * 1024 + 5, 1.0);
    let mut file = tempfile::tempfile().unwrap();
    // Two pages of header, then the tensor, as in a GGUF file whose data section is aligned.
    let mut bytes = vec![0u8; 8192];
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::io::Write::write_all(&mut file, &bytes).unwrap();
    // SAFETY: the temp file is private to this test and not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let host: Arc<dyn HostMemory> = Arc::new(MappedFile(map));
    let len = values.len() * 4;
    let weights = dev
        .import_host(host.clone(), 8192..8192 + len, OWNER)
        .unwrap();
    assert_eq!(weights.len(), len as u64);
    let out = dev.alloc(MemoryKind::Device, len as u64, OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    ops::scale(&mut s, F32s::all(&weights), 3.0, F32s::all(&out)).unwrap();
    s.finish().unwrap();
    let got = dev.read_f32(&out, 0, values.len() as u64).unwrap();
    assert!(max_rel_diff(&got, &reference::scale(&values, 3.0)) <= 1e-7);
    // Misaligned ranges are refused, not imported.
    let e = dev.import_host(host, 100..200, OWNER).unwrap_err();
    assert!(matches!(e, VulkanError::HostImport(_)), "{e}");
}

#[test]
fn a_tensor_larger_than_the_storage_buffer_range_works() {
    let Some(dev) = device() else { return };
    // 300 MB: more than lavapipe's 128 MiB maxStorageBufferRange; buffer addresses carry no range.
    let n: u64 = 75_000_000;
    let mut a = dev.alloc(MemoryKind::Device, n * 4, OWNER).unwrap();
    let probes = [0u64, 1, 33_554_431, 33_554_432, 50_000_000, n - 1];
    for (i, p) in probes.iter().enumerate() {
        dev.write_f32(&mut a, *p, &[i as f32 + 0.5]).unwrap();
    }
    let out = dev.alloc(MemoryKind::Device, n * 4, OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    ops::scale(&mut s, F32s::all(&a), 2.0, F32s::all(&out)).unwrap();
    s.finish().unwrap();
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(
            dev.read_f32(&out, *p, 1).unwrap()[0],
            2.0 * (i as f32 + 0.5),
            "element {p}"
        );
    }
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let Some(dev) = device() else { return };
    let max = dev.info().limits.max_memory_allocation_size;
    let e = dev
        .alloc(MemoryKind::Device, max + (1 << 30), OWNER)
        .unwrap_err();
    assert!(matches!(e, VulkanError::TooLarge { .. }), "{e}");
    let a = dev.upload_f32(&[1.0; 10], OWNER).unwrap();
    let b = dev.upload_f32(&[1.0; 3], OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    let e = ops::add(&mut s, F32s::all(&a), F32s::all(&b), F32s::all(&a)).unwrap_err();
    assert!(e.to_string().contains("does not divide"), "{e}");
    let e = ops::scale(
        &mut s,
        F32s::all(&a).sub(5, 10),
        1.0,
        F32s::all(&a).sub(0, 10),
    )
    .unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let e = dev.read(&a, 36, 8).unwrap_err();
    assert!(matches!(e, VulkanError::BadArgument { .. }), "{e}");
}

#[test]
fn the_pipeline_cache_is_written_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DeviceOptions {
        pipeline_cache_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let dev = match Device::open(&opts) {
        Ok(d) => d,
        Err(e) if std::env::var("HALO_REQUIRE_VULKAN").as_deref() != Ok("1") => {
            eprintln!("skipping: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let a = dev.upload_f32(&[1.0; 4], OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    ops::scale(&mut s, F32s::all(&a), 2.0, F32s::all(&a)).unwrap();
    s.finish().unwrap();
    drop((s, a));
    drop(dev);
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].metadata().unwrap().len() > 0);
    // Opening again reads it back without complaint.
    let dev = Device::open(&opts).unwrap();
    drop(dev);
}

#[test]
fn weights_load_by_copy_and_by_import_alike() {
    let Some(dev) = device() else { return };
    // A file with a header and three tensors at unaligned and aligned offsets.
    let mut rng = Rng::new(9);
    let mut bytes: Vec<u8> = (0..3 * 4096 + 77).map(|_| rng.next_u64() as u8).collect();
    bytes.truncate(3 * 4096 + 77);
    let tensors = [40..1040u64, 4096..4096 + 8000, 12_000..12_000 + 365];
    let mut file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut file, &bytes).unwrap();
    // SAFETY: the temp file is private to this test and not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let host: Arc<dyn HostMemory> = Arc::new(MappedFile(map));
    let owner = OwnerId(99);
    let mut strategies = vec![LoadStrategy::Copy, LoadStrategy::Auto];
    if dev.features().host_import {
        strategies.push(LoadStrategy::Import);
    }
    for strategy in strategies {
        let w = dev
            .load_weights(host.clone(), &tensors, strategy, owner)
            .unwrap();
        assert_ne!(w.strategy, LoadStrategy::Auto);
        assert!(dev.ledger().owner(owner) >= w.bytes);
        for (i, t) in tensors.iter().enumerate() {
            let (buf, off) = w.tensor(i).unwrap();
            let got = dev.read(buf, off, t.end - t.start).unwrap();
            assert_eq!(
                got,
                &bytes[t.start as usize..t.end as usize],
                "{strategy:?} tensor {i}"
            );
        }
        drop(w);
        assert_eq!(
            dev.ledger().owner(owner),
            0,
            "{strategy:?} frees everything"
        );
    }
    let e = dev
        .load_weights(
            host,
            std::slice::from_ref(&(0..1 << 20)),
            LoadStrategy::Copy,
            owner,
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("past the end"), "{e}");
}

#[test]
fn profiling_reports_each_dispatch() {
    let Some(dev) = device() else { return };
    let a = dev.upload_f32(&[1.0; 4096], OWNER).unwrap();
    let mut s = dev.stream().unwrap();
    s.set_profiling(true);
    for _ in 0..3 {
        ops::scale(&mut s, F32s::all(&a), 1.5, F32s::all(&a)).unwrap();
    }
    ops::add(&mut s, F32s::all(&a), F32s::all(&a), F32s::all(&a)).unwrap();
    s.finish().unwrap();
    let p = s.take_profile();
    let kernels: Vec<_> = p.iter().map(|(k, _)| k.name()).collect();
    assert_eq!(kernels, ["scale_f32", "scale_f32", "scale_f32", "add_f32"]);
    assert!(s.take_profile().is_empty());
}
