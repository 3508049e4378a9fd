//! Compute pipelines: one shared layout (no descriptor sets, 128 bytes of push constants holding
//! buffer addresses and shapes), one pipeline per (kernel, specialization constants), and a
//! pipeline cache persisted to disk so a restart does not recompile.

use std::collections::HashMap;
use std::path::Path;

use ash::vk;

use crate::error::VulkanError;
use crate::KernelId;

/// Push constants every kernel may use; 128 bytes is the minimum every device guarantees.
pub(crate) const PUSH_BYTES: u32 = 128;

pub(crate) struct Pipelines {
    cache: vk::PipelineCache,
    pub(crate) layout: vk::PipelineLayout,
    modules: HashMap<KernelId, vk::ShaderModule>,
    pipelines: HashMap<(KernelId, Vec<u32>), vk::Pipeline>,
}

impl Pipelines {
    pub(crate) fn new(
        device: &ash::Device,
        cache_path: Option<&Path>,
    ) -> Result<Self, VulkanError> {
        let initial = cache_path
            .and_then(|p| std::fs::read(p).ok())
            .unwrap_or_default();
        let info_c = vk::PipelineCacheCreateInfo::default().initial_data(&initial);
        // SAFETY: valid create info. A stale or foreign cache blob is rejected by the driver's
        // header check (vendor, device and cache UUID), which then starts empty.
        let cache = match unsafe { device.create_pipeline_cache(&info_c, None) } {
            Ok(c) => c,
            Err(_) if !initial.is_empty() => {
                let empty = vk::PipelineCacheCreateInfo::default();
                // SAFETY: valid create info.
                unsafe { device.create_pipeline_cache(&empty, None) }
                    .map_err(|r| VulkanError::from_vk("vkCreatePipelineCache", r))?
            }
            Err(r) => return Err(VulkanError::from_vk("vkCreatePipelineCache", r)),
        };
        if !initial.is_empty() {
            tracing::debug!(bytes = initial.len(), "loaded pipeline cache");
        }
        let push = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .offset(0)
            .size(PUSH_BYTES)];
        let layout_info = vk::PipelineLayoutCreateInfo::default().push_constant_ranges(&push);
        // SAFETY: valid create info; 128 bytes is within every device's maxPushConstantsSize.
        let layout = match unsafe { device.create_pipeline_layout(&layout_info, None) } {
            Ok(l) => l,
            Err(r) => {
                // SAFETY: the cache is unused.
                unsafe { device.destroy_pipeline_cache(cache, None) };
                return Err(VulkanError::from_vk("vkCreatePipelineLayout", r));
            }
        };
        Ok(Pipelines {
            cache,
            layout,
            modules: HashMap::new(),
            pipelines: HashMap::new(),
        })
    }

    /// The pipeline for `kernel` with specialization constants `spec` (constant i = spec[i]),
    /// compiled on first use.
    pub(crate) fn get(
        &mut self,
        device: &ash::Device,
        kernel: KernelId,
        spec: &[u32],
    ) -> Result<vk::Pipeline, VulkanError> {
        if let Some(p) = self.pipelines.get(&(kernel, spec.to_vec())) {
            return Ok(*p);
        }
        let module = match self.modules.get(&kernel) {
            Some(m) => *m,
            None => {
                let words = ash::util::read_spv(&mut std::io::Cursor::new(kernel.spirv()))
                    .map_err(|e| VulkanError::BadArgument {
                        op: "shader module",
                        message: format!("{}: bad SPIR-V: {e}", kernel.name()),
                    })?;
                let info = vk::ShaderModuleCreateInfo::default().code(&words);
                // SAFETY: the SPIR-V was produced by glslc and validated at build time.
                let m = unsafe { device.create_shader_module(&info, None) }
                    .map_err(|r| VulkanError::from_vk("vkCreateShaderModule", r))?;
                self.modules.insert(kernel, m);
                m
            }
        };
        let entries: Vec<vk::SpecializationMapEntry> = (0..spec.len() as u32)
            .map(|i| {
                vk::SpecializationMapEntry::default()
                    .constant_id(i)
                    .offset(i * 4)
                    .size(4)
            })
            .collect();
        let data: Vec<u8> = spec.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let spec_info = vk::SpecializationInfo::default()
            .map_entries(&entries)
            .data(&data);
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main")
            .specialization_info(&spec_info);
        let info = vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(self.layout);
        // SAFETY: all referenced objects belong to this device and outlive the call; the
        // specialization data holds one u32 per map entry.
        let pipeline = unsafe { device.create_compute_pipelines(self.cache, &[info], None) }
            .map_err(|(_, r)| VulkanError::from_vk("vkCreateComputePipelines", r))?[0];
        tracing::debug!(kernel = kernel.name(), ?spec, "compiled pipeline");
        self.pipelines.insert((kernel, spec.to_vec()), pipeline);
        Ok(pipeline)
    }

    /// Writes the cache blob to `path` (atomically: write a temp file, then rename).
    pub(crate) fn save(&self, device: &ash::Device, path: &Path) -> Result<(), VulkanError> {
        if self.pipelines.is_empty() {
            return Ok(()); // nothing compiled in this run: keep whatever is on disk
        }
        // SAFETY: the cache belongs to this device.
        let data = unsafe { device.get_pipeline_cache_data(self.cache) }
            .map_err(|r| VulkanError::from_vk("vkGetPipelineCacheData", r))?;
        let io = |e: std::io::Error| VulkanError::Call {
            call: "pipeline cache save",
            result: 0,
            message: format!("{}: {e}", path.display()),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &data).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        tracing::debug!(bytes = data.len(), path = %path.display(), "saved pipeline cache");
        Ok(())
    }

    /// # Safety
    /// No pipeline may be in use by pending work.
    pub(crate) unsafe fn destroy(&mut self, device: &ash::Device) {
        // SAFETY: per the contract, nothing uses these objects any more.
        unsafe {
            for (_, p) in self.pipelines.drain() {
                device.destroy_pipeline(p, None);
            }
            for (_, m) in self.modules.drain() {
                device.destroy_shader_module(m, None);
            }
            device.destroy_pipeline_layout(self.layout, None);
            device.destroy_pipeline_cache(self.cache, None);
        }
    }
}
