//! Putting a model's tensors on the device from a memory-mapped file, by one of two strategies
//! behind one interface:
//!
//! - **Copy**: allocate device memory and copy the bytes in (directly on unified-memory devices,
//!   through staging on discrete GPUs).
//! - **Import**: hand the mapped pages themselves to the GPU with VK_EXT_external_memory_host, so
//!   the file's page cache *is* the weights: no copy, no second resident copy.
//!
//! Tensors are grouped into segments in file order; a segment never exceeds the device's
//! maxMemoryAllocationSize and never splits a tensor, and each tensor keeps its in-file offset
//! relative to its segment's start. For import, a segment starts on a page boundary.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::device::Device;
use super::memory::{Buffer, HostMemory, MemoryKind, OwnerId};
use crate::error::VulkanError;

/// How to get weights onto the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadStrategy {
    /// Import on unified-memory and CPU devices that support it, else copy.
    Auto,
    Copy,
    Import,
}

impl LoadStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadStrategy::Auto => "auto",
            LoadStrategy::Copy => "copy",
            LoadStrategy::Import => "import",
        }
    }
}

impl std::str::FromStr for LoadStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LoadStrategy::Auto),
            "copy" => Ok(LoadStrategy::Copy),
            "import" => Ok(LoadStrategy::Import),
            _ => Err(format!(
                "unknown weight loading strategy {s:?}: use auto, copy or import"
            )),
        }
    }
}

/// A model's weights on the device.
pub struct LoadedWeights {
    segments: Vec<Segment>,
    /// For each tensor given to the loader: (segment index, byte offset inside the segment).
    places: Vec<(usize, u64)>,
    /// What was actually used (Auto resolved; Import may have fallen back to Copy).
    pub strategy: LoadStrategy,
    /// Device bytes charged for the weights.
    pub bytes: u64,
    pub elapsed: Duration,
}

struct Segment {
    buffer: Buffer,
}

impl LoadedWeights {
    /// Where tensor `i` (in the order given to [`Device::load_weights`]) lives.
    pub fn tensor(&self, i: usize) -> Option<(&Buffer, u64)> {
        let (s, off) = *self.places.get(i)?;
        Some((&self.segments[s].buffer, off))
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }
}

/// How a device lays a model's weights out: segments of at most `max_segment` bytes, each
/// starting on an `align` boundary of the file and holding a whole number of `align` blocks.
/// Copy and import charge the same bytes, so the estimate of a model's size before it loads
/// ([`WeightLayout::bytes`]) is what it holds after, whichever way its weights arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightLayout {
    pub max_segment: u64,
    pub align: u64,
}

impl WeightLayout {
    /// Bytes the weights of `tensors` (file byte ranges) take on the device.
    pub fn bytes(&self, tensors: &[Range<u64>]) -> Result<u64, VulkanError> {
        let (segments, _) = plan(tensors, self.max_segment, self.align)?;
        Ok(segments
            .iter()
            .map(|r| self.segment_bytes(r))
            .fold(0u64, u64::saturating_add))
    }

    fn segment_bytes(&self, r: &Range<u64>) -> u64 {
        (r.end - r.start)
            .div_ceil(self.align)
            .saturating_mul(self.align)
    }
}

/// Groups tensors (byte ranges of the file, in any order) into segments of at most `max` bytes
/// each, aligned down to `align` at their start. Returns (segment ranges, per-tensor segment).
fn plan(
    tensors: &[Range<u64>],
    max: u64,
    align: u64,
) -> Result<(Vec<Range<u64>>, Vec<usize>), VulkanError> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].start);
    let mut segments: Vec<Range<u64>> = Vec::new();
    let mut which = vec![0usize; tensors.len()];
    for i in order {
        let t = &tensors[i];
        if t.end < t.start {
            return Err(VulkanError::BadArgument {
                op: "load_weights",
                message: format!("tensor {i} has a negative range {t:?}"),
            });
        }
        let start = t.start / align * align;
        if t.end - start > max {
            return Err(VulkanError::TooLarge {
                what: format!("tensor {i} ({} bytes)", t.end - t.start),
                requested: t.end - start,
                limit: max,
            });
        }
        match segments.last_mut() {
            Some(seg) if t.end.max(seg.end) - seg.start <= max => seg.end = seg.end.max(t.end),
            _ => segments.push(start..t.end),
        }
        which[i] = segments.len() - 1;
    }
    Ok((segments, which))
}

