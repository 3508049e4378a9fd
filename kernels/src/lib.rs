//! halo's Vulkan runtime.
//!
//! Device discovery ([`discover`]), the runtime ([`Device`], [`Buffer`],
//! [`Stream`]), the compute kernels compiled from `shaders/` ([`KernelId`]),
//! typed ops over them ([`ops`]) and their plain-Rust references
//! ([`reference`]).
//!
//! This is the only halo crate that uses `unsafe`: every call into Vulkan is
//! unsafe by nature. Each unsafe block carries a `SAFETY` comment that says
//! why it is sound, and raw Vulkan objects are owned by types that destroy
//! them when dropped.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bench;
pub mod device;
pub mod error;
mod kernels;
pub mod ops;
pub mod quant;
pub mod reference;
mod runtime;

pub use device::*;
pub use error::VulkanError;
pub use kernels::KernelId;
pub use runtime::*;
