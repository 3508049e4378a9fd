//! Discovery against whatever Vulkan driver this machine has.
//!
//! Machines without a Vulkan loader or driver skip the checks, except when
//! `HALO_REQUIRE_VULKAN=1` is set (CI sets it after installing lavapipe).

use halo_kernels::{discover, DeviceInfo, Discovery, VulkanError};

fn vulkan_required() -> bool {
    std::env::var("HALO_REQUIRE_VULKAN").is_ok_and(|v| v == "1")
}

fn print_device(device: &DeviceInfo) {
    println!(
        "device {}: {} ({}, vendor {:#06x}, device {:#06x})",
        device.index,
        device.name,
        device.device_type.as_str(),
        device.vendor_id,
        device.device_id
    );
    println!(
        "  driver: {} [{}], version {:#x}; Vulkan {}",
        device.driver_name, device.driver_info, device.driver_version, device.api_version
    );
    for (i, heap) in device.heaps.iter().enumerate() {
        println!(
            "  heap {i}: {} MiB, device_local={}, budget={:?}, usage={:?}",
            heap.size >> 20,
            heap.device_local,
            heap.budget,
            heap.usage
        );
    }
    println!("  limits: {:?}", device.limits);
    println!(
        "  VK_EXT_memory_budget={}, VK_EXT_external_memory_host={}, uma={}, amd={}",
        device.memory_budget_ext,
        device.external_memory_host,
        device.is_uma(),
        device.is_amd()
    );
}

fn check(discovery: &Discovery) {
    assert!(!discovery.devices.is_empty());
    assert!(discovery.chosen < discovery.devices.len());
    for (position, device) in discovery.devices.iter().enumerate() {
        print_device(device);
        assert_eq!(device.index, position);
    }
    let device = discovery.device();
    println!("chosen: {}", device.index);
    assert!(!device.name.is_empty());
    assert!(!device.heaps.is_empty());
    assert!(device.heaps.iter().all(|h| h.size > 0));
    assert!(device.limits.max_storage_buffer_range > 0);
    assert!(device.limits.max_memory_allocation_size > 0);
    assert!(device.limits.subgroup_size >= 1);
    assert!(
        device.api_version.starts_with("1."),
        "{}",
        device.api_version
    );
    assert_eq!(
        device.external_memory_host,
        device.limits.min_imported_host_pointer_alignment.is_some()
    );
    if device.memory_budget_ext {
        assert!(device.heaps.iter().all(|h| h.budget.is_some()));
    } else {
        assert!(device.heaps.iter().all(|h| h.budget.is_none()));
    }
}

#[test]
fn discovers_a_device_when_vulkan_is_present() {
    match discover(None) {
        Ok(discovery) => check(&discovery),
        Err(err @ (VulkanError::LoaderMissing(_) | VulkanError::NoDevices)) => {
            println!("skipping: {err}");
        }
        Err(err) => panic!("discovery failed: {err}"),
    }
}

#[test]
fn discovery_works_when_required() {
    if !vulkan_required() {
        println!("skipping: set HALO_REQUIRE_VULKAN=1 to require a Vulkan device");
        return;
    }
    let discovery = discover(None).unwrap_or_else(|err| panic!("discovery failed: {err}"));
    check(&discovery);
}

#[test]
fn selectors_pick_devices() {
    let discovery = match discover(None) {
        Ok(discovery) => discovery,
        Err(err) if !vulkan_required() => {
            println!("skipping: {err}");
            return;
        }
        Err(err) => panic!("discovery failed: {err}"),
    };
    let first = &discovery.devices[0];
    let by_index = discover(Some("0")).expect("index 0 exists");
    assert_eq!(by_index.device().name, first.name);
    let by_name = discover(Some(&first.name.to_uppercase())).expect("name matches");
    assert_eq!(by_name.device().name, first.name);
    match discover(Some("no such device at all")) {
        Err(VulkanError::NoMatch { available, .. }) => {
            assert_eq!(available.len(), discovery.devices.len());
            assert!(available[0].starts_with("0: "));
        }
        other => panic!("expected NoMatch, got {other:?}"),
    }
}
