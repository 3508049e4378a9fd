//! Command recording: a [`Stream`] records dispatches and copies into a command buffer, inserts a
//! barrier only where one command reads or writes what an earlier one wrote (or writes what it
//! read), submits in batches, and waits on the device's timeline semaphore.
//!
//! A stream is one job's private recorder: it has its own command pool, and it keeps every buffer
//! it references alive until the GPU is done with it, so dropping a buffer (or the whole job)
//! early cannot free memory the GPU still uses. Dropping a stream waits for its work.

use std::time::Duration;

use ash::vk;

use super::device::Device;
use super::memory::Buffer;
use super::pipeline::PUSH_BYTES;
use crate::error::VulkanError;
use crate::KernelId;

/// After this many commands the batch is submitted and recording continues in a new command
/// buffer, so the GPU starts while the host records the rest.
const BATCH: usize = 256;
/// How long `finish` waits before calling the GPU hung.
const WAIT: Duration = Duration::from_secs(300);

/// A byte range of a buffer that a command reads or writes.
#[derive(Clone, Copy)]
pub struct Access<'a> {
    pub buffer: &'a Buffer,
    pub offset: u64,
    pub len: u64,
}

impl<'a> Access<'a> {
    /// The whole buffer.
    pub fn all(buffer: &'a Buffer) -> Self {
        Access {
            buffer,
            offset: 0,
            len: buffer.len(),
        }
    }

    fn span(&self) -> (u64, u64) {
        let start = self.buffer.address(self.offset);
        (start, start + self.len)
    }
}

/// One compute dispatch.
pub struct Dispatch<'a> {
    pub kernel: KernelId,
    /// Specialization constants: [0] workgroup size, [1] subgroup size, then kernel-specific.
    pub spec: &'a [u32],
    /// Push-constant bytes (at most 128), laid out as the shader's `Push` block.
    pub push: &'a [u8],
    pub groups: [u32; 3],
    pub reads: &'a [Access<'a>],
    pub writes: &'a [Access<'a>],
}

struct Batch {
    cmd: vk::CommandBuffer,
    /// Timeline value that marks it done; 0 while recording.
    value: u64,
    keep: Vec<Buffer>,
    /// With profiling: the query pool and the kernel of each timestamp pair.
    queries: Option<(vk::QueryPool, Vec<KernelId>)>,
}

/// Records and submits GPU work for one job.
pub struct Stream {
    device: Device,
    pool: vk::CommandPool,
    recording: Option<Batch>,
    commands_in_batch: usize,
    in_flight: Vec<Batch>,
    spare: Vec<vk::CommandBuffer>,
    /// Address ranges written / read since the last barrier.
    written: Vec<(u64, u64)>,
    read: Vec<(u64, u64)>,
    profiling: bool,
    profile: Vec<(KernelId, Duration)>,
}

impl Device {
    /// A new stream on this device's compute queue.
    pub fn stream(&self) -> Result<Stream, VulkanError> {
        let shared = &self.shared;
        shared.ensure_alive()?;
        let info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(shared.queue_family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: valid create info for a queue family of this device.
        let pool = unsafe { shared.device.create_command_pool(&info, None) }
            .map_err(|r| shared.check("vkCreateCommandPool", r))?;
        Ok(Stream {
            device: self.clone(),
            pool,
            recording: None,
            commands_in_batch: 0,
            in_flight: Vec::new(),
            spare: Vec::new(),
            written: Vec::new(),
            read: Vec::new(),
            profiling: false,
            profile: Vec::new(),
        })
    }
}

fn overlaps(a: (u64, u64), set: &[(u64, u64)]) -> bool {
    set.iter().any(|b| a.0 < b.1 && b.0 < a.1)
}

impl Stream {
    fn raw(&self) -> &ash::Device {
        &self.device.shared.device
    }

