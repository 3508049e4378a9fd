//! The error type for everything this crate does with Vulkan.

use ash::vk;

use crate::device::DEVICE_ENV;

/// Something went wrong while talking to Vulkan.
#[derive(Debug, thiserror::Error)]
pub enum VulkanError {
    /// The Vulkan loader library could not be opened.
    #[error(
        "no Vulkan loader (libvulkan.so.1) could be loaded: {0}; \
         install libvulkan1 and a driver such as mesa-vulkan-drivers"
    )]
    LoaderMissing(String),

    /// The loader works but reports no physical devices (no driver installed).
    #[error("the Vulkan loader found no devices; install a driver (mesa-vulkan-drivers)")]
    NoDevices,

    /// A device selector (usually from `HALO_VULKAN_DEVICE`) matched no device.
    #[error(
        "{DEVICE_ENV}={selector:?} matches no Vulkan device; \
         give an index or part of a name from: {}",
        .available.join(", ")
    )]
    NoMatch {
        /// What the caller asked for.
        selector: String,
        /// Every device, written as `"index: name"`.
        available: Vec<String>,
    },

    /// A Vulkan call failed.
    #[error("Vulkan call {call} failed: {message} (VkResult {result})")]
    Call {
        /// The Vulkan function that failed, such as `"vkCreateInstance"`.
        call: &'static str,
        /// The raw `VkResult` code.
        result: i32,
        /// What went wrong, in words.
        message: String,
    },

    /// The driver reported that the device was lost (reset, removed or hung).
    #[error("the Vulkan device was lost")]
    DeviceLost,

    /// The device lacks something halo needs (a Vulkan version, a feature).
    #[error("the Vulkan device {device:?} cannot run halo: {what}")]
    Unsupported {
        /// The device's name.
        device: String,
        /// What is missing.
        what: String,
    },

    /// A single allocation is larger than the device allows.
    #[error(
        "{what} needs {requested} bytes in one allocation but the device allows at most {limit}"
    )]
    TooLarge {
        /// What was being allocated.
        what: String,
        /// Bytes asked for.
        requested: u64,
        /// The device's maxMemoryAllocationSize (or another limit).
        limit: u64,
    },

    /// An operation was called with arguments that do not fit together (sizes, offsets).
    #[error("bad arguments to {op}: {message}")]
    BadArgument {
        /// The operation, such as `"add_f32"`.
        op: &'static str,
        /// What does not fit.
        message: String,
    },

    /// Importing host memory (a memory-mapped file) failed; callers fall back to copying.
    #[error("cannot import host memory: {0}")]
    HostImport(String),

    /// The host or the device ran out of memory.
    #[error("Vulkan ran out of host or device memory in {call}")]
    OutOfMemory {
        /// The Vulkan function that failed.
        call: &'static str,
    },
}

impl VulkanError {
    /// Turns the failed result of the Vulkan function `call` into an error.
    ///
    /// This is the one place where `VkResult` codes become [`VulkanError`]s.
    /// `vkCreateInstance` failing with `VK_ERROR_INCOMPATIBLE_DRIVER` means
    /// the loader found no driver at all, so it becomes [`VulkanError::NoDevices`].
    pub fn from_vk(call: &'static str, result: vk::Result) -> Self {
        match result {
            vk::Result::ERROR_DEVICE_LOST => Self::DeviceLost,
            vk::Result::ERROR_OUT_OF_HOST_MEMORY | vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => {
                Self::OutOfMemory { call }
            }
            vk::Result::ERROR_INCOMPATIBLE_DRIVER if call == "vkCreateInstance" => Self::NoDevices,
            other => {
                let name = format!("{other:?}");
                let description = other.to_string();
                let message = if description == name {
                    name
                } else {
                    format!("{name}: {description}")
                };
                Self::Call {
                    call,
                    result: other.as_raw(),
                    message,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_device_lost_and_out_of_memory() {
        assert!(matches!(
            VulkanError::from_vk("vkQueueSubmit", vk::Result::ERROR_DEVICE_LOST),
            VulkanError::DeviceLost
        ));
        assert!(matches!(
            VulkanError::from_vk("vkAllocateMemory", vk::Result::ERROR_OUT_OF_DEVICE_MEMORY),
            VulkanError::OutOfMemory {
                call: "vkAllocateMemory"
            }
        ));
        assert!(matches!(
            VulkanError::from_vk("vkCreateInstance", vk::Result::ERROR_OUT_OF_HOST_MEMORY),
            VulkanError::OutOfMemory { .. }
        ));
    }

    #[test]
    fn maps_missing_driver_at_instance_creation() {
        assert!(matches!(
            VulkanError::from_vk("vkCreateInstance", vk::Result::ERROR_INCOMPATIBLE_DRIVER),
            VulkanError::NoDevices
        ));
        assert!(matches!(
            VulkanError::from_vk("vkCreateDevice", vk::Result::ERROR_INCOMPATIBLE_DRIVER),
            VulkanError::Call { .. }
        ));
    }

    #[test]
    fn other_results_keep_code_and_name() {
        let err = VulkanError::from_vk(
            "vkEnumeratePhysicalDevices",
            vk::Result::ERROR_INITIALIZATION_FAILED,
        );
        match &err {
            VulkanError::Call {
                call,
                result,
                message,
            } => {
                assert_eq!(*call, "vkEnumeratePhysicalDevices");
                assert_eq!(*result, -3);
                assert!(
                    message.starts_with("ERROR_INITIALIZATION_FAILED"),
                    "{message}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("vkEnumeratePhysicalDevices"), "{text}");
        assert!(text.contains("-3"), "{text}");
    }

    #[test]
    fn no_match_lists_devices() {
        let err = VulkanError::NoMatch {
            selector: "radeon".into(),
            available: vec![
                "0: llvmpipe (LLVM 15.0.6, 256 bits)".into(),
                "1: other".into(),
            ],
        };
        assert_eq!(
            err.to_string(),
            "HALO_VULKAN_DEVICE=\"radeon\" matches no Vulkan device; give an index or part \
             of a name from: 0: llvmpipe (LLVM 15.0.6, 256 bits), 1: other"
        );
    }
}
