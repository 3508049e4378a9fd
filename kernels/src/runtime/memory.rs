//! Device memory: our own sub-allocator over `VkDeviceMemory`, the owner ledger, and [`Buffer`].
//!
//! Memory comes in chunks; each chunk is one `VkDeviceMemory` with one `VkBuffer` over all of it,
//! so a sub-allocation is just an offset and its GPU address is the chunk's address plus that
//! offset. A chunk belongs to one [`OwnerId`], the owner whose request opened it, and the
//! [`Ledger`] charges each owner the whole of its chunks, slack included: what the device holds
//! is exactly what the owners are charged, so the budget the daemon's residency core keeps from
//! the ledger counts real memory. Chunks are sized to the requests: a group of buffers allocated
//! together ([`Device::alloc_many`]) gets chunks of exactly their total size, a large single
//! request a chunk of its own size, and small single requests share an owner's small chunks
//! ([`SMALL_CHUNK`]). A chunk is returned to the driver as soon as it is empty.
//!
//! Kernels address buffers through buffer device addresses passed in push constants, not through
//! descriptors, so `maxStorageBufferRange` (128 MiB on lavapipe) does not limit tensor size; only
//! `maxMemoryAllocationSize` does, and exceeding it is a [`VulkanError::TooLarge`].

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

use ash::vk;

use super::device::{Device, Shared};
use crate::device::DeviceInfo;
use crate::error::VulkanError;

/// Who an allocation belongs to: a model, a job, or shared scratch. The daemon assigns ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerId(pub u64);

impl OwnerId {
    /// Memory shared by everything (scratch, staging).
    pub const SHARED: OwnerId = OwnerId(0);
}

/// What memory is for, which decides its memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Weights, activations, caches. Device-local; also host-visible on unified-memory devices,
    /// so the host can write it directly.
    Device,
    /// Host-written, device-read staging memory.
    Upload,
    /// Device-written, host-read memory (results).
    Readback,
}

/// Bytes charged per owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Bytes of device memory each owner's chunks hold (free space inside them included).
    pub by_owner: BTreeMap<OwnerId, u64>,
    /// Bytes of `VkDeviceMemory` the driver holds for us: always the sum of `by_owner`.
    pub device_memory: u64,
}

impl Ledger {
    pub fn owner(&self, owner: OwnerId) -> u64 {
        self.by_owner.get(&owner).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.by_owner.values().sum()
    }
}

/// Alignment of every sub-allocation: covers storage-buffer offset alignment on every known
/// device and keeps 16-byte vector loads aligned.
const ALIGN: u64 = 256;
/// Single requests below this share their owner's small chunks; larger ones get their own.
pub const SMALL_REQUEST: u64 = 1 << 20;
/// The size of a chunk for small single requests (staging, readbacks, test buffers).
pub const SMALL_CHUNK: u64 = 4 << 20;

/// What the ledger charges for an allocation of `len` bytes (lengths are rounded up to the
/// sub-allocation alignment), so estimates can match allocations exactly.
pub fn charged_bytes(len: u64) -> u64 {
    len.max(1).div_ceil(ALIGN).saturating_mul(ALIGN)
}

struct Chunk {
    memory: vk::DeviceMemory,
    buffer: vk::Buffer,
    size: u64,
    address: u64,
    mapped: Option<NonNull<u8>>,
    /// Free ranges (offset, len), sorted by offset, never adjacent.
    free: Vec<(u64, u64)>,
    /// Whole chunk belongs to one allocation (large or imported).
    dedicated: bool,
    /// Who is charged for the chunk.
    owner: OwnerId,
    /// Bytes the driver allocated for it (at least `size`).
    allocated: u64,
}

// SAFETY: `mapped` points into the chunk's own `VkDeviceMemory` mapping, which stays valid until
// the chunk is destroyed; the allocator (always behind a mutex) only reads the pointer to derive
// sub-allocation pointers, so moving a chunk to another thread is sound.
unsafe impl Send for Chunk {}

