//! The Vulkan runtime: one [`Device`] per process, memory with an owner ledger ([`Buffer`],
//! [`OwnerId`]), pipelines built from the kernels compiled at build time, and [`Stream`]s that
//! record and submit work.
//!
//! Layers: `device` (instance, logical device, queue, timeline semaphore) → `memory` (allocator,
//! ledger, buffers, host import) and `pipeline` (layout, cache, pipelines) → `stream` (recording,
//! barriers, submission) and `weights` (model tensors from a mapped file, copied or imported). Ops (`crate::ops`) build on streams; no `vk::` type leaves this module.

mod device;
mod memory;
mod pipeline;
mod stream;
mod weights;

pub use device::{Device, DeviceOptions, Features};
pub use memory::{
    charged_bytes, Buffer, HostMemory, Ledger, MemoryKind, OwnerId, SMALL_CHUNK, SMALL_REQUEST,
};
pub use stream::{Access, Dispatch, Stream};
pub use weights::{LoadStrategy, LoadedWeights, WeightLayout};
