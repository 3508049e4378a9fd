//! The logical device: one per process, shared by every stream and buffer through `Arc<Shared>`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ash::vk;

use super::memory::{Allocator, Ledger};
use super::pipeline::Pipelines;
use crate::device::vulkan::Instance;
use crate::device::{choose, DeviceInfo};
use crate::error::VulkanError;

/// Optional device features halo's kernels use when the device has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// 16-bit float arithmetic in shaders.
    pub shader_float16: bool,
    /// 8-bit integer arithmetic in shaders.
    pub shader_int8: bool,
    /// 8-bit loads and stores from storage buffers.
    pub storage_8bit: bool,
    /// 16-bit loads and stores from storage buffers.
    pub storage_16bit: bool,
    /// Pipelines may require full subgroups (Vulkan 1.3 subgroup size control).
    pub full_subgroups: bool,
    /// VK_EXT_external_memory_host: memory-mapped files can be imported without a copy.
    pub host_import: bool,
}

/// State every stream and buffer of a device shares.
///
/// Field order matters for drop: `Drop` destroys the Vulkan objects explicitly, then the
/// `Instance` (declared last) is dropped, destroying the instance after the device.
pub(crate) struct Shared {
    pub(crate) device: ash::Device,
    pub(crate) info: DeviceInfo,
    pub(crate) features: Features,
    pub(crate) queue_family: u32,
    /// Nanoseconds per timestamp tick; `None` when the queue cannot write timestamps.
    pub(crate) timestamp_period: Option<f32>,
    pub(crate) allocator: Mutex<Allocator>,
    pub(crate) pipelines: Mutex<Pipelines>,
    pub(crate) host_memory: Option<ash::ext::external_memory_host::Device>,
    queue: Mutex<Queue>,
    lost: AtomicBool,
    pipeline_cache_path: Option<PathBuf>,
    /// Kept only so the instance outlives the device (dropped after `Drop::drop`).
    _instance: Instance,
}

struct Queue {
    queue: vk::Queue,
    timeline: vk::Semaphore,
    /// The value the last submission signals.
    last: u64,
}

/// Opening options.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Index or name substring (as `HALO_VULKAN_DEVICE`); `None` picks the best device.
    pub selector: Option<String>,
    /// Folder for the persisted pipeline cache (e.g. the daemon's state directory).
    pub pipeline_cache_dir: Option<PathBuf>,
}

/// halo's Vulkan device: a logical device on the chosen GPU, its compute queue, the memory
/// allocator with its owner ledger, and the compiled pipelines. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.shared.info.name)
            .field("features", &self.shared.features)
            .finish()
    }
}