/// Where an allocation lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placement {
    pub(crate) chunk: usize,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

/// A placement with its GPU address and, when host-visible, its host pointer.
pub(crate) type Located = (Placement, u64, Option<NonNull<u8>>);

pub(crate) struct Allocator {
    max_allocation: u64,
    uma: bool,
    types: Vec<vk::MemoryPropertyFlags>,
    /// Indexed by chunk id; `None` once freed (ids are reused).
    chunks: Vec<Option<(u32, Chunk)>>,
    ledger: Ledger,
    /// The most each watched owner has held since [`Allocator::watch_peak`] (see
    /// [`crate::Device::watch_peak`]).
    peaks: BTreeMap<OwnerId, u64>,
}

impl Allocator {
    pub(crate) fn new(info: &DeviceInfo, props: &vk::PhysicalDeviceMemoryProperties) -> Self {
        let max_allocation = info.limits.max_memory_allocation_size.max(1 << 20);
        Allocator {
            max_allocation,
            uma: info.is_uma(),
            types: props.memory_types[..props.memory_type_count as usize]
                .iter()
                .map(|t| t.property_flags)
                .collect(),
            chunks: Vec::new(),
            ledger: Ledger::default(),
            peaks: BTreeMap::new(),
        }
    }

    pub(crate) fn ledger(&self) -> Ledger {
        self.ledger.clone()
    }

    /// Starts (or restarts) recording the most `owner` holds, from what it holds now.
    pub(crate) fn watch_peak(&mut self, owner: OwnerId) {
        self.peaks.insert(owner, self.ledger.owner(owner));
    }

    /// The most `owner` has held since it was watched, and stops watching it.
    pub(crate) fn take_peak(&mut self, owner: OwnerId) -> Option<u64> {
        self.peaks.remove(&owner)
    }

    /// The most `owner` has held since it was watched, still watching.
    pub(crate) fn peak(&self, owner: OwnerId) -> Option<u64> {
        self.peaks.get(&owner).copied()
    }

    /// Picks the memory type for `kind` among those `allowed` (a memoryTypeBits mask).
    fn pick_type(&self, kind: MemoryKind, allowed: u32) -> Option<u32> {
        use vk::MemoryPropertyFlags as F;
        let wanted: &[F] = match (kind, self.uma) {
            (MemoryKind::Device, true) => &[
                F::DEVICE_LOCAL | F::HOST_VISIBLE | F::HOST_COHERENT,
                F::DEVICE_LOCAL,
            ],
            (MemoryKind::Device, false) => &[F::DEVICE_LOCAL],
            (MemoryKind::Upload, _) => &[F::HOST_VISIBLE | F::HOST_COHERENT],
            (MemoryKind::Readback, _) => &[
                F::HOST_VISIBLE | F::HOST_COHERENT | F::HOST_CACHED,
                F::HOST_VISIBLE | F::HOST_COHERENT,
            ],
        };
        for w in wanted {
            // On a discrete GPU, keep staging out of the small host-visible VRAM window.
            let avoid = if !self.uma && kind != MemoryKind::Device {
                F::DEVICE_LOCAL
            } else {
                F::empty()
            };
            let fits = |i: &usize| allowed & (1 << *i) != 0 && self.types[*i].contains(*w);
            if let Some(i) =
                (0..self.types.len()).find(|i| fits(i) && !self.types[*i].intersects(avoid))
            {
                return Some(i as u32);
            }
            if let Some(i) = (0..self.types.len()).find(fits) {
                return Some(i as u32);
            }
        }
        None
    }

