//! How big the memory budget is: probe the sources (Vulkan heaps, AMD sysfs, physical RAM) and
//! resolve `[memory] budget` against them.
//!
//! On a unified-memory machine the GPU can see the BIOS carve-out ("VRAM") plus GTT, a window
//! onto system RAM whose size the kernel sets. Vulkan reports both as heaps; amdgpu's sysfs reports
//! both as totals. We take one source, never add them together, and never go above physical RAM.
//!
//! Architecture invariant: [`resolve`] is pure; only [`probe`] reads sysfs and system memory.

use std::path::Path;

use halo_kernels::DeviceInfo;

use crate::config::{BudgetSetting, AUTO_BUDGET_CAP};
use crate::residency::format_bytes;

/// What each source says. `None` means the source was not available.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemorySources {
    /// GPU-visible bytes according to the Vulkan heaps (live budgets where VK_EXT_memory_budget
    /// is present).
    pub vulkan_visible: Option<u64>,
    /// amdgpu `mem_info_vram_total` for the chosen device.
    pub sysfs_vram: Option<u64>,
    /// amdgpu `mem_info_gtt_total` for the chosen device.
    pub sysfs_gtt: Option<u64>,
    pub physical_ram: u64,
}

/// The resolved budget and how it was reached (shown by `halo status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetReport {
    pub setting: BudgetSetting,
    pub reserve: u64,
    pub sources: MemorySources,
    /// The GPU-visible figure the chosen source gives, capped at physical RAM.
    pub gpu_visible: u64,
    pub budget: u64,
    pub explanation: String,
}

/// Reads the sources for `device` (or only physical RAM when there is no device).
pub fn probe(device: Option<&DeviceInfo>) -> MemorySources {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let mut sources = MemorySources {
        physical_ram: sys.total_memory(),
        ..Default::default()
    };
    if let Some(dev) = device {
        // A CPU device (lavapipe) reports a nominal heap (2 GiB in Mesa 22.3) while it really
        // allocates from system RAM, so only a real GPU's heaps count.
        if dev.device_type != halo_kernels::DeviceType::Cpu {
            sources.vulkan_visible = Some(vulkan_visible(dev));
        }
        if dev.is_amd() {
            if let Some((vram, gtt)) = amdgpu_sysfs(Path::new("/sys/class/drm"), dev.device_id) {
                sources.sysfs_vram = Some(vram);
                sources.sysfs_gtt = Some(gtt);
            }
        }
    }
    sources
}

/// GPU-visible bytes from the heaps. A discrete GPU's own memory is its device-local heaps; on a
/// unified-memory device every heap is a window onto the same RAM, so we add them (RADV reports
/// the carve-out and GTT as separate heaps) and let the RAM cap catch any overlap.
fn vulkan_visible(dev: &DeviceInfo) -> u64 {
    let heap_bytes = |h: &halo_kernels::HeapInfo| h.budget.unwrap_or(h.size).min(h.size);
    if dev.is_uma() {
        dev.heaps.iter().map(heap_bytes).sum()
    } else {
        dev.heaps
            .iter()
            .filter(|h| h.device_local)
            .map(heap_bytes)
            .sum()
    }
}

/// VRAM and GTT totals of the amdgpu card whose PCI device id is `device_id`.
fn amdgpu_sysfs(drm: &Path, device_id: u32) -> Option<(u64, u64)> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut cards: Vec<_> = std::fs::read_dir(drm).ok()?.flatten().collect();
    cards.sort_by_key(|e| e.file_name());
    for entry in cards {
        let name = entry.file_name().to_string_lossy().to_string();
        // card0, card1 … but not card0-DP-1 connectors
        if !name.starts_with("card") || name.contains('-') {
            continue;
        }
        let dev = entry.path().join("device");
        let hex = |s: String| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        if read(&dev.join("vendor")).and_then(hex) != Some(0x1002) {
            continue;
        }
        if read(&dev.join("device")).and_then(hex) != Some(device_id) {
            continue;
        }
        let vram = read(&dev.join("mem_info_vram_total"))?.parse().ok()?;
        let gtt = read(&dev.join("mem_info_gtt_total"))?.parse().ok()?;
        return Some((vram, gtt));
    }
    None
}