impl Device {
    /// How this device lays weights out (see [`WeightLayout`]).
    pub fn weight_layout(&self) -> WeightLayout {
        let info = &self.shared.info;
        let align = info
            .limits
            .min_imported_host_pointer_alignment
            .unwrap_or(4096)
            .max(1);
        // A whole number of `align` blocks: the segment may not exceed the allocation cap.
        let max_segment = info.limits.max_memory_allocation_size / align * align;
        WeightLayout { max_segment, align }
    }

    /// Loads the byte ranges `tensors` of `host` (a mapped file) onto the device, charged to
    /// `owner`.
    pub fn load_weights(
        &self,
        host: Arc<dyn HostMemory>,
        tensors: &[Range<u64>],
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<LoadedWeights, VulkanError> {
        let started = Instant::now();
        let file_len = host.bytes().len() as u64;
        if let Some(t) = tensors.iter().find(|t| t.end > file_len) {
            return Err(VulkanError::BadArgument {
                op: "load_weights",
                message: format!("tensor range {t:?} is past the end of the {file_len}-byte file"),
            });
        }
        let info = &self.shared.info;
        let can_import = self.shared.features.host_import;
        let resolved = match strategy {
            LoadStrategy::Auto if can_import && info.is_uma() => LoadStrategy::Import,
            LoadStrategy::Auto => LoadStrategy::Copy,
            s => s,
        };
        let layout = self.weight_layout();
        let (ranges, which) = plan(tensors, layout.max_segment, layout.align)?;

        let mut used = resolved;
        let segments = match resolved {
            LoadStrategy::Import => match self.import_segments(&host, &ranges, owner) {
                Ok(s) => s,
                Err(e) if strategy == LoadStrategy::Auto => {
                    tracing::warn!(error = %e, "importing the weights failed; copying instead");
                    used = LoadStrategy::Copy;
                    self.copy_segments(&host, &ranges, owner, layout)?
                }
                Err(e) => return Err(e),
            },
            _ => self.copy_segments(&host, &ranges, owner, layout)?,
        };
        let places = which
            .iter()
            .zip(tensors)
            .map(|(&s, t)| (s, t.start - ranges[s].start))
            .collect();
        let bytes = ranges.iter().map(|r| layout.segment_bytes(r)).sum();
        Ok(LoadedWeights {
            segments,
            places,
            strategy: used,
            bytes,
            elapsed: started.elapsed(),
        })
    }

    fn import_segments(
        &self,
        host: &Arc<dyn HostMemory>,
        ranges: &[Range<u64>],
        owner: OwnerId,
    ) -> Result<Vec<Segment>, VulkanError> {
        ranges
            .iter()
            .map(|r| {
                Ok(Segment {
                    buffer: self.import_host(
                        host.clone(),
                        r.start as usize..r.end as usize,
                        owner,
                    )?,
                })
            })
            .collect()
    }

    fn copy_segments(
        &self,
        host: &Arc<dyn HostMemory>,
        ranges: &[Range<u64>],
        owner: OwnerId,
        layout: WeightLayout,
    ) -> Result<Vec<Segment>, VulkanError> {
        let bytes = host.bytes();
        // The same whole blocks an import would map, in chunks of exactly their size.
        let sizes: Vec<(MemoryKind, u64)> = ranges
            .iter()
            .map(|r| (MemoryKind::Device, layout.segment_bytes(r)))
            .collect();
        let buffers = self.alloc_many(&sizes, owner)?;
        ranges
            .iter()
            .zip(buffers)
            .map(|(r, mut buffer)| {
                self.write(&mut buffer, 0, &bytes[r.start as usize..r.end as usize])?;
                Ok(Segment { buffer })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_groups_in_file_order_without_splitting() {
        let t = [100..200, 0..50, 4096..9000, 9000..9100];
        let (segs, which) = plan(&t, 8192, 4096).unwrap();
        assert_eq!(segs, vec![0..200, 4096..9100]);
        assert_eq!(which, vec![0, 0, 1, 1]);
        let e = plan(std::slice::from_ref(&(0..10_000)), 8192, 4096).unwrap_err();
        assert!(matches!(e, VulkanError::TooLarge { .. }));
    }

    #[test]
    fn a_segment_grows_until_the_cap() {
        let t: Vec<Range<u64>> = (0..10).map(|i| i * 1000..(i + 1) * 1000).collect();
        let (segs, _) = plan(&t, 4000, 1).unwrap();
        assert_eq!(segs, vec![0..4000, 4000..8000, 8000..10000]);
    }
}
