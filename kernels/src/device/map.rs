//! Plain translations from Vulkan's structures to this crate's types.
//!
//! Nothing here calls into Vulkan, so all of it can be tested without a GPU.

use std::ffi::{CStr, FromBytesUntilNulError};

use ash::vk;

use super::{DeviceType, HeapInfo, Limits};

/// The largest allocation Vulkan promises when a device cannot report its own
/// limit (devices older than Vulkan 1.1): 1 GiB.
pub(crate) const FALLBACK_MAX_ALLOCATION: u64 = 1 << 30;

/// Writes a packed Vulkan version number as `"major.minor.patch"`, such as
/// `"1.3.255"`. The variant bits (always zero for Vulkan proper) are left out.
pub fn format_api_version(version: u32) -> String {
    format!(
        "{}.{}.{}",
        vk::api_version_major(version),
        vk::api_version_minor(version),
        vk::api_version_patch(version)
    )
}

/// Whether the packed version `version` is at least `major.minor`.
pub(crate) fn version_at_least(version: u32, major: u32, minor: u32) -> bool {
    (
        vk::api_version_major(version),
        vk::api_version_minor(version),
    ) >= (major, minor)
}

/// The Vulkan version to ask the instance for: 1.3, or the loader's own
/// version when that is older. Returns `None` when the loader is older than
/// 1.1, which this crate does not support.
pub(crate) fn instance_api_version(loader_version: u32) -> Option<u32> {
    if !version_at_least(loader_version, 1, 1) {
        return None;
    }
    let wanted = vk::API_VERSION_1_3;
    if version_at_least(loader_version, 1, 3) {
        Some(wanted)
    } else {
        Some(vk::make_api_version(
            0,
            vk::api_version_major(loader_version),
            vk::api_version_minor(loader_version),
            0,
        ))
    }
}

/// Translates Vulkan's device type.
pub(crate) fn device_type(ty: vk::PhysicalDeviceType) -> DeviceType {
    match ty {
        vk::PhysicalDeviceType::DISCRETE_GPU => DeviceType::DiscreteGpu,
        vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceType::IntegratedGpu,
        vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceType::VirtualGpu,
        vk::PhysicalDeviceType::CPU => DeviceType::Cpu,
        _ => DeviceType::Other,
    }
}

/// Turns one of Vulkan's fixed-size name fields into a `String`; a field
/// without a terminating zero becomes an empty string.
pub(crate) fn c_string(field: Result<&CStr, FromBytesUntilNulError>) -> String {
    field
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `name` is among the extensions a device or instance reports.
pub(crate) fn has_extension(extensions: &[vk::ExtensionProperties], name: &CStr) -> bool {
    extensions
        .iter()
        .any(|e| e.extension_name_as_c_str() == Ok(name))
}

/// Lists a device's heaps, with the budget and usage from
/// `VK_EXT_memory_budget` when `budget` is given.
pub(crate) fn heaps(
    memory: &vk::PhysicalDeviceMemoryProperties,
    budget: Option<&vk::PhysicalDeviceMemoryBudgetPropertiesEXT<'_>>,
) -> Vec<HeapInfo> {
    memory
        .memory_heaps_as_slice()
        .iter()
        .enumerate()
        .map(|(i, heap)| HeapInfo {
            size: heap.size,
            device_local: heap.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL),
            budget: budget.map(|b| b.heap_budget[i]),
            usage: budget.map(|b| b.heap_usage[i]),
        })
        .collect()
}

