//! Typed operations: each checks its arguments, picks the launch geometry and push constants, and
//! records one or more dispatches on a [`Stream`]. Model code calls these; it never sees a
//! pipeline, a descriptor or a `vk::` type.

mod elementwise;
mod image;
pub use image::*;
mod nn;
pub use nn::*;
mod quant;

pub use elementwise::{add, mul, scale};
pub use quant::*;

use crate::error::VulkanError;
use crate::runtime::{Access, Buffer, Dispatch, Stream};
use crate::KernelId;

/// Defines a typed view of `len` 4-byte elements starting at element `start` of a buffer.
macro_rules! view {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name<'a> {
            pub buffer: &'a Buffer,
            pub start: u64,
            pub len: u64,
        }

        impl<'a> $name<'a> {
            /// All of `buffer`.
            pub fn all(buffer: &'a Buffer) -> Self {
                $name {
                    buffer,
                    start: 0,
                    len: buffer.len() / 4,
                }
            }

            /// Elements `start..start + len` of this run.
            pub fn sub(&self, start: u64, len: u64) -> Self {
                $name {
                    buffer: self.buffer,
                    start: self.start + start,
                    len,
                }
            }

            pub(crate) fn access(&self) -> Access<'a> {
                Access {
                    buffer: self.buffer,
                    offset: self.start * 4,
                    len: self.len * 4,
                }
            }

            pub(crate) fn address(&self) -> u64 {
                self.buffer.address(self.start * 4)
            }
        }
    };
}

view!(
    /// A run of f32 elements (activations, norm weights, logits).
    F32s
);
view!(
    /// A run of u32 elements (token ids, positions, expert ids).
    U32s
);

/// Push-constant bytes laid out as GLSL does for a push-constant block (scalars 4-aligned,
/// buffer references 8-aligned).
#[derive(Default)]
pub(crate) struct Push(Vec<u8>);

impl Push {
    pub(crate) fn addr(mut self, a: u64) -> Self {
        self.0.resize(self.0.len().div_ceil(8) * 8, 0);
        self.0.extend_from_slice(&a.to_le_bytes());
        self
    }

    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Workgroup size for one-thread-per-element kernels.
const ELEMENTWISE_WG: u32 = 256;

/// A 1-D launch over `n` threads as a 2-D grid, so counts beyond 65535 workgroups fit.
pub(crate) fn grid_1d(n: u64, wg: u32) -> Result<[u32; 3], VulkanError> {
    let groups = n.div_ceil(wg as u64).max(1);
    let x = groups.min(65535);
    let y = groups.div_ceil(x);
    if y > 65535 {
        return Err(VulkanError::BadArgument {
            op: "launch",
            message: format!("{n} elements is too many for one dispatch"),
        });
    }
    Ok([x as u32, y as u32, 1])
}

pub(crate) fn to_u32(op: &'static str, what: &str, v: u64) -> Result<u32, VulkanError> {
    u32::try_from(v).map_err(|_| VulkanError::BadArgument {
        op,
        message: format!("{what} = {v} does not fit in 32 bits"),
    })
}

pub(crate) fn bad(op: &'static str, message: String) -> VulkanError {
    VulkanError::BadArgument { op, message }
}

/// Records a one-thread-per-element kernel.
pub(crate) fn elementwise(
    stream: &mut Stream,
    kernel: KernelId,
    n: u64,
    push: &Push,
    reads: &[Access<'_>],
    writes: &[Access<'_>],
) -> Result<(), VulkanError> {
    let wg = ELEMENTWISE_WG.min(stream.limits().max_compute_workgroup_invocations);
    let spec = [wg, stream.limits().subgroup_size];
    stream.dispatch(&Dispatch {
        kernel,
        spec: &spec,
        push: push.bytes(),
        groups: grid_1d(n, wg)?,
        reads,
        writes,
    })
}