    /// Allocates `size` bytes of `kind` for `owner`.
    pub(crate) fn alloc(
        &mut self,
        device: &ash::Device,
        kind: MemoryKind,
        size: u64,
        owner: OwnerId,
        what: &str,
    ) -> Result<Located, VulkanError> {
        let size = charged_bytes(size);
        if size > self.max_allocation {
            return Err(VulkanError::TooLarge {
                what: what.to_string(),
                requested: size,
                limit: self.max_allocation,
            });
        }
        let placement = if size >= SMALL_REQUEST {
            let chunk = self.new_chunk(device, kind, size, true, owner)?;
            Placement {
                chunk,
                offset: 0,
                size,
            }
        } else {
            match self.find_space(kind, size, owner) {
                Some(p) => p,
                None => {
                    let chunk_size = SMALL_CHUNK.min(self.max_allocation).max(size);
                    let chunk = self.new_chunk(device, kind, chunk_size, false, owner)?;
                    self.find_space_in(chunk, size)
                        .expect("a new chunk has room")
                }
            }
        };
        Ok(self.locate(placement))
    }

    /// The address and host pointer of a placement.
    fn locate(&self, placement: Placement) -> Located {
        let (_, c) = self.chunks[placement.chunk].as_ref().expect("live chunk");
        let address = c.address + placement.offset;
        let mapped = c.mapped.map(|p| {
            // SAFETY: `placement.offset` lies inside the chunk's mapping, which covers the chunk.
            unsafe { NonNull::new_unchecked(p.as_ptr().add(placement.offset as usize)) }
        });
        (placement, address, mapped)
    }