    /// The command buffer being recorded, starting one if needed.
    fn cmd(&mut self) -> Result<vk::CommandBuffer, VulkanError> {
        if let Some(b) = &self.recording {
            return Ok(b.cmd);
        }
        let cmd = match self.spare.pop() {
            Some(c) => c,
            None => {
                let info = vk::CommandBufferAllocateInfo::default()
                    .command_pool(self.pool)
                    .level(vk::CommandBufferLevel::PRIMARY)
                    .command_buffer_count(1);
                // SAFETY: the pool belongs to this device and only this stream uses it.
                unsafe { self.raw().allocate_command_buffers(&info) }
                    .map_err(|r| self.device.shared.check("vkAllocateCommandBuffers", r))?[0]
            }
        };
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: `cmd` is in the initial state (fresh, or reset when its batch completed).
        unsafe { self.raw().begin_command_buffer(cmd, &begin) }
            .map_err(|r| self.device.shared.check("vkBeginCommandBuffer", r))?;
        let queries = if self.profiling {
            let info = vk::QueryPoolCreateInfo::default()
                .query_type(vk::QueryType::TIMESTAMP)
                .query_count(2 * BATCH as u32);
            // SAFETY: valid create info on this device.
            let pool = unsafe { self.raw().create_query_pool(&info, None) }
                .map_err(|r| self.device.shared.check("vkCreateQueryPool", r))?;
            // SAFETY: `cmd` is recording; the range covers the new pool.
            unsafe {
                self.raw()
                    .cmd_reset_query_pool(cmd, pool, 0, 2 * BATCH as u32)
            };
            Some((pool, Vec::new()))
        } else {
            None
        };
        self.recording = Some(Batch {
            cmd,
            value: 0,
            keep: Vec::new(),
            queries,
        });
        self.written.clear();
        self.read.clear();
        Ok(cmd)
    }

    /// Inserts a barrier if `reads`/`writes` conflict with what was recorded since the last one.
    fn hazard(&mut self, cmd: vk::CommandBuffer, reads: &[(u64, u64)], writes: &[(u64, u64)]) {
        let conflict = reads.iter().any(|r| overlaps(*r, &self.written))
            || writes
                .iter()
                .any(|w| overlaps(*w, &self.written) || overlaps(*w, &self.read));
        if conflict {
            let all = vk::AccessFlags::SHADER_READ
                | vk::AccessFlags::SHADER_WRITE
                | vk::AccessFlags::TRANSFER_READ
                | vk::AccessFlags::TRANSFER_WRITE;
            let barrier = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
                .dst_access_mask(all);
            let stages = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
            // SAFETY: `cmd` is recording; a global memory barrier between compute and transfer
            // stages is valid on a compute queue.
            unsafe {
                self.raw().cmd_pipeline_barrier(
                    cmd,
                    stages,
                    stages,
                    vk::DependencyFlags::empty(),
                    &[barrier],
                    &[],
                    &[],
                )
            };
            self.written.clear();
            self.read.clear();
        }
        self.read.extend_from_slice(reads);
        self.written.extend_from_slice(writes);
    }

