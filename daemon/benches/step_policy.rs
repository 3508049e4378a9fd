//! `cargo bench -p halod --bench step_policy`: what choosing the next piece of GPU work costs
//! the executor, beside what a decode step of a real model costs on the current device, in the
//! same run. Prints figures; asserts nothing.
//!
//! The policy is driven with 8 LLM lanes (mixed decoding and prefilling) and 4 image lanes; the
//! decode step is SmolLM2 from `models/` (the tiny random llama fixture when it is missing), one
//! token at a time. HALO_VULKAN_DEVICE picks the device.

use std::time::{Duration, Instant};

use halo_kernels::{Device, DeviceOptions, LoadStrategy, OwnerId};
use halod::config::KvCacheType;
use halod::gguf::GgufFile;
use halod::llm::model::LlmModel;
use halod::scheduler::step::{LlmLane, Pick, Ran, StepConfig, StepPolicy};

fn policy_ns() -> f64 {
    let mut p = StepPolicy::new(StepConfig::default());
    let mut lanes: Vec<LlmLane> = (0..8)
        .map(|k| LlmLane {
            key: k,
            decoding: (k % 3) as usize,
            prefilling: (k % 2) as usize,
        })
        .collect();
    let images: Vec<u64> = (100..104).collect();
    let n = 1_000_000u64;
    let t = Instant::now();
    let mut picks = 0u64;
    for i in 0..n {
        lanes[(i % 8) as usize].decoding = (i % 4) as usize;
        let pick = p.next(&lanes, &images).expect("work");
        let (key, image) = match pick {
            Pick::Llm { lane, .. } => (lanes[lane].key, false),
            Pick::Image { lane, .. } => (images[lane], true),
        };
        p.ran(Ran {
            key,
            image,
            took: Duration::from_micros(15_000),
            rows: if image { 0 } else { 3 },
        });
        picks += image as u64;
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    std::hint::black_box(picks);
    ns
}

fn decode_step_ms() -> Option<(String, f64)> {
    let dev = Device::open(&DeviceOptions::default()).ok()?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let smol = format!("{root}/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tiny = format!("{root}/daemon/tests/fixtures/tiny/tiny-llama-Q8_0.gguf");
    let path = if std::path::Path::new(&smol).exists() {
        smol
    } else {
        tiny
    };
    let file = GgufFile::open(std::path::Path::new(&path)).ok()?;
    let owner = OwnerId(1);
    let m = LlmModel::load(&dev, &file, LoadStrategy::Auto, owner).ok()?;
    let mut sc = m.new_scratch(256, 1, owner).ok()?;
    let mut seq = m.new_sequence(256, KvCacheType::F16, owner).ok()?;
    m.forward(&mut sc, &mut seq, &[1, 2, 3, 4]).ok()?;
    let mut best = f64::MAX;
    for i in 0..16u32 {
        let t = Instant::now();
        m.forward(&mut sc, &mut seq, &[5 + i]).ok()?;
        best = best.min(t.elapsed().as_secs_f64() * 1000.0);
    }
    let name = std::path::Path::new(&path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(path);
    Some((format!("{name} on {}", dev.info().name), best))
}

fn main() {
    let ns = policy_ns();
    println!("step policy: {ns:.0} ns per decision (8 LLM lanes, 4 image lanes)");
    match decode_step_ms() {
        Some((what, ms)) => println!(
            "decode step: {ms:.2} ms ({what}); deciding is {:.4}% of it",
            ns / 1e6 / ms * 100.0
        ),
        None => println!("decode step: no Vulkan device or model to measure"),
    }
}
