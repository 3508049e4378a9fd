//! The calls into Vulkan that discovery needs.
//!
//! Everything unsafe about discovery lives here. The translation of what the
//! driver reports into this crate's types is in [`super::map`].

use ash::vk;

use super::map::{self, version_at_least};
use super::DeviceInfo;
use crate::error::VulkanError;

/// A Vulkan instance together with the loader it came from.
///
/// The instance is destroyed when this value is dropped, and the loader
/// library stays loaded until after that, because `entry` is dropped last.
pub(crate) struct Instance {
    pub(crate) instance: ash::Instance,
    /// The Vulkan version the instance was created with.
    pub(crate) api_version: u32,
    /// Keeps the loader library loaded for as long as `instance` is used.
    _entry: ash::Entry,
}

impl Instance {
    /// Loads the Vulkan loader and creates an instance asking for Vulkan 1.3,
    /// or the loader's own version when that is older (at least 1.1).
    pub(crate) fn new() -> Result<Self, VulkanError> {
        // SAFETY: loading libvulkan runs its library initialisers, which is
        // sound for the system Vulkan loader; the returned `Entry` keeps the
        // library loaded and is stored alongside everything loaded from it.
        let entry =
            unsafe { ash::Entry::load() }.map_err(|e| VulkanError::LoaderMissing(e.to_string()))?;

        // SAFETY: `entry` holds valid loader function pointers and the call
        // only writes to memory that ash owns.
        let loader_version = unsafe { entry.try_enumerate_instance_version() }
            .map_err(|r| VulkanError::from_vk("vkEnumerateInstanceVersion", r))?
            .unwrap_or(vk::API_VERSION_1_0);
        tracing::debug!(
            loader_version = %map::format_api_version(loader_version),
            "loaded the Vulkan loader"
        );
        let api_version =
            map::instance_api_version(loader_version).ok_or_else(|| VulkanError::Call {
                call: "vkEnumerateInstanceVersion",
                result: vk::Result::ERROR_INCOMPATIBLE_DRIVER.as_raw(),
                message: format!(
                    "the Vulkan loader supports only Vulkan {}; 1.1 or newer is required",
                    map::format_api_version(loader_version)
                ),
            })?;

        let app = vk::ApplicationInfo::default()
            .application_name(c"halo")
            .engine_name(c"halo-kernels")
            .api_version(api_version);
        let create_info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `create_info` and the `app` it points to are valid,
        // initialised structures that outlive the call; no layers or
        // extensions are requested. The returned instance is destroyed in
        // `Drop`, before `entry` is dropped.
        let instance = unsafe { entry.create_instance(&create_info, None) }
            .map_err(|r| VulkanError::from_vk("vkCreateInstance", r))?;
        tracing::debug!(
            api_version = %map::format_api_version(api_version),
            "created a Vulkan instance"
        );

        Ok(Self {
            instance,
            api_version,
            _entry: entry,
        })
    }

    /// Every physical device the instance can see, in Vulkan's order.
    pub(crate) fn physical_devices(&self) -> Result<Vec<vk::PhysicalDevice>, VulkanError> {
        // SAFETY: `self.instance` is a live instance (it is only destroyed in `Drop`).
        unsafe { self.instance.enumerate_physical_devices() }
            .map_err(|r| VulkanError::from_vk("vkEnumeratePhysicalDevices", r))
    }

