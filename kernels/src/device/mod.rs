//! Finding the Vulkan devices on this machine and choosing one to run on.
//!
//! [`discover`] asks Vulkan about every physical device and picks one, either
//! the one a selector names or the best by type. The choice itself
//! ([`choose`]) and the translation of Vulkan's structures are plain
//! functions, so they can be tested without a GPU; only the private `vulkan`
//! module calls into the driver.

mod map;
pub(crate) mod vulkan;

pub use map::format_api_version;

use crate::error::VulkanError;

/// The environment variable that picks a Vulkan device: an index such as `1`
/// or part of a device name such as `radeon` (case does not matter).
pub const DEVICE_ENV: &str = "HALO_VULKAN_DEVICE";

/// The kind of a physical device, as Vulkan reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    /// A separate graphics card with its own memory.
    DiscreteGpu,
    /// A GPU built into the processor, sharing system memory.
    IntegratedGpu,
    /// A GPU seen through a virtual machine.
    VirtualGpu,
    /// A software implementation running on the CPU, such as llvmpipe.
    Cpu,
    /// Anything else.
    Other,
}

impl DeviceType {
    /// A short lowercase name: `"discrete-gpu"`, `"integrated-gpu"`,
    /// `"virtual-gpu"`, `"cpu"` or `"other"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DiscreteGpu => "discrete-gpu",
            Self::IntegratedGpu => "integrated-gpu",
            Self::VirtualGpu => "virtual-gpu",
            Self::Cpu => "cpu",
            Self::Other => "other",
        }
    }

    /// How much this kind of device is preferred; lower is better.
    fn rank(self) -> u8 {
        match self {
            Self::DiscreteGpu => 0,
            Self::IntegratedGpu => 1,
            Self::VirtualGpu => 2,
            Self::Cpu => 3,
            Self::Other => 4,
        }
    }
}

impl std::fmt::Display for DeviceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One memory heap of a device.
#[derive(Clone, Debug)]
pub struct HeapInfo {
    /// The heap's size in bytes.
    pub size: u64,
    /// Whether the heap is the device's own fast memory.
    pub device_local: bool,
    /// How many bytes this process may use from the heap right now, when the
    /// device has `VK_EXT_memory_budget`.
    pub budget: Option<u64>,
    /// How many bytes this process already uses from the heap, when the
    /// device has `VK_EXT_memory_budget`.
    pub usage: Option<u64>,
}

/// The device limits that matter for running compute kernels.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest single memory allocation, in bytes.
    pub max_memory_allocation_size: u64,
    /// The largest range of a storage buffer that one descriptor can bind, in bytes.
    pub max_storage_buffer_range: u64,
    /// The shared memory available to one compute workgroup, in bytes.
    pub max_compute_shared_memory_size: u32,
    /// The most invocations (threads) in one compute workgroup.
    pub max_compute_workgroup_invocations: u32,
    /// The default number of invocations in a subgroup (wave or warp).
    pub subgroup_size: u32,
    /// The alignment a host pointer needs before it can be imported as device
    /// memory; present only when the device has `VK_EXT_external_memory_host`.
    pub min_imported_host_pointer_alignment: Option<u64>,
    /// The most loop iterations one shader invocation may run, where the driver caps them;
    /// `None` where it does not. Vulkan does not report this: it is a known driver quirk.
    /// llvmpipe (lavapipe) counts every loop back-edge of an invocation, all loops together,
    /// and past 65 535 makes every loop exit after one more iteration, so a kernel that loops
    /// longer silently computes garbage. Kernels whose trip counts grow with the input split
    /// their work into dispatches that stay under it (see `ops::seq_attention`).
    pub max_loop_iterations: Option<u64>,
}

/// llvmpipe's `LP_MAX_TGSI_LOOP_ITERATIONS`.
pub const LLVMPIPE_MAX_LOOP_ITERATIONS: u64 = 65_535;