    fn keep(&mut self, accesses: &[Access<'_>]) {
        let batch = self.recording.as_mut().expect("recording");
        for a in accesses {
            batch.keep.push(a.buffer.clone());
        }
    }

    fn after_command(&mut self) -> Result<(), VulkanError> {
        self.commands_in_batch += 1;
        if self.commands_in_batch >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn check_access(&self, op: &'static str, a: &Access<'_>) -> Result<(), VulkanError> {
        if !std::sync::Arc::ptr_eq(&a.buffer.inner.shared, &self.device.shared) {
            return Err(VulkanError::BadArgument {
                op,
                message: "the buffer belongs to another device".into(),
            });
        }
        if a.offset
            .checked_add(a.len)
            .is_none_or(|e| e > a.buffer.len())
        {
            return Err(VulkanError::BadArgument {
                op,
                message: format!(
                    "range {}..{} is outside a {}-byte buffer",
                    a.offset,
                    a.offset.saturating_add(a.len),
                    a.buffer.len()
                ),
            });
        }
        Ok(())
    }

    /// The device's limits (workgroup size, subgroup size, ...), for launch planning.
    pub fn limits(&self) -> &crate::Limits {
        &self.device.shared.info.limits
    }

    /// The device this stream records for.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Records a compute dispatch.
    pub fn dispatch(&mut self, d: &Dispatch<'_>) -> Result<(), VulkanError> {
        let op = d.kernel.name();
        if d.push.len() > PUSH_BYTES as usize {
            return Err(VulkanError::BadArgument {
                op,
                message: format!(
                    "{} bytes of push constants (at most {PUSH_BYTES})",
                    d.push.len()
                ),
            });
        }
        for a in d.reads.iter().chain(d.writes) {
            self.check_access(op, a)?;
        }
        let (pipeline, layout) = {
            let mut p = self.device.shared.pipelines();
            (p.get(self.raw(), d.kernel, d.spec)?, p.layout)
        };
        let cmd = self.cmd()?;
        let reads: Vec<_> = d.reads.iter().map(Access::span).collect();
        let writes: Vec<_> = d.writes.iter().map(Access::span).collect();
        self.hazard(cmd, &reads, &writes);
        // Push constants are zero-padded to a multiple of 4 bytes.
        let mut push = d.push.to_vec();
        push.resize(push.len().div_ceil(4) * 4, 0);
        let query = self
            .recording
            .as_mut()
            .and_then(|b| b.queries.as_mut())
            .map(|(pool, kernels)| {
                kernels.push(d.kernel);
                (*pool, 2 * (kernels.len() as u32 - 1))
            });
        if let Some((pool, q)) = query {
            // SAFETY: `cmd` is recording; query `q` was reset at the start of the batch and is
            // written once (a batch holds at most BATCH commands, the pool 2·BATCH queries).
            unsafe {
                self.raw()
                    .cmd_write_timestamp(cmd, vk::PipelineStageFlags::TOP_OF_PIPE, pool, q)
            };
        }
        // SAFETY: `cmd` is recording; the pipeline and layout belong to this device; the push
        // range lies within the layout's 128 bytes; every buffer address in the push constants
        // was taken from a live buffer that `keep` holds until the batch completes.
        unsafe {
            let dev = self.raw();
            dev.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            if !push.is_empty() {
                dev.cmd_push_constants(cmd, layout, vk::ShaderStageFlags::COMPUTE, 0, &push);
            }
            dev.cmd_dispatch(cmd, d.groups[0], d.groups[1], d.groups[2]);
            if let Some((pool, q)) = query {
                dev.cmd_write_timestamp(cmd, vk::PipelineStageFlags::BOTTOM_OF_PIPE, pool, q + 1);
            }
        }
        self.keep(d.reads);
        self.keep(d.writes);
        self.after_command()
    }

    /// Records a copy of `len` bytes.
    pub fn copy(
        &mut self,
        src: &Buffer,
        src_offset: u64,
        dst: &Buffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), VulkanError> {
        let from = Access {
            buffer: src,
            offset: src_offset,
            len,
        };
        let to = Access {
            buffer: dst,
            offset: dst_offset,
            len,
        };
        self.check_access("copy", &from)?;
        self.check_access("copy", &to)?;
        if len == 0 {
            return Ok(());
        }
        let cmd = self.cmd()?;
        self.hazard(cmd, &[from.span()], &[to.span()]);
        let (sb, db) = {
            let a = self.device.shared.allocator();
            (
                a.vk_buffer(src.inner.placement.chunk),
                a.vk_buffer(dst.inner.placement.chunk),
            )
        };
        let region = vk::BufferCopy {
            src_offset: src.inner.placement.offset + src_offset,
            dst_offset: dst.inner.placement.offset + dst_offset,
            size: len,
        };
        // SAFETY: `cmd` is recording; both ranges were checked to lie inside their buffers,
        // which `keep` holds until the batch completes.
        unsafe { self.raw().cmd_copy_buffer(cmd, sb, db, &[region]) };
        self.keep(&[from, to]);
        self.after_command()
    }

    /// Records zero-filling `len` bytes (a multiple of 4) at `offset`.
    pub fn zero(&mut self, dst: &Buffer, offset: u64, len: u64) -> Result<(), VulkanError> {
        let to = Access {
            buffer: dst,
            offset,
            len,
        };
        self.check_access("zero", &to)?;
        if !offset.is_multiple_of(4) || !len.is_multiple_of(4) {
            return Err(VulkanError::BadArgument {
                op: "zero",
                message: "offset and length must be multiples of 4".into(),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let cmd = self.cmd()?;
        self.hazard(cmd, &[], &[to.span()]);
        let buf = self
            .device
            .shared
            .allocator()
            .vk_buffer(dst.inner.placement.chunk);
        // SAFETY: `cmd` is recording; the range is inside the buffer, kept alive by `keep`.
        unsafe {
            self.raw()
                .cmd_fill_buffer(cmd, buf, dst.inner.placement.offset + offset, len, 0)
        };
        self.keep(&[to]);
        self.after_command()
    }

    /// Submits what has been recorded so far; returns at once.
    pub fn flush(&mut self) -> Result<(), VulkanError> {
        self.reclaim()?;
        let Some(mut batch) = self.recording.take() else {
            return Ok(());
        };
        self.commands_in_batch = 0;
        // The next batch starts after this one on the same queue; make its first commands wait
        // for this batch's writes.
        // SAFETY: `batch.cmd` is recording.
        unsafe { self.raw().end_command_buffer(batch.cmd) }
            .map_err(|r| self.device.shared.check("vkEndCommandBuffer", r))?;
        batch.value = self.device.shared.submit(batch.cmd)?;
        self.in_flight.push(batch);
        Ok(())
    }

    /// Submits everything and waits until the GPU has finished it.
    pub fn finish(&mut self) -> Result<(), VulkanError> {
        self.flush()?;
        if let Some(last) = self.in_flight.last() {
            self.device.shared.wait(last.value, WAIT)?;
        }
        self.reclaim()
    }

    /// Recycles command buffers (and releases buffers) of batches the GPU has finished.
    fn reclaim(&mut self) -> Result<(), VulkanError> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let done = self.device.shared.completed()?;
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].value <= done {
                let b = self.in_flight.remove(i);
                if let Some((pool, kernels)) = &b.queries {
                    self.collect_profile(*pool, kernels)?;
                }
                // SAFETY: the batch completed, so its command buffer is not in use.
                unsafe {
                    self.raw()
                        .reset_command_buffer(b.cmd, vk::CommandBufferResetFlags::empty())
                }
                .map_err(|r| self.device.shared.check("vkResetCommandBuffer", r))?;
                self.spare.push(b.cmd);
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}

impl Stream {
    /// Turns per-dispatch GPU timing on or off (from the next batch on). Ignored where the queue
    /// cannot write timestamps.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on && self.device.shared.timestamp_period.is_some();
    }

    /// GPU time of each profiled dispatch that has completed, in recording order; empties the
    /// list.
    pub fn take_profile(&mut self) -> Vec<(KernelId, Duration)> {
        std::mem::take(&mut self.profile)
    }

    fn collect_profile(
        &mut self,
        pool: vk::QueryPool,
        kernels: &[KernelId],
    ) -> Result<(), VulkanError> {
        let period = self.device.shared.timestamp_period.unwrap_or(1.0) as f64;
        let mut ticks = vec![0u64; 2 * kernels.len()];
        if !kernels.is_empty() {
            // SAFETY: the batch completed, so every query in 0..2n was written; `ticks` has room
            // for 2n 64-bit results.
            unsafe {
                self.raw().get_query_pool_results(
                    pool,
                    0,
                    &mut ticks,
                    vk::QueryResultFlags::TYPE_64,
                )
            }
            .map_err(|r| self.device.shared.check("vkGetQueryPoolResults", r))?;
        }
        for (k, pair) in kernels.iter().zip(ticks.chunks_exact(2)) {
            let ns = pair[1].saturating_sub(pair[0]) as f64 * period;
            self.profile.push((*k, Duration::from_nanos(ns as u64)));
        }
        // SAFETY: the batch that used the pool has completed.
        unsafe { self.raw().destroy_query_pool(pool, None) };
        Ok(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Unsubmitted commands are dropped, submitted ones waited for: the pool cannot be
        // destroyed while the GPU still runs its command buffers.
        if let Some(b) = self.recording.take() {
            // SAFETY: the buffer is recording, never submitted; ending it is always valid, and
            // its query pool (if any) is used by no submitted work.
            unsafe {
                let _ = self.raw().end_command_buffer(b.cmd);
                if let Some((pool, _)) = b.queries {
                    self.raw().destroy_query_pool(pool, None);
                }
            }
        }
        if let Some(last) = self.in_flight.last() {
            if self.device.shared.wait(last.value, WAIT).is_err() {
                // A lost or hung device: wait for idle so destroying the pool is sound.
                // SAFETY: waiting for idle is always valid.
                let _ = unsafe { self.raw().device_wait_idle() };
            }
        }
        for b in std::mem::take(&mut self.in_flight) {
            if let Some((pool, _)) = b.queries {
                // SAFETY: the work using the pool has completed (waited above).
                unsafe { self.raw().destroy_query_pool(pool, None) };
            }
        }
        // SAFETY: no command buffer from this pool is pending any more (waited above), and
        // destroying the pool frees its command buffers.
        unsafe { self.raw().destroy_command_pool(self.pool, None) };
    }
}