    /// Asks the driver everything discovery reports about one device.
    pub(crate) fn describe(
        &self,
        index: usize,
        physical_device: vk::PhysicalDevice,
    ) -> Result<DeviceInfo, VulkanError> {
        // SAFETY: `physical_device` came from `physical_devices` on this live
        // instance; physical devices stay valid as long as their instance.
        let extensions = unsafe {
            self.instance
                .enumerate_device_extension_properties(physical_device)
        }
        .map_err(|r| VulkanError::from_vk("vkEnumerateDeviceExtensionProperties", r))?;
        let memory_budget_ext = map::has_extension(&extensions, vk::EXT_MEMORY_BUDGET_NAME);
        let external_memory_host =
            map::has_extension(&extensions, vk::EXT_EXTERNAL_MEMORY_HOST_NAME);
        let driver_properties_ext = map::has_extension(&extensions, vk::KHR_DRIVER_PROPERTIES_NAME);

        // SAFETY: as above, `physical_device` belongs to this live instance.
        let basic = unsafe {
            self.instance
                .get_physical_device_properties(physical_device)
        };
        // Vulkan 1.1 queries need both the instance and the device at 1.1;
        // the instance always is.
        let has_1_1 = version_at_least(basic.api_version, 1, 1);
        let has_1_2 =
            version_at_least(basic.api_version, 1, 2) && version_at_least(self.api_version, 1, 2);

        let mut max_allocation = None;
        let mut subgroup_size = None;
        let mut host_pointer_alignment = None;
        let mut driver_name = String::new();
        let mut driver_info = String::new();
        if has_1_1 {
            let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
            let mut maintenance3 = vk::PhysicalDeviceMaintenance3Properties::default();
            let mut driver = vk::PhysicalDeviceDriverProperties::default();
            let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
            let with_driver = has_1_2 || driver_properties_ext;
            let mut properties = vk::PhysicalDeviceProperties2::default()
                .push_next(&mut subgroup)
                .push_next(&mut maintenance3);
            if with_driver {
                properties = properties.push_next(&mut driver);
            }
            if external_memory_host {
                properties = properties.push_next(&mut host);
            }
            // SAFETY: `physical_device` belongs to this live instance, which
            // was created for Vulkan 1.1 or newer, and the device supports
            // 1.1. Every structure in the chain is valid for the device: the
            // subgroup and maintenance3 ones are core 1.1, the driver one is
            // only chained with 1.2 or VK_KHR_driver_properties, the host
            // memory one only with VK_EXT_external_memory_host. All of them
            // are initialised and outlive the call.
            unsafe {
                self.instance
                    .get_physical_device_properties2(physical_device, &mut properties)
            };
            max_allocation = Some(maintenance3.max_memory_allocation_size);
            subgroup_size = Some(subgroup.subgroup_size);
            if external_memory_host {
                host_pointer_alignment = Some(host.min_imported_host_pointer_alignment);
            }
            if with_driver {
                driver_name = map::c_string(driver.driver_name_as_c_str());
                driver_info = map::c_string(driver.driver_info_as_c_str());
            }
        }

        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let (memory, budget) = if has_1_1 && memory_budget_ext {
            let mut memory = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
            // SAFETY: `physical_device` belongs to this live 1.1 instance and
            // supports 1.1 and VK_EXT_memory_budget, so the budget structure
            // may be chained; both structures are initialised and outlive
            // the call.
            unsafe {
                self.instance
                    .get_physical_device_memory_properties2(physical_device, &mut memory)
            };
            (memory.memory_properties, Some(&budget))
        } else {
            // SAFETY: `physical_device` belongs to this live instance.
            let memory = unsafe {
                self.instance
                    .get_physical_device_memory_properties(physical_device)
            };
            (memory, None)
        };

        let name = map::c_string(basic.device_name_as_c_str());
        let mut limits = map::limits(
            &basic.limits,
            max_allocation,
            subgroup_size,
            host_pointer_alignment,
        );
        limits.max_loop_iterations = super::driver_loop_cap(&driver_name, &name);
        let info = DeviceInfo {
            index,
            name,
            device_type: map::device_type(basic.device_type),
            vendor_id: basic.vendor_id,
            device_id: basic.device_id,
            driver_name,
            driver_info,
            api_version: map::format_api_version(basic.api_version),
            driver_version: basic.driver_version,
            heaps: map::heaps(&memory, budget),
            limits,
            memory_budget_ext,
            external_memory_host,
        };
        tracing::debug!(
            index,
            name = %info.name,
            device_type = info.device_type.as_str(),
            vendor_id = format_args!("{:#06x}", info.vendor_id),
            device_id = format_args!("{:#06x}", info.device_id),
            driver = %info.driver_name,
            api_version = %info.api_version,
            heaps = info.heaps.len(),
            memory_budget_ext,
            external_memory_host,
            "found Vulkan device"
        );
        Ok(info)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: the instance was created by `Instance::new`, is destroyed
        // only here, and nothing created from it outlives this value: discovery
        // keeps no handles, and the runtime's `Shared` destroys its logical
        // device before dropping the `Instance` it owns.
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// Describes every physical device, in Vulkan's order.
///
/// Returns [`VulkanError::NoDevices`] when the loader finds none.
pub(crate) fn enumerate_devices() -> Result<Vec<DeviceInfo>, VulkanError> {
    let instance = Instance::new()?;
    let physical_devices = instance.physical_devices()?;
    if physical_devices.is_empty() {
        return Err(VulkanError::NoDevices);
    }
    physical_devices
        .into_iter()
        .enumerate()
        .map(|(index, device)| instance.describe(index, device))
        .collect()
}
