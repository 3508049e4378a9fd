//! Elementwise arithmetic on f32 runs.

use super::{bad, elementwise, to_u32, F32s, Push};
use crate::error::VulkanError;
use crate::runtime::Stream;
use crate::KernelId;

fn binary(
    stream: &mut Stream,
    kernel: KernelId,
    a: F32s<'_>,
    b: F32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = kernel.name();
    if out.len != a.len {
        return Err(bad(
            op,
            format!("output has {} elements, input {}", out.len, a.len),
        ));
    }
    if b.len == 0 || !a.len.is_multiple_of(b.len) {
        return Err(bad(
            op,
            format!(
                "b has {} elements, which does not divide a's {}",
                b.len, a.len
            ),
        ));
    }
    let push = Push::default()
        .addr(a.address())
        .addr(b.address())
        .addr(out.address())
        .u32(to_u32(op, "n", a.len)?)
        .u32(to_u32(op, "b_len", b.len)?);
    elementwise(
        stream,
        kernel,
        a.len,
        &push,
        &[a.access(), b.access()],
        &[out.access()],
    )
}

/// out = a + b, with `b` repeated when it is shorter (its length must divide a's).
pub fn add(
    stream: &mut Stream,
    a: F32s<'_>,
    b: F32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    binary(stream, KernelId::AddF32, a, b, out)
}

/// out = a · b, with `b` repeated when it is shorter (its length must divide a's).
pub fn mul(
    stream: &mut Stream,
    a: F32s<'_>,
    b: F32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    binary(stream, KernelId::MulF32, a, b, out)
}

/// out = a · s.
pub fn scale(stream: &mut Stream, a: F32s<'_>, s: f32, out: F32s<'_>) -> Result<(), VulkanError> {
    let op = "scale_f32";
    if out.len != a.len {
        return Err(bad(
            op,
            format!("output has {} elements, input {}", out.len, a.len),
        ));
    }
    let push = Push::default()
        .addr(a.address())
        .addr(out.address())
        .u32(to_u32(op, "n", a.len)?)
        .f32(s);
    elementwise(
        stream,
        KernelId::ScaleF32,
        a.len,
        &push,
        &[a.access()],
        &[out.access()],
    )
}