/// The loop cap of a device by its driver and name (see [`Limits::max_loop_iterations`]).
pub fn driver_loop_cap(driver_name: &str, device_name: &str) -> Option<u64> {
    let llvmpipe =
        driver_name.eq_ignore_ascii_case("llvmpipe") || device_name.starts_with("llvmpipe");
    llvmpipe.then_some(LLVMPIPE_MAX_LOOP_ITERATIONS)
}

/// What discovery learned about one physical device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's position in Vulkan's device list; what an index selector refers to.
    pub index: usize,
    /// The device's name, such as `"AMD Radeon Graphics (RADV GFX1151)"`.
    pub name: String,
    /// The kind of device.
    pub device_type: DeviceType,
    /// The PCI vendor id (`0x1002` for AMD).
    pub vendor_id: u32,
    /// The vendor's id for this device.
    pub device_id: u32,
    /// The driver's name, such as `"radv"`; empty when the device cannot say.
    pub driver_name: String,
    /// Free-form driver details, such as the Mesa version; empty when the device cannot say.
    pub driver_info: String,
    /// The Vulkan version the device supports, such as `"1.3.255"`.
    pub api_version: String,
    /// The driver's version number, encoded as the vendor chooses.
    pub driver_version: u32,
    /// The device's memory heaps, in Vulkan's order.
    pub heaps: Vec<HeapInfo>,
    /// The limits that matter for compute.
    pub limits: Limits,
    /// Whether the device has `VK_EXT_memory_budget`.
    pub memory_budget_ext: bool,
    /// Whether the device has `VK_EXT_external_memory_host`.
    pub external_memory_host: bool,
}

impl DeviceInfo {
    /// Whether the device shares memory with the CPU (an integrated GPU or a CPU device).
    pub fn is_uma(&self) -> bool {
        matches!(
            self.device_type,
            DeviceType::IntegratedGpu | DeviceType::Cpu
        )
    }

    /// Whether the device is made by AMD (PCI vendor `0x1002`).
    pub fn is_amd(&self) -> bool {
        self.vendor_id == AMD_VENDOR_ID
    }
}

const AMD_VENDOR_ID: u32 = 0x1002;

/// Every device that was found, and which one was chosen.
#[derive(Clone, Debug)]
pub struct Discovery {
    /// Every physical device, in Vulkan's order.
    pub devices: Vec<DeviceInfo>,
    /// The position in `devices` of the chosen device.
    pub chosen: usize,
}

impl Discovery {
    /// The chosen device.
    pub fn device(&self) -> &DeviceInfo {
        &self.devices[self.chosen]
    }
}

/// Enumerate every physical device and choose one: `selector` (index like "1"
/// or a case-insensitive name substring) when given, else the best by type:
/// discrete > integrated > virtual > cpu > other (ties: lower index).
///
/// The selector usually comes from [`DEVICE_ENV`]; this function does not read
/// the environment itself. See [`choose`] for the exact selection rules.
///
/// This loads the Vulkan loader at run time and creates a Vulkan instance for
/// the duration of the call; it creates no logical device.
pub fn discover(selector: Option<&str>) -> Result<Discovery, VulkanError> {
    let devices = vulkan::enumerate_devices()?;
    let chosen = choose(&devices, selector)?;
    let device = &devices[chosen];
    tracing::debug!(
        index = device.index,
        name = %device.name,
        device_type = device.device_type.as_str(),
        selector = selector.unwrap_or(""),
        "chose Vulkan device"
    );
    Ok(Discovery { devices, chosen })
}