/// Works out the budget. `auto` = min([`AUTO_BUDGET_CAP`], GPU-visible − reserve), where
/// GPU-visible is amdgpu's VRAM + GTT when sysfs has them (they are disjoint pools), else the
/// Vulkan heaps, else physical RAM (no device), and is never above physical RAM.
pub fn resolve(setting: BudgetSetting, reserve: u64, sources: &MemorySources) -> BudgetReport {
    let ram = sources.physical_ram;
    let (raw, from) = match (
        sources.sysfs_vram,
        sources.sysfs_gtt,
        sources.vulkan_visible,
    ) {
        (Some(v), Some(g), _) => (v.saturating_add(g), "amdgpu sysfs VRAM + GTT"),
        (_, _, Some(vk)) => (vk, "Vulkan heaps"),
        _ => (ram, "physical RAM (no GPU device, or a CPU device)"),
    };
    let gpu_visible = if ram > 0 { raw.min(ram) } else { raw };
    let capped_note = if ram > 0 && raw > ram {
        format!(" (capped from {} to physical RAM)", format_bytes(raw))
    } else {
        String::new()
    };
    let (budget, explanation) = match setting {
        BudgetSetting::Fixed(b) => {
            let warn = if b > gpu_visible {
                format!(
                    "; warning: this is more than the {} the GPU can see",
                    format_bytes(gpu_visible)
                )
            } else {
                String::new()
            };
            (b, format!("fixed by [memory] budget{warn}"))
        }
        BudgetSetting::Auto => {
            let after_reserve = gpu_visible.saturating_sub(reserve);
            let budget = after_reserve.min(AUTO_BUDGET_CAP);
            let which = if budget == AUTO_BUDGET_CAP && after_reserve > AUTO_BUDGET_CAP {
                format!("the {} cap", format_bytes(AUTO_BUDGET_CAP))
            } else {
                format!(
                    "{} GPU-visible from {from}{capped_note} minus {} reserve",
                    format_bytes(gpu_visible),
                    format_bytes(reserve)
                )
            };
            (budget, format!("auto: {which}"))
        }
    };
    BudgetReport {
        setting,
        reserve,
        sources: sources.clone(),
        gpu_visible,
        budget,
        explanation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn strix_halo_uses_sysfs_and_the_cap() {
        // 512 MiB carve-out + 110 GiB GTT on 128 GiB RAM; Vulkan over-reports.
        let s = MemorySources {
            vulkan_visible: Some(135 * GIB),
            sysfs_vram: Some(GIB / 2),
            sysfs_gtt: Some(110 * GIB),
            physical_ram: 128 * GIB,
        };
        let r = resolve(BudgetSetting::Auto, 2 * GIB, &s);
        assert_eq!(r.gpu_visible, 110 * GIB + GIB / 2);
        assert_eq!(r.budget, AUTO_BUDGET_CAP.min(110 * GIB + GIB / 2 - 2 * GIB));
        assert!(r.explanation.contains("sysfs"), "{}", r.explanation);
    }

    #[test]
    fn never_above_physical_ram() {
        let s = MemorySources {
            vulkan_visible: None,
            sysfs_vram: Some(96 * GIB),
            sysfs_gtt: Some(64 * GIB),
            physical_ram: 128 * GIB,
        };
        let r = resolve(BudgetSetting::Auto, 0, &s);
        assert_eq!(r.gpu_visible, 128 * GIB);
        assert_eq!(r.budget, AUTO_BUDGET_CAP);
    }

    #[test]
    fn vulkan_then_ram() {
        let s = MemorySources {
            vulkan_visible: Some(16 * GIB),
            physical_ram: 24 * GIB,
            ..Default::default()
        };
        assert_eq!(resolve(BudgetSetting::Auto, 2 * GIB, &s).budget, 14 * GIB);
        let s = MemorySources {
            physical_ram: 24 * GIB,
            ..Default::default()
        };
        let r = resolve(BudgetSetting::Auto, 2 * GIB, &s);
        assert_eq!(r.budget, 22 * GIB);
        assert!(r.explanation.contains("no GPU"));
    }

    #[test]
    fn reserve_larger_than_memory_gives_zero() {
        let s = MemorySources {
            physical_ram: GIB,
            ..Default::default()
        };
        assert_eq!(resolve(BudgetSetting::Auto, 2 * GIB, &s).budget, 0);
    }

    #[test]
    fn fixed_budget_is_kept_and_warned() {
        let s = MemorySources {
            physical_ram: 8 * GIB,
            ..Default::default()
        };
        let r = resolve(BudgetSetting::Fixed(16 * GIB), 0, &s);
        assert_eq!(r.budget, 16 * GIB);
        assert!(r.explanation.contains("warning"));
    }

    #[test]
    fn sysfs_matches_the_right_card() {
        let dir = tempfile::tempdir().unwrap();
        let card = |n: &str, vendor: &str, dev: &str, vram: u64, gtt: u64| {
            let d = dir.path().join(n).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), vendor).unwrap();
            std::fs::write(d.join("device"), dev).unwrap();
            std::fs::write(d.join("mem_info_vram_total"), vram.to_string()).unwrap();
            std::fs::write(d.join("mem_info_gtt_total"), gtt.to_string()).unwrap();
        };
        card("card0", "0x10de\n", "0x2330\n", 80, 1);
        card("card1", "0x1002\n", "0x1586\n", 512, 1024);
        std::fs::create_dir_all(dir.path().join("card1-DP-1")).unwrap();
        assert_eq!(amdgpu_sysfs(dir.path(), 0x1586), Some((512, 1024)));
        assert_eq!(amdgpu_sysfs(dir.path(), 0x1234), None);
    }
}
