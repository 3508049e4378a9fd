//! Shared by the daemon's test files: where the real models are, and the GPU to run them on.
#![allow(dead_code)] // each test file uses part of it

use std::path::PathBuf;

use halo_kernels::{Device, DeviceOptions};

/// A real model from models/ (scripts/fetch-models.sh), or None (with a message) when it is
/// absent, unless HALO_REQUIRE_MODELS=1 demands it.
pub fn model(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    if p.exists() {
        Some(p)
    } else if std::env::var("HALO_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing; run scripts/fetch-models.sh", p.display());
    } else {
        eprintln!(
            "skipping: {} is missing (scripts/fetch-models.sh fetches it)",
            p.display()
        );
        None
    }
}

/// The default Vulkan device, or None (with a message) unless HALO_REQUIRE_VULKAN=1.
pub fn device() -> Option<Device> {
    match Device::open(&DeviceOptions::default()) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("HALO_REQUIRE_VULKAN").as_deref() != Ok("1") => {
            eprintln!("skipping: no Vulkan device ({e})");
            None
        }
        Err(e) => panic!("HALO_REQUIRE_VULKAN=1 but no device: {e}"),
    }
}