impl Device {
    /// Opens the device `options.selector` picks (or the best one).
    pub fn open(options: &DeviceOptions) -> Result<Device, VulkanError> {
        let instance = Instance::new()?;
        let physical = instance.physical_devices()?;
        if physical.is_empty() {
            return Err(VulkanError::NoDevices);
        }
        let infos = physical
            .iter()
            .enumerate()
            .map(|(i, &p)| instance.describe(i, p))
            .collect::<Result<Vec<_>, _>>()?;
        let chosen = choose(&infos, options.selector.as_deref())?;
        let info = infos[chosen].clone();
        let pdev = physical[chosen];
        let unsupported = |what: &str| VulkanError::Unsupported {
            device: info.name.clone(),
            what: what.to_string(),
        };
        let raw = &instance.instance;
        // SAFETY: `pdev` came from this live instance.
        let props = unsafe { raw.get_physical_device_properties(pdev) };
        if props.api_version < vk::API_VERSION_1_2 || instance.api_version < vk::API_VERSION_1_2 {
            return Err(unsupported("Vulkan 1.2 or newer is required"));
        }
        let has_1_3 =
            props.api_version >= vk::API_VERSION_1_3 && instance.api_version >= vk::API_VERSION_1_3;

        // SAFETY: `pdev` came from this live instance.
        let families = unsafe { raw.get_physical_device_queue_family_properties(pdev) };
        let queue_family =
            pick_queue_family(&families).ok_or_else(|| unsupported("no compute queue"))?;
        // Nanoseconds per timestamp tick, when the queue can write timestamps.
        let timestamp_period = (families[queue_family as usize].timestamp_valid_bits > 0
            && props.limits.timestamp_compute_and_graphics != 0)
            .then_some(props.limits.timestamp_period);

        // What the device has.
        let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        {
            let mut all = vk::PhysicalDeviceFeatures2::default()
                .push_next(&mut f11)
                .push_next(&mut f12);
            if has_1_3 {
                all = all.push_next(&mut f13);
            }
            // SAFETY: the chain holds structures valid for a 1.2 (or 1.3 when chained) device
            // and instance; all outlive the call.
            unsafe { raw.get_physical_device_features2(pdev, &mut all) };
            if all.features.shader_int64 == vk::FALSE {
                return Err(unsupported("shaderInt64 is required"));
            }
        }
        if f12.buffer_device_address == vk::FALSE {
            return Err(unsupported("bufferDeviceAddress is required"));
        }
        if f12.timeline_semaphore == vk::FALSE {
            return Err(unsupported("timeline semaphores are required"));
        }

        // SAFETY: `pdev` came from this live instance.
        let extensions = unsafe { raw.enumerate_device_extension_properties(pdev) }
            .map_err(|r| VulkanError::from_vk("vkEnumerateDeviceExtensionProperties", r))?;
        let host_import = extensions
            .iter()
            .any(|e| e.extension_name_as_c_str().ok() == Some(vk::EXT_EXTERNAL_MEMORY_HOST_NAME));
        let features = Features {
            shader_float16: f12.shader_float16 != 0,
            shader_int8: f12.shader_int8 != 0,
            storage_8bit: f12.storage_buffer8_bit_access != 0,
            storage_16bit: f11.storage_buffer16_bit_access != 0,
            full_subgroups: has_1_3
                && f13.compute_full_subgroups != 0
                && f13.subgroup_size_control != 0,
            host_import,
        };

        // What we turn on.
        let mut e11 = vk::PhysicalDeviceVulkan11Features::default()
            .storage_buffer16_bit_access(features.storage_16bit);
        let mut e12 = vk::PhysicalDeviceVulkan12Features::default()
            .buffer_device_address(true)
            .timeline_semaphore(true)
            .shader_float16(features.shader_float16)
            .shader_int8(features.shader_int8)
            .storage_buffer8_bit_access(features.storage_8bit);
        let mut e13 = vk::PhysicalDeviceVulkan13Features::default()
            .subgroup_size_control(features.full_subgroups)
            .compute_full_subgroups(features.full_subgroups);
        let base = vk::PhysicalDeviceFeatures::default().shader_int64(true);
        let mut enabled = vk::PhysicalDeviceFeatures2::default()
            .features(base)
            .push_next(&mut e11)
            .push_next(&mut e12);
        if has_1_3 {
            enabled = enabled.push_next(&mut e13);
        }
        let priorities = [1.0f32];
        let queue_info = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(queue_family)
            .queue_priorities(&priorities)];
        let ext_names: Vec<*const std::ffi::c_char> = if host_import {
            vec![vk::EXT_EXTERNAL_MEMORY_HOST_NAME.as_ptr()]
        } else {
            Vec::new()
        };
        let create = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_info)
            .enabled_extension_names(&ext_names)
            .push_next(&mut enabled);
        // SAFETY: every structure in `create` is initialised and outlives the call; each
        // enabled feature was reported as supported above, and the extension is present.
        let device = unsafe { raw.create_device(pdev, &create, None) }
            .map_err(|r| VulkanError::from_vk("vkCreateDevice", r))?;

        // From here on, `device` must be destroyed on error; `finish_open` takes it over.
        finish_open(
            instance,
            pdev,
            device,
            info,
            features,
            queue_family,
            timestamp_period,
            options,
        )
    }

    /// What discovery knows about this device (name, limits, heaps).
    pub fn info(&self) -> &DeviceInfo {
        &self.shared.info
    }

    /// Optional features the device turned on.
    pub fn features(&self) -> Features {
        self.shared.features
    }

    /// Bytes allocated per owner, and in total.
    pub fn ledger(&self) -> Ledger {
        self.shared.allocator().ledger()
    }

    /// Starts recording the most device memory `owner` holds (from what it holds now): a
    /// job's actual peak, for comparing with its estimate.
    pub fn watch_peak(&self, owner: super::memory::OwnerId) {
        self.shared.allocator().watch_peak(owner)
    }

    /// The most `owner` held since [`Self::watch_peak`]; `None` if it is not watched.
    pub fn peak(&self, owner: super::memory::OwnerId) -> Option<u64> {
        self.shared.allocator().peak(owner)
    }

    /// Like [`Self::peak`], and stops watching `owner`.
    pub fn take_peak(&self, owner: super::memory::OwnerId) -> Option<u64> {
        self.shared.allocator().take_peak(owner)
    }

    /// Writes the pipeline cache to disk now (it is also written when the device closes).
    pub fn save_pipeline_cache(&self) -> Result<(), VulkanError> {
        self.shared.save_pipeline_cache()
    }
}

