//! halo's Vulkan runtime.
//!
//! For now this crate finds the Vulkan devices on the machine and picks one
//! to run on ([`discover`]). The compute kernels will live here later.
//!
//! This is the only halo crate that uses `unsafe`: every call into Vulkan is
//! unsafe by nature. Each unsafe block carries a `SAFETY` comment that says
//! why it is sound, and raw Vulkan objects are owned by types that destroy
//! them when dropped.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod device;
pub mod error;

pub use device::*;
pub use error::VulkanError;