    /// Allocates several buffers for `owner` together, in chunks of exactly their total size
    /// (per memory kind, each chunk at most `maxMemoryAllocationSize`), so nothing is left over.
    pub(crate) fn alloc_many(
        &mut self,
        device: &ash::Device,
        requests: &[(MemoryKind, u64)],
        owner: OwnerId,
    ) -> Result<Vec<Located>, VulkanError> {
        let mut out: Vec<Option<Located>> = vec![None; requests.len()];
        let mut opened = Vec::new();
        let result = (|| {
            for kind in [MemoryKind::Device, MemoryKind::Upload, MemoryKind::Readback] {
                let mine: Vec<usize> = (0..requests.len())
                    .filter(|&i| requests[i].0 == kind)
                    .collect();
                let mut at = 0;
                while at < mine.len() {
                    // As many consecutive requests as one allocation may hold.
                    let mut total = 0u64;
                    let mut end = at;
                    while end < mine.len() {
                        let size = charged_bytes(requests[mine[end]].1);
                        if size > self.max_allocation {
                            return Err(VulkanError::TooLarge {
                                what: "a buffer".to_string(),
                                requested: size,
                                limit: self.max_allocation,
                            });
                        }
                        if total + size > self.max_allocation {
                            break;
                        }
                        total += size;
                        end += 1;
                    }
                    let chunk = self.new_chunk(device, kind, total, false, owner)?;
                    opened.push(chunk);
                    for &i in &mine[at..end] {
                        let p = self
                            .find_space_in(chunk, charged_bytes(requests[i].1))
                            .expect("the chunk was sized for these requests");
                        out[i] = Some(self.locate(p));
                    }
                    at = end;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(out
                .into_iter()
                .map(|p| p.expect("every request placed"))
                .collect()),
            Err(e) => {
                // Give back what was opened before the failure.
                for chunk in opened {
                    if let Some((_, c)) = self.chunks[chunk].take() {
                        self.forget(&c);
                        // SAFETY: the chunk was created above and nothing uses it yet.
                        unsafe { destroy_chunk(device, &c) };
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes a chunk's bytes from the ledger.
    fn forget(&mut self, c: &Chunk) {
        self.ledger.device_memory = self.ledger.device_memory.saturating_sub(c.allocated);
        if let Some(n) = self.ledger.by_owner.get_mut(&c.owner) {
            *n = n.saturating_sub(c.allocated);
            if *n == 0 {
                self.ledger.by_owner.remove(&c.owner);
            }
        }
    }

    fn find_space(&mut self, kind: MemoryKind, size: u64, owner: OwnerId) -> Option<Placement> {
        let ids: Vec<usize> = self
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                Some((k, ch)) if !ch.dedicated && *k == kind_tag(kind) && ch.owner == owner => {
                    Some(i)
                }
                _ => None,
            })
            .collect();
        ids.into_iter().find_map(|i| self.find_space_in(i, size))
    }

    fn find_space_in(&mut self, chunk: usize, size: u64) -> Option<Placement> {
        let (_, c) = self.chunks[chunk].as_mut()?;
        let slot = c.free.iter().position(|&(_, len)| len >= size)?;
        let (offset, len) = c.free[slot];
        if len == size {
            c.free.remove(slot);
        } else {
            c.free[slot] = (offset + size, len - size);
        }
        Some(Placement {
            chunk,
            offset,
            size,
        })
    }

    fn new_chunk(
        &mut self,
        device: &ash::Device,
        kind: MemoryKind,
        size: u64,
        dedicated: bool,
        owner: OwnerId,
    ) -> Result<usize, VulkanError> {
        let buffer_info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(buffer_usage())
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: the create info is valid and outlives the call.
        let buffer = unsafe { device.create_buffer(&buffer_info, None) }
            .map_err(|r| VulkanError::from_vk("vkCreateBuffer", r))?;
        // SAFETY: `buffer` was just created on this device.
        let req = unsafe { device.get_buffer_memory_requirements(buffer) };
        let Some(type_index) = self.pick_type(kind, req.memory_type_bits) else {
            // SAFETY: the buffer is unused.
            unsafe { device.destroy_buffer(buffer, None) };
            return Err(VulkanError::Call {
                call: "vkAllocateMemory",
                result: vk::Result::ERROR_FEATURE_NOT_PRESENT.as_raw(),
                message: format!("no memory type suits {kind:?} memory"),
            });
        };
        let mut flags =
            vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let alloc_info = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(type_index)
            .push_next(&mut flags);
        // SAFETY: valid allocate info; bufferDeviceAddress is enabled on this device.
        let memory = match unsafe { device.allocate_memory(&alloc_info, None) } {
            Ok(m) => m,
            Err(r) => {
                // SAFETY: the buffer is unused.
                unsafe { device.destroy_buffer(buffer, None) };
                return Err(VulkanError::from_vk("vkAllocateMemory", r));
            }
        };
        let chunk = self.finish_chunk(
            device, buffer, memory, type_index, size, req.size, dedicated, owner,
        )?;
        Ok(self.insert(kind_tag(kind), chunk))
    }

    /// Binds, maps (if host-visible) and looks up the address of a chunk's buffer.
    #[allow(clippy::too_many_arguments)]
    fn finish_chunk(
        &mut self,
        device: &ash::Device,
        buffer: vk::Buffer,
        memory: vk::DeviceMemory,
        type_index: u32,
        size: u64,
        allocated: u64,
        dedicated: bool,
        owner: OwnerId,
    ) -> Result<Chunk, VulkanError> {
        let cleanup = |device: &ash::Device| {
            // SAFETY: neither object is in use by the GPU or referenced elsewhere yet.
            unsafe {
                device.destroy_buffer(buffer, None);
                device.free_memory(memory, None);
            }
        };
        // SAFETY: `memory` was allocated for `buffer`'s requirements, at offset 0.
        if let Err(r) = unsafe { device.bind_buffer_memory(buffer, memory, 0) } {
            cleanup(device);
            return Err(VulkanError::from_vk("vkBindBufferMemory", r));
        }
        let host_visible =
            self.types[type_index as usize].contains(vk::MemoryPropertyFlags::HOST_VISIBLE);
        let mapped = if host_visible {
            // SAFETY: the memory is host-visible, not mapped yet, and the range is all of it.
            match unsafe {
                device.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
            } {
                Ok(p) => NonNull::new(p.cast::<u8>()),
                Err(r) => {
                    cleanup(device);
                    return Err(VulkanError::from_vk("vkMapMemory", r));
                }
            }
        } else {
            None
        };
        let info = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: the buffer was created with SHADER_DEVICE_ADDRESS usage and is bound to memory
        // allocated with the DEVICE_ADDRESS flag.
        let address = unsafe { device.get_buffer_device_address(&info) };
        self.ledger.device_memory += allocated;
        let held = self.ledger.by_owner.entry(owner).or_default();
        *held += allocated;
        if let Some(peak) = self.peaks.get_mut(&owner) {
            *peak = (*peak).max(*held);
        }
        Ok(Chunk {
            memory,
            buffer,
            size,
            address,
            mapped,
            free: if dedicated {
                Vec::new()
            } else {
                vec![(0, size)]
            },
            dedicated,
            owner,
            allocated,
        })
    }

    fn insert(&mut self, tag: u32, chunk: Chunk) -> usize {
        match self.chunks.iter().position(Option::is_none) {
            Some(i) => {
                self.chunks[i] = Some((tag, chunk));
                i
            }
            None => {
                self.chunks.push(Some((tag, chunk)));
                self.chunks.len() - 1
            }
        }
    }

    /// Imports host memory (page-aligned) as a dedicated chunk.
    pub(crate) fn import(
        &mut self,
        device: &ash::Device,
        ext: &ash::ext::external_memory_host::Device,
        ptr: *const u8,
        size: u64,
        owner: OwnerId,
    ) -> Result<(Placement, u64), VulkanError> {
        let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the caller guarantees `ptr..ptr+size` is mapped, aligned to
        // minImportedHostPointerAlignment, and outlives the import; the function pointer was
        // loaded for this device, which enabled the extension; `props` outlives the call.
        let r = unsafe {
            (ext.fp().get_memory_host_pointer_properties_ext)(
                ext.device(),
                handle,
                ptr.cast(),
                &mut props,
            )
        };
        if r != vk::Result::SUCCESS {
            return Err(VulkanError::HostImport(format!(
                "vkGetMemoryHostPointerPropertiesEXT: {r}"
            )));
        }
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let buffer_info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(buffer_usage())
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: valid create info, outliving the call.
        let buffer = unsafe { device.create_buffer(&buffer_info, None) }
            .map_err(|r| VulkanError::from_vk("vkCreateBuffer", r))?;
        // SAFETY: `buffer` was just created on this device.
        let req = unsafe { device.get_buffer_memory_requirements(buffer) };
        let bits = props.memory_type_bits & req.memory_type_bits;
        let Some(type_index) = (0..self.types.len() as u32).find(|i| bits & (1 << i) != 0) else {
            // SAFETY: the buffer is unused.
            unsafe { device.destroy_buffer(buffer, None) };
            return Err(VulkanError::HostImport(
                "no memory type accepts the host pointer".into(),
            ));
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(handle)
            .host_pointer(ptr as *mut std::ffi::c_void);
        let mut flags =
            vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let alloc_info = vk::MemoryAllocateInfo::default()
            .allocation_size(size)
            .memory_type_index(type_index)
            .push_next(&mut import)
            .push_next(&mut flags);
        // SAFETY: as for the properties query; the import structure names a live, aligned
        // host range of `size` bytes (a multiple of the import alignment).
        let memory = match unsafe { device.allocate_memory(&alloc_info, None) } {
            Ok(m) => m,
            Err(r) => {
                // SAFETY: the buffer is unused.
                unsafe { device.destroy_buffer(buffer, None) };
                return Err(VulkanError::HostImport(format!("vkAllocateMemory: {r}")));
            }
        };
        // Imported memory is the caller's mapping: never map it again through Vulkan.
        let saved = self.types[type_index as usize];
        self.types[type_index as usize] = saved & !vk::MemoryPropertyFlags::HOST_VISIBLE;
        let chunk = self.finish_chunk(device, buffer, memory, type_index, size, size, true, owner);
        self.types[type_index as usize] = saved;
        let chunk = chunk?;
        let address = chunk.address;
        let id = self.insert(u32::MAX, chunk);
        Ok((
            Placement {
                chunk: id,
                offset: 0,
                size,
            },
            address,
        ))
    }

    /// Returns an allocation's bytes to its chunk (freeing the chunk when it empties).
    pub(crate) fn free(&mut self, device: &ash::Device, p: Placement) {
        let Some((_, c)) = self.chunks[p.chunk].as_mut() else {
            return;
        };
        let empty = if c.dedicated {
            true
        } else {
            let at = c.free.partition_point(|&(o, _)| o < p.offset);
            c.free.insert(at, (p.offset, p.size));
            // Merge with the neighbours.
            if at + 1 < c.free.len() && c.free[at].0 + c.free[at].1 == c.free[at + 1].0 {
                c.free[at].1 += c.free[at + 1].1;
                c.free.remove(at + 1);
            }
            if at > 0 && c.free[at - 1].0 + c.free[at - 1].1 == c.free[at].0 {
                c.free[at - 1].1 += c.free[at].1;
                c.free.remove(at);
            }
            c.free.len() == 1 && c.free[0] == (0, c.size)
        };
        if empty {
            let (_, c) = self.chunks[p.chunk].take().expect("checked above");
            self.forget(&c);
            // SAFETY: every allocation in the chunk has been freed, and buffers are only freed
            // once no submitted work uses them (streams keep them alive until completion).
            unsafe { destroy_chunk(device, &c) };
        }
    }

    pub(crate) fn vk_buffer(&self, chunk: usize) -> vk::Buffer {
        self.chunks[chunk]
            .as_ref()
            .map(|(_, c)| c.buffer)
            .unwrap_or_default()
    }

    /// Frees every chunk.
    ///
    /// # Safety
    /// No work using this memory may be pending on the device.
    pub(crate) unsafe fn destroy(&mut self, device: &ash::Device) {
        for (_, c) in self.chunks.drain(..).flatten() {
            // SAFETY: the caller guarantees the device is idle.
            unsafe { destroy_chunk(device, &c) };
        }
    }
}

fn kind_tag(kind: MemoryKind) -> u32 {
    match kind {
        MemoryKind::Device => 0,
        MemoryKind::Upload => 1,
        MemoryKind::Readback => 2,
    }
}

fn buffer_usage() -> vk::BufferUsageFlags {
    vk::BufferUsageFlags::STORAGE_BUFFER
        | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
        | vk::BufferUsageFlags::TRANSFER_SRC
        | vk::BufferUsageFlags::TRANSFER_DST
}

/// # Safety
/// The chunk's memory must not be in use by the device.
unsafe fn destroy_chunk(device: &ash::Device, c: &Chunk) {
    // SAFETY: per the function contract; unmapping happens implicitly with vkFreeMemory.
    unsafe {
        device.destroy_buffer(c.buffer, None);
        device.free_memory(c.memory, None);
    }
}

/// Something that owns host memory a buffer may import (a memory-mapped model file). The bytes
/// must stay mapped and unchanged for as long as the value lives.
pub trait HostMemory: Send + Sync {
    fn bytes(&self) -> &[u8];
}

pub(crate) struct BufferInner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) placement: Placement,
    pub(crate) address: u64,
    pub(crate) owner: OwnerId,
    pub(crate) kind: MemoryKind,
    /// Host view of the whole allocation, when host-visible.
    mapped: Option<NonNull<u8>>,
    /// Bytes the caller asked for (placement.size is rounded up).
    len: u64,
    /// For imported buffers: the host memory, dropped only after the Vulkan memory is freed.
    _host: Option<Arc<dyn HostMemory>>,
}

// SAFETY: `mapped` points into device memory owned by this value; the pointer is only used to
// copy bytes in `write`/`read`, which take `&mut Buffer`/`&Buffer` so Rust's aliasing rules apply
// to host access exactly as for a `Box<[u8]>`. The Vulkan handles are plain ids.
unsafe impl Send for BufferInner {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for BufferInner {}

impl Drop for BufferInner {
    fn drop(&mut self) {
        self.shared
            .allocator()
            .free(&self.shared.device, self.placement);
    }
}

/// A region of GPU memory charged to an owner. Cloning shares it; the memory is freed when the
/// last clone (including those held by in-flight streams) is dropped.
#[derive(Clone)]
pub struct Buffer {
    pub(crate) inner: Arc<BufferInner>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.inner.len)
            .field("owner", &self.inner.owner)
            .field("kind", &self.inner.kind)
            .finish()
    }
}

impl Buffer {
    /// A buffer over memory the allocator placed (not imported).
    fn allocated(
        shared: &Arc<Shared>,
        (placement, address, mapped): Located,
        owner: OwnerId,
        kind: MemoryKind,
        len: u64,
    ) -> Buffer {
        Buffer {
            inner: Arc::new(BufferInner {
                shared: shared.clone(),
                placement,
                address,
                owner,
                kind,
                mapped,
                len,
                _host: None,
            }),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    pub fn owner(&self) -> OwnerId {
        self.inner.owner
    }

    /// The GPU address of byte `offset`.
    pub(crate) fn address(&self, offset: u64) -> u64 {
        self.inner.address + offset
    }

    /// Whether the host can write this buffer directly (unified memory), without staging.
    pub fn host_visible(&self) -> bool {
        self.inner.mapped.is_some()
    }

    fn check_range(&self, offset: u64, len: u64, op: &'static str) -> Result<(), VulkanError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.inner.len)
        {
            return Err(VulkanError::BadArgument {
                op,
                message: format!(
                    "range {offset}..{} is outside the {}-byte buffer",
                    offset.saturating_add(len),
                    self.inner.len
                ),
            });
        }
        Ok(())
    }
}

impl Device {
    /// Allocates `len` bytes of `kind` memory charged to `owner`.
    pub fn alloc(&self, kind: MemoryKind, len: u64, owner: OwnerId) -> Result<Buffer, VulkanError> {
        self.shared.ensure_alive()?;
        let shared = &self.shared;
        let located = shared
            .allocator()
            .alloc(&shared.device, kind, len, owner, "a buffer")?;
        Ok(Buffer::allocated(shared, located, owner, kind, len))
    }

    /// Allocates a group of buffers for `owner` in chunks of exactly their total size: what a
    /// model or sequence allocates at once is charged exactly what its requests add up to
    /// (each rounded as [`charged_bytes`] says), with no chunk slack.
    pub fn alloc_many(
        &self,
        requests: &[(MemoryKind, u64)],
        owner: OwnerId,
    ) -> Result<Vec<Buffer>, VulkanError> {
        self.shared.ensure_alive()?;
        let shared = &self.shared;
        let placed = shared
            .allocator()
            .alloc_many(&shared.device, requests, owner)?;
        Ok(placed
            .into_iter()
            .zip(requests)
            .map(|(located, &(kind, len))| Buffer::allocated(shared, located, owner, kind, len))
            .collect())
    }

    /// Imports `range` of `host` (which must start on a page boundary aligned to the device's
    /// import alignment) without copying. Fails with [`VulkanError::HostImport`] where the device
    /// or driver cannot import; callers then fall back to [`Device::alloc`] and a copy.
    pub fn import_host(
        &self,
        host: Arc<dyn HostMemory>,
        range: std::ops::Range<usize>,
        owner: OwnerId,
    ) -> Result<Buffer, VulkanError> {
        self.shared.ensure_alive()?;
        let shared = &self.shared;
        let ext = shared.host_memory.as_ref().ok_or_else(|| {
            VulkanError::HostImport("the device lacks VK_EXT_external_memory_host".into())
        })?;
        let align = shared
            .info
            .limits
            .min_imported_host_pointer_alignment
            .unwrap_or(4096) as usize;
        let bytes = host.bytes();
        if range.start > range.end || range.end > bytes.len() {
            return Err(VulkanError::BadArgument {
                op: "import_host",
                message: format!("range {range:?} is outside {} bytes", bytes.len()),
            });
        }
        let ptr = bytes[range.clone()].as_ptr();
        if !(ptr as usize).is_multiple_of(align) {
            return Err(VulkanError::HostImport(format!(
                "the range does not start on a {align}-byte boundary"
            )));
        }
        // The import length must be a multiple of the alignment; the mapping is whole pages, so
        // rounding up stays inside it as long as the mapping extends that far.
        let len = range.len();
        let padded = len.div_ceil(align) * align;
        let mapping_end = bytes.as_ptr() as usize + bytes.len().div_ceil(align) * align;
        if ptr as usize + padded > mapping_end {
            return Err(VulkanError::HostImport(
                "the range's last page is outside the mapping".into(),
            ));
        }
        let (placement, address) =
            shared
                .allocator()
                .import(&shared.device, ext, ptr, padded as u64, owner)?;
        Ok(Buffer {
            inner: Arc::new(BufferInner {
                shared: shared.clone(),
                placement,
                address,
                owner,
                kind: MemoryKind::Device,
                mapped: None,
                len: len as u64,
                _host: Some(host),
            }),
        })
    }

    /// Copies `data` into `dst` at `offset`: directly when the buffer is host-visible, else
    /// through a staging buffer and a GPU copy (waited for).
    pub fn write(&self, dst: &mut Buffer, offset: u64, data: &[u8]) -> Result<(), VulkanError> {
        dst.check_range(offset, data.len() as u64, "write")?;
        if let Some(p) = dst.inner.mapped {
            // SAFETY: the range was checked to lie inside the allocation, which is mapped; `&mut`
            // on the buffer gives exclusive host access; the source is a separate Rust slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    p.as_ptr().add(offset as usize),
                    data.len(),
                )
            };
            return Ok(());
        }
        const STAGE: usize = 64 << 20;
        let mut stage = self.alloc(
            MemoryKind::Upload,
            STAGE.min(data.len()).max(1) as u64,
            OwnerId::SHARED,
        )?;
        for (i, piece) in data.chunks(STAGE).enumerate() {
            self.write(&mut stage, 0, piece)?;
            let mut s = self.stream()?;
            s.copy(
                &stage,
                0,
                dst,
                offset + (i * STAGE) as u64,
                piece.len() as u64,
            )?;
            s.finish()?;
        }
        Ok(())
    }

    /// Reads `len` bytes of `src` from `offset` (through a readback buffer if not host-visible).
    /// Call it after the work that writes the buffer has finished.
    pub fn read(&self, src: &Buffer, offset: u64, len: u64) -> Result<Vec<u8>, VulkanError> {
        src.check_range(offset, len, "read")?;
        if let Some(p) = src.inner.mapped {
            let mut out = vec![0u8; len as usize];
            // SAFETY: the range lies inside the mapped allocation; `out` is a fresh Vec.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p.as_ptr().add(offset as usize),
                    out.as_mut_ptr(),
                    len as usize,
                )
            };
            return Ok(out);
        }
        let back = self.alloc(MemoryKind::Readback, len.max(1), OwnerId::SHARED)?;
        let mut s = self.stream()?;
        s.copy(src, offset, &back, 0, len)?;
        s.finish()?;
        self.read(&back, 0, len)
    }

    /// Writes f32 values (little-endian) at element `index`.
    pub fn write_f32(&self, dst: &mut Buffer, index: u64, data: &[f32]) -> Result<(), VulkanError> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.write(dst, index * 4, &bytes)
    }

    /// Reads `count` f32 values from element `index`.
    pub fn read_f32(&self, src: &Buffer, index: u64, count: u64) -> Result<Vec<f32>, VulkanError> {
        let bytes = self.read(src, index * 4, count * 4)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// A device-memory buffer holding `data` as f32.
    pub fn upload_f32(&self, data: &[f32], owner: OwnerId) -> Result<Buffer, VulkanError> {
        let mut b = self.alloc(MemoryKind::Device, data.len() as u64 * 4, owner)?;
        self.write_f32(&mut b, 0, data)?;
        Ok(b)
    }
}