fn pick_queue_family(families: &[vk::QueueFamilyProperties]) -> Option<u32> {
    // A compute-only family (async compute) first, else any family with compute.
    let compute = |f: &vk::QueueFamilyProperties| f.queue_flags.contains(vk::QueueFlags::COMPUTE);
    families
        .iter()
        .position(|f| compute(f) && !f.queue_flags.contains(vk::QueueFlags::GRAPHICS))
        .or_else(|| families.iter().position(compute))
        .map(|i| i as u32)
}

#[allow(clippy::too_many_arguments)]
fn finish_open(
    instance: Instance,
    pdev: vk::PhysicalDevice,
    device: ash::Device,
    info: DeviceInfo,
    features: Features,
    queue_family: u32,
    timestamp_period: Option<f32>,
    options: &DeviceOptions,
) -> Result<Device, VulkanError> {
    let destroy_device = |device: &ash::Device| {
        // SAFETY: nothing created from `device` is alive at the points this is called.
        unsafe { device.destroy_device(None) }
    };
    // SAFETY: `pdev` came from this live instance.
    let memory_properties = unsafe {
        instance
            .instance
            .get_physical_device_memory_properties(pdev)
    };
    // SAFETY: the device was created with one queue in `queue_family`.
    let queue = unsafe { device.get_device_queue(queue_family, 0) };
    let mut type_info = vk::SemaphoreTypeCreateInfo::default()
        .semaphore_type(vk::SemaphoreType::TIMELINE)
        .initial_value(0);
    let sem_info = vk::SemaphoreCreateInfo::default().push_next(&mut type_info);
    // SAFETY: timeline semaphores were enabled on this device; the info outlives the call.
    let timeline = match unsafe { device.create_semaphore(&sem_info, None) } {
        Ok(s) => s,
        Err(r) => {
            destroy_device(&device);
            return Err(VulkanError::from_vk("vkCreateSemaphore", r));
        }
    };
    let cache_path = options.pipeline_cache_dir.as_ref().map(|dir| {
        dir.join(format!(
            "pipeline-cache-{:04x}-{:04x}-{:08x}.bin",
            info.vendor_id, info.device_id, info.driver_version
        ))
    });
    let pipelines = match Pipelines::new(&device, cache_path.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            // SAFETY: the semaphore is unused.
            unsafe { device.destroy_semaphore(timeline, None) };
            destroy_device(&device);
            return Err(e);
        }
    };
    let host_memory = features
        .host_import
        .then(|| ash::ext::external_memory_host::Device::new(&instance.instance, &device));
    let allocator = Allocator::new(&info, &memory_properties);
    tracing::info!(device = %info.name, ?features, "opened Vulkan device");
    Ok(Device {
        shared: Arc::new(Shared {
            device,
            info,
            features,
            queue_family,
            timestamp_period,
            allocator: Mutex::new(allocator),
            pipelines: Mutex::new(pipelines),
            host_memory,
            queue: Mutex::new(Queue {
                queue,
                timeline,
                last: 0,
            }),
            lost: AtomicBool::new(false),
            pipeline_cache_path: cache_path,
            _instance: instance,
        }),
    })
}

