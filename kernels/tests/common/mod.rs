//! Shared by the GPU test files: the device to test on.

use halo_kernels::{Device, DeviceOptions};

/// The default Vulkan device, or `None` (with a message) when there is none, unless
/// HALO_REQUIRE_VULKAN=1 demands one.
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