/// Chooses a device from `devices` and returns its position in the slice.
///
/// With no selector (or a blank one) the best device by type wins: discrete >
/// integrated > virtual > cpu > other, and among equals the lower index.
///
/// A selector that is a number picks the device with that index. Any other
/// selector, or a number that is no device's index, is matched as a
/// case-insensitive substring of the device names; when several names match,
/// the best by type wins as above.
///
/// Returns [`VulkanError::NoDevices`] for an empty list and
/// [`VulkanError::NoMatch`], listing every device, when nothing matches.
pub fn choose(devices: &[DeviceInfo], selector: Option<&str>) -> Result<usize, VulkanError> {
    if devices.is_empty() {
        return Err(VulkanError::NoDevices);
    }
    let best = |candidates: &mut dyn Iterator<Item = (usize, &DeviceInfo)>| {
        candidates
            .min_by_key(|(_, d)| (d.device_type.rank(), d.index))
            .map(|(pos, _)| pos)
    };

    let selector = selector.map(str::trim).filter(|s| !s.is_empty());
    let Some(selector) = selector else {
        return best(&mut devices.iter().enumerate()).ok_or(VulkanError::NoDevices);
    };

    if let Ok(index) = selector.parse::<usize>() {
        if let Some(pos) = devices.iter().position(|d| d.index == index) {
            return Ok(pos);
        }
    }

    let needle = selector.to_lowercase();
    best(
        &mut devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.name.to_lowercase().contains(&needle)),
    )
    .ok_or_else(|| VulkanError::NoMatch {
        selector: selector.to_owned(),
        available: devices
            .iter()
            .map(|d| format!("{}: {}", d.index, d.name))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_llvmpipe_caps_loops() {
        assert_eq!(
            driver_loop_cap("llvmpipe", "llvmpipe (LLVM 15.0.6, 256 bits)"),
            Some(LLVMPIPE_MAX_LOOP_ITERATIONS)
        );
        // A driver that does not report its name is still known by the device's.
        assert_eq!(
            driver_loop_cap("", "llvmpipe (LLVM 15.0.6, 256 bits)"),
            Some(LLVMPIPE_MAX_LOOP_ITERATIONS)
        );
        assert_eq!(
            driver_loop_cap("radv", "AMD Radeon Graphics (RADV GFX1151)"),
            None
        );
        assert_eq!(driver_loop_cap("NVIDIA", "NVIDIA H200"), None);
    }

    fn device(index: usize, name: &str, device_type: DeviceType) -> DeviceInfo {
        DeviceInfo {
            index,
            name: name.to_owned(),
            device_type,
            vendor_id: 0,
            device_id: 0,
            driver_name: String::new(),
            driver_info: String::new(),
            api_version: "1.3.0".to_owned(),
            driver_version: 0,
            heaps: Vec::new(),
            limits: Limits {
                max_memory_allocation_size: 1 << 30,
                max_storage_buffer_range: 1 << 27,
                max_compute_shared_memory_size: 32768,
                max_compute_workgroup_invocations: 1024,
                subgroup_size: 32,
                min_imported_host_pointer_alignment: None,
                max_loop_iterations: None,
            },
            memory_budget_ext: false,
            external_memory_host: false,
        }
    }

    fn typical() -> Vec<DeviceInfo> {
        vec![
            device(0, "llvmpipe (LLVM 15.0.6, 256 bits)", DeviceType::Cpu),
            device(
                1,
                "AMD Radeon Graphics (RADV GFX1151)",
                DeviceType::IntegratedGpu,
            ),
            device(2, "Virtio-GPU Venus", DeviceType::VirtualGpu),
        ]
    }

    #[test]
    fn ranks_by_type_without_selector() {
        assert_eq!(choose(&typical(), None).unwrap(), 1);

        let mut devices = typical();
        devices.push(device(3, "Radeon RX 7900 XTX", DeviceType::DiscreteGpu));
        assert_eq!(choose(&devices, None).unwrap(), 3);

        let devices = vec![
            device(0, "mystery", DeviceType::Other),
            device(1, "llvmpipe", DeviceType::Cpu),
            device(2, "venus", DeviceType::VirtualGpu),
        ];
        assert_eq!(choose(&devices, None).unwrap(), 2);

        let devices = vec![
            device(0, "mystery", DeviceType::Other),
            device(1, "llvmpipe", DeviceType::Cpu),
        ];
        assert_eq!(choose(&devices, None).unwrap(), 1);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let devices = vec![
            device(0, "llvmpipe", DeviceType::Cpu),
            device(1, "gpu a", DeviceType::DiscreteGpu),
            device(2, "gpu b", DeviceType::DiscreteGpu),
        ];
        assert_eq!(choose(&devices, None).unwrap(), 1);
        assert_eq!(choose(&devices, Some("gpu")).unwrap(), 1);
    }

    #[test]
    fn blank_selector_means_none() {
        assert_eq!(choose(&typical(), Some("")).unwrap(), 1);
        assert_eq!(choose(&typical(), Some("   ")).unwrap(), 1);
    }

    #[test]
    fn index_selector_picks_that_device() {
        assert_eq!(choose(&typical(), Some("0")).unwrap(), 0);
        assert_eq!(choose(&typical(), Some("2")).unwrap(), 2);
        assert_eq!(choose(&typical(), Some(" 1 ")).unwrap(), 1);
    }

    #[test]
    fn name_selector_is_case_insensitive_substring() {
        assert_eq!(choose(&typical(), Some("LLVMPIPE")).unwrap(), 0);
        assert_eq!(choose(&typical(), Some("radv")).unwrap(), 1);
        assert_eq!(choose(&typical(), Some("venus")).unwrap(), 2);
    }

    #[test]
    fn number_that_is_no_index_matches_names() {
        let mut devices = typical();
        devices.push(device(3, "Radeon RX 7900 XTX", DeviceType::DiscreteGpu));
        assert_eq!(choose(&devices, Some("7900")).unwrap(), 3);
    }

    #[test]
    fn out_of_range_index_lists_devices() {
        match choose(&typical(), Some("7")) {
            Err(VulkanError::NoMatch {
                selector,
                available,
            }) => {
                assert_eq!(selector, "7");
                assert_eq!(
                    available,
                    vec![
                        "0: llvmpipe (LLVM 15.0.6, 256 bits)",
                        "1: AMD Radeon Graphics (RADV GFX1151)",
                        "2: Virtio-GPU Venus",
                    ]
                );
            }
            other => panic!("expected NoMatch, got {other:?}"),
        }
    }

    #[test]
    fn unknown_name_lists_devices() {
        let err = choose(&typical(), Some("nvidia")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("HALO_VULKAN_DEVICE=\"nvidia\""), "{text}");
        assert!(
            text.contains("0: llvmpipe (LLVM 15.0.6, 256 bits)"),
            "{text}"
        );
        assert!(text.contains("2: Virtio-GPU Venus"), "{text}");
        assert!(matches!(err, VulkanError::NoMatch { ref available, .. } if available.len() == 3));
    }

    #[test]
    fn empty_list_is_no_devices() {
        assert!(matches!(choose(&[], None), Err(VulkanError::NoDevices)));
        assert!(matches!(
            choose(&[], Some("0")),
            Err(VulkanError::NoDevices)
        ));
    }

    #[test]
    fn device_helpers() {
        let mut d = device(0, "x", DeviceType::IntegratedGpu);
        assert!(d.is_uma());
        d.device_type = DeviceType::Cpu;
        assert!(d.is_uma());
        d.device_type = DeviceType::DiscreteGpu;
        assert!(!d.is_uma());
        assert!(!d.is_amd());
        d.vendor_id = 0x1002;
        assert!(d.is_amd());
    }

    #[test]
    fn device_type_names() {
        assert_eq!(DeviceType::DiscreteGpu.as_str(), "discrete-gpu");
        assert_eq!(DeviceType::IntegratedGpu.as_str(), "integrated-gpu");
        assert_eq!(DeviceType::VirtualGpu.as_str(), "virtual-gpu");
        assert_eq!(DeviceType::Cpu.as_str(), "cpu");
        assert_eq!(DeviceType::Other.to_string(), "other");
    }

    #[test]
    fn discovery_returns_chosen_device() {
        let discovery = Discovery {
            devices: typical(),
            chosen: 2,
        };
        assert_eq!(discovery.device().name, "Virtio-GPU Venus");
    }
}