impl Shared {
    pub(crate) fn allocator(&self) -> MutexGuard<'_, Allocator> {
        // A panic while holding the lock cannot leave the allocator half-updated in a way that
        // matters more than refusing all further work would, so poisoning is ignored.
        self.allocator.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn pipelines(&self) -> MutexGuard<'_, Pipelines> {
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps a failed call to an error, remembering a lost device so later calls fail fast.
    pub(crate) fn check(&self, call: &'static str, r: vk::Result) -> VulkanError {
        if r == vk::Result::ERROR_DEVICE_LOST {
            self.lost.store(true, Ordering::SeqCst);
        }
        VulkanError::from_vk(call, r)
    }

    pub(crate) fn ensure_alive(&self) -> Result<(), VulkanError> {
        if self.lost.load(Ordering::SeqCst) {
            Err(VulkanError::DeviceLost)
        } else {
            Ok(())
        }
    }

    /// Submits a recorded command buffer; returns the timeline value that marks its completion.
    pub(crate) fn submit(&self, cmd: vk::CommandBuffer) -> Result<u64, VulkanError> {
        self.ensure_alive()?;
        let mut q = self.queue();
        let value = q.last + 1;
        let values = [value];
        let sems = [q.timeline];
        let cmds = [cmd];
        let mut timeline =
            vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&values);
        let submit = vk::SubmitInfo::default()
            .command_buffers(&cmds)
            .signal_semaphores(&sems)
            .push_next(&mut timeline);
        // SAFETY: the queue is externally synchronised by the mutex we hold; `cmd` is a
        // finished primary command buffer from a pool of this device; the timeline value is
        // larger than every value signalled before (we hold the lock that orders them).
        unsafe {
            self.device
                .queue_submit(q.queue, &[submit], vk::Fence::null())
        }
        .map_err(|r| self.check("vkQueueSubmit", r))?;
        q.last = value;
        Ok(value)
    }

    /// Waits until the timeline reaches `value`.
    pub(crate) fn wait(&self, value: u64, timeout: Duration) -> Result<(), VulkanError> {
        let sem = self.queue().timeline;
        let sems = [sem];
        let values = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&sems)
            .values(&values);
        // SAFETY: the semaphore belongs to this device and lives as long as `self`.
        match unsafe {
            self.device
                .wait_semaphores(&info, timeout.as_nanos() as u64)
        } {
            Ok(()) => Ok(()),
            Err(vk::Result::TIMEOUT) => Err(VulkanError::Call {
                call: "vkWaitSemaphores",
                result: vk::Result::TIMEOUT.as_raw(),
                message: format!("the GPU did not finish within {timeout:?}"),
            }),
            Err(r) => Err(self.check("vkWaitSemaphores", r)),
        }
    }

    /// The last timeline value the GPU has reached.
    pub(crate) fn completed(&self) -> Result<u64, VulkanError> {
        let sem = self.queue().timeline;
        // SAFETY: the semaphore belongs to this device and lives as long as `self`.
        unsafe { self.device.get_semaphore_counter_value(sem) }
            .map_err(|r| self.check("vkGetSemaphoreCounterValue", r))
    }

    fn save_pipeline_cache(&self) -> Result<(), VulkanError> {
        if let Some(path) = &self.pipeline_cache_path {
            self.pipelines().save(&self.device, path)?;
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Err(e) = self.save_pipeline_cache() {
            tracing::warn!(error = %e, "could not save the pipeline cache");
        }
        // SAFETY: every stream and buffer holds an `Arc<Shared>`, so none is alive now and no
        // work is pending except what the driver still runs; waiting for idle makes destroying
        // the objects below sound. The queue's semaphore, the pipelines and the allocator's
        // memory all belong to this device, and the device is destroyed last, before the
        // instance (dropped after this function returns).
        unsafe {
            let _ = self.device.device_wait_idle();
            self.pipelines().destroy(&self.device);
            self.allocator().destroy(&self.device);
            let q = self.queue();
            self.device.destroy_semaphore(q.timeline, None);
            drop(q);
            self.device.destroy_device(None);
        }
    }
}