/// Gathers the compute limits from the core limits and the values that come
/// from newer structures.
///
/// `max_allocation` (Vulkan 1.1 maintenance3) falls back to 1 GiB and
/// `subgroup_size` (Vulkan 1.1 subgroup properties) to 1 when the device
/// cannot report them. `host_pointer_alignment` is present only with
/// `VK_EXT_external_memory_host`.
pub(crate) fn limits(
    core: &vk::PhysicalDeviceLimits,
    max_allocation: Option<u64>,
    subgroup_size: Option<u32>,
    host_pointer_alignment: Option<u64>,
) -> Limits {
    Limits {
        max_memory_allocation_size: max_allocation.unwrap_or(FALLBACK_MAX_ALLOCATION),
        max_storage_buffer_range: u64::from(core.max_storage_buffer_range),
        max_compute_shared_memory_size: core.max_compute_shared_memory_size,
        max_compute_workgroup_invocations: core.max_compute_work_group_invocations,
        subgroup_size: subgroup_size.unwrap_or(1).max(1),
        min_imported_host_pointer_alignment: host_pointer_alignment,
        max_loop_iterations: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_api_versions() {
        assert_eq!(
            format_api_version(vk::make_api_version(0, 1, 3, 255)),
            "1.3.255"
        );
        assert_eq!(format_api_version(vk::API_VERSION_1_1), "1.1.0");
        assert_eq!(
            format_api_version(vk::make_api_version(0, 1, 2, 4095)),
            "1.2.4095"
        );
        // The variant bits are not part of the text.
        assert_eq!(
            format_api_version(vk::make_api_version(7, 1, 0, 3)),
            "1.0.3"
        );
    }

    #[test]
    fn compares_versions_on_major_and_minor() {
        let v = vk::make_api_version(0, 1, 2, 198);
        assert!(version_at_least(v, 1, 1));
        assert!(version_at_least(v, 1, 2));
        assert!(!version_at_least(v, 1, 3));
        assert!(version_at_least(vk::make_api_version(0, 2, 0, 0), 1, 3));
    }

    #[test]
    fn instance_version_is_capped_and_floored() {
        assert_eq!(
            instance_api_version(vk::make_api_version(0, 1, 0, 61)),
            None
        );
        assert_eq!(
            instance_api_version(vk::make_api_version(0, 1, 1, 130)),
            Some(vk::API_VERSION_1_1)
        );
        assert_eq!(
            instance_api_version(vk::make_api_version(0, 1, 2, 198)),
            Some(vk::API_VERSION_1_2)
        );
        assert_eq!(
            instance_api_version(vk::make_api_version(0, 1, 3, 239)),
            Some(vk::API_VERSION_1_3)
        );
        assert_eq!(
            instance_api_version(vk::make_api_version(0, 1, 4, 300)),
            Some(vk::API_VERSION_1_3)
        );
    }

    #[test]
    fn maps_device_types() {
        use vk::PhysicalDeviceType as T;
        assert_eq!(device_type(T::DISCRETE_GPU), DeviceType::DiscreteGpu);
        assert_eq!(device_type(T::INTEGRATED_GPU), DeviceType::IntegratedGpu);
        assert_eq!(device_type(T::VIRTUAL_GPU), DeviceType::VirtualGpu);
        assert_eq!(device_type(T::CPU), DeviceType::Cpu);
        assert_eq!(device_type(T::OTHER), DeviceType::Other);
        assert_eq!(device_type(T::from_raw(99)), DeviceType::Other);
    }

    #[test]
    fn reads_c_strings() {
        assert_eq!(c_string(CStr::from_bytes_until_nul(b"radv\0\0\0")), "radv");
        assert_eq!(c_string(CStr::from_bytes_until_nul(b"no end")), "");
    }

    #[test]
    fn finds_extensions() {
        let mut ext = vk::ExtensionProperties::default();
        for (dst, src) in ext
            .extension_name
            .iter_mut()
            .zip(vk::EXT_MEMORY_BUDGET_NAME.to_bytes())
        {
            *dst = *src as std::ffi::c_char;
        }
        let list = [vk::ExtensionProperties::default(), ext];
        assert!(has_extension(&list, vk::EXT_MEMORY_BUDGET_NAME));
        assert!(!has_extension(&list, vk::EXT_EXTERNAL_MEMORY_HOST_NAME));
        assert!(!has_extension(&[], vk::EXT_MEMORY_BUDGET_NAME));
    }

    fn two_heaps() -> vk::PhysicalDeviceMemoryProperties {
        let mut memory = vk::PhysicalDeviceMemoryProperties {
            memory_heap_count: 2,
            ..Default::default()
        };
        memory.memory_heaps[0] = vk::MemoryHeap {
            size: 8 << 30,
            flags: vk::MemoryHeapFlags::DEVICE_LOCAL,
        };
        memory.memory_heaps[1] = vk::MemoryHeap {
            size: 32 << 30,
            flags: vk::MemoryHeapFlags::empty(),
        };
        memory
    }

    #[test]
    fn maps_heaps_without_budget() {
        let heaps = heaps(&two_heaps(), None);
        assert_eq!(heaps.len(), 2);
        assert_eq!(heaps[0].size, 8 << 30);
        assert!(heaps[0].device_local);
        assert!(!heaps[1].device_local);
        assert!(heaps
            .iter()
            .all(|h| h.budget.is_none() && h.usage.is_none()));
    }

    #[test]
    fn maps_heaps_with_budget() {
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        budget.heap_budget[0] = 7 << 30;
        budget.heap_usage[0] = 1 << 20;
        budget.heap_budget[1] = 20 << 30;
        let heaps = heaps(&two_heaps(), Some(&budget));
        assert_eq!(heaps[0].budget, Some(7 << 30));
        assert_eq!(heaps[0].usage, Some(1 << 20));
        assert_eq!(heaps[1].budget, Some(20 << 30));
        assert_eq!(heaps[1].usage, Some(0));
    }

    #[test]
    fn maps_limits() {
        let core = vk::PhysicalDeviceLimits {
            max_storage_buffer_range: u32::MAX,
            max_compute_shared_memory_size: 65536,
            max_compute_work_group_invocations: 1024,
            ..Default::default()
        };
        let limits = limits(&core, Some(4 << 30), Some(64), Some(4096));
        assert_eq!(limits.max_memory_allocation_size, 4 << 30);
        assert_eq!(limits.max_storage_buffer_range, u64::from(u32::MAX));
        assert_eq!(limits.max_compute_shared_memory_size, 65536);
        assert_eq!(limits.max_compute_workgroup_invocations, 1024);
        assert_eq!(limits.subgroup_size, 64);
        assert_eq!(limits.min_imported_host_pointer_alignment, Some(4096));
    }

    #[test]
    fn limits_fall_back_when_unreported() {
        let limits = limits(&vk::PhysicalDeviceLimits::default(), None, None, None);
        assert_eq!(limits.max_memory_allocation_size, FALLBACK_MAX_ALLOCATION);
        assert_eq!(limits.subgroup_size, 1);
        assert_eq!(limits.min_imported_host_pointer_alignment, None);
        // A driver reporting zero still yields a usable subgroup size.
        let core = vk::PhysicalDeviceLimits::default();
        assert_eq!(super::limits(&core, None, Some(0), None).subgroup_size, 1);
    }
}
