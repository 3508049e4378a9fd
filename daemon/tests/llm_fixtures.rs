//! The LLM forward pass on tiny random-weight llama, qwen3, gemma3, qwen3moe and glm4 models, and a
//! wider llama in the K-quants (tests/fixtures/tiny/, made by gen_tiny_models.py), against
//! transformers' float32 logits.
//!
//! Each file's reference was computed by transformers on the weights dequantized from that same
//! file, so even the quantized files should agree closely: what remains is the engine's own
//! rounding, not the quantization.
//!
//! The engine keeps its KV cache in f16, and that rounding alone moves the last logits (of order 1
//! to 3 here) by 5e-4 (llama), 6e-4 (qwen3) and 1.2e-3 (gemma3): transformers itself moves that much
//! when its keys and values are rounded to f16. So refs.json holds two references, and the last
//! position's logits are checked against both:
//! - transformers in float32 throughout: max |Δ| ≤ 2e-3 for F32 files (1e-3 plus room for the
//!   cache's 1.2e-3 on gemma3), ≤ 1e-2 for F16, Q8_0 and Q4_0 files;
//! - transformers with keys and values rounded to f16, which isolates everything else the engine
//!   does: max |Δ| ≤ 5e-4 for every file (measured: at most about 2e-4; the remainder comes from
//!   values that land near an f16 rounding boundary and round the other way).
//!
//! And the top token equals the reference's wherever the reference's top two are more than 1e-2
//! apart.
//!
//! The prompt runs twice: as one batch (matrix-matrix kernels) and token by token (the KV cache
//! and the matrix-vector kernels); in the second run every step's top token is checked too.

use halo_kernels::{Device, DeviceOptions, LoadStrategy, OwnerId};
use halod::gguf::GgufFile;
use halod::llm::model::LlmModel;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");
/// Reference top-two gaps at or below this are near-ties where the top token may differ.
const NEAR_TIE: f64 = 1e-2;

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

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

fn refs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/refs.json")).unwrap()).unwrap()
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
}

/// Runs the prompt through `arch`'s `ty` file, batched and token by token, and checks both against
/// the reference.
fn check(arch: &str, ty: &str) {
    let Some(dev) = device() else {
        return;
    };
    let name = format!("tiny-{arch}-{ty}.gguf");
    let refs = refs();
    let prompt: Vec<u32> = refs["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let r = &refs["models"][&name];
    assert_eq!(r["arch"], arch, "{name} has no reference");
    let floats = |key: &str| -> Vec<f64> {
        r[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let want = floats("last_logits");
    let want_f16_kv = floats("last_logits_f16_kv");
    let top: Vec<usize> = r["argmax"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let margins = floats("margins");
    let tol = if ty == "F32" { 2e-3 } else { 1e-2 };
    let tol_kv = 5e-4;

    let file = GgufFile::open(std::path::Path::new(&format!("{DIR}/{name}"))).unwrap();
    let m = LlmModel::load(&dev, &file, LoadStrategy::Copy, OwnerId(1)).unwrap();

    // The whole prompt as one batch.
    let mut seq = m.new_sequence(64, OwnerId(2)).unwrap();
    let batch = m.forward(&mut seq, &prompt).unwrap();
    let batch_diff = max_diff(&batch, &want);
    let batch_diff_kv = max_diff(&batch, &want_f16_kv);

    // Token by token: every step's top token, and the last step's logits.
    let mut seq = m.new_sequence(64, OwnerId(3)).unwrap();
    let mut step = Vec::new();
    let mut tops = Vec::new();
    for t in &prompt {
        step = m.forward(&mut seq, &[*t]).unwrap();
        tops.push(argmax(&step));
    }
    let step_diff = max_diff(&step, &want);
    let step_diff_kv = max_diff(&step, &want_f16_kv);
    eprintln!(
        "{name}: max |Δ| of the last logits vs transformers in f32: batch {batch_diff:.2e}, \
         token by token {step_diff:.2e} (tolerance {tol:.0e}); with an f16 KV cache: batch \
         {batch_diff_kv:.2e}, token by token {step_diff_kv:.2e} (tolerance {tol_kv:.0e}); top \
         tokens {tops:?}, reference {top:?}"
    );

    assert!(
        batch_diff <= tol,
        "{name}: batched logits differ from transformers' by {batch_diff:.3e} (> {tol:.0e})"
    );
    assert!(
        step_diff <= tol,
        "{name}: token-by-token logits differ from transformers' by {step_diff:.3e} (> {tol:.0e})"
    );
    assert!(
        batch_diff_kv <= tol_kv,
        "{name}: batched logits differ from transformers' with an f16 KV cache by \
         {batch_diff_kv:.3e} (> {tol_kv:.0e})"
    );
    assert!(
        step_diff_kv <= tol_kv,
        "{name}: token-by-token logits differ from transformers' with an f16 KV cache by \
         {step_diff_kv:.3e} (> {tol_kv:.0e})"
    );
    let last = prompt.len() - 1;
    if margins[last] > NEAR_TIE {
        assert_eq!(argmax(&batch), top[last], "{name}: batched top token");
    }
    for (i, (ours, theirs)) in tops.iter().zip(&top).enumerate() {
        if margins[i] > NEAR_TIE {
            assert_eq!(
                ours, theirs,
                "{name}: top token after prompt position {i} (reference margin {:.3})",
                margins[i]
            );
        }
    }
}

#[test]
fn llama_f32() {
    check("llama", "F32");
}

#[test]
fn llama_f16() {
    check("llama", "F16");
}

#[test]
fn llama_q8_0() {
    check("llama", "Q8_0");
}

#[test]
fn llama_q4_0() {
    check("llama", "Q4_0");
}

#[test]
fn qwen3_f32() {
    check("qwen3", "F32");
}

#[test]
fn qwen3_f16() {
    check("qwen3", "F16");
}

#[test]
fn qwen3_q8_0() {
    check("qwen3", "Q8_0");
}

#[test]
fn qwen3_q4_0() {
    check("qwen3", "Q4_0");
}

#[test]
fn gemma3_f32() {
    check("gemma3", "F32");
}

#[test]
fn gemma3_f16() {
    check("gemma3", "F16");
}

#[test]
fn gemma3_q8_0() {
    check("gemma3", "Q8_0");
}

#[test]
fn gemma3_q4_0() {
    check("gemma3", "Q4_0");
}

#[test]
fn qwen3moe_f32() {
    check("qwen3moe", "F32");
}

#[test]
fn qwen3moe_f16() {
    check("qwen3moe", "F16");
}

#[test]
fn qwen3moe_q8_0() {
    check("qwen3moe", "Q8_0");
}

#[test]
fn qwen3moe_q4_0() {
    check("qwen3moe", "Q4_0");
}

#[test]
fn glm4_f32() {
    check("glm4", "F32");
}

#[test]
fn glm4_f16() {
    check("glm4", "F16");
}

#[test]
fn glm4_q8_0() {
    check("glm4", "Q8_0");
}

#[test]
fn glm4_q4_0() {
    check("glm4", "Q4_0");
}

#[test]
fn llama256_q4_k() {
    check("llama256", "Q4_K");
}

#[test]
fn llama256_q5_k() {
    check("llama256", "Q5_K");
}

#[test]
fn llama256_q6_k() {
    check("llama256", "Q6_K");
}

#[test]
fn llama3_rope_factors_f32() {
    check("llama3rope", "F32");
}

#[test]
fn gemma3_linear_rope_scaling_f32() {
    check("gemma3linear", "F32");
}

/// A generated token reads one row of the (untied) embeddings and 2 of the 8 experts of each
/// layer, not every expert: 268 032 of the file's 628 224 tensor bytes (counted with gguf-py).
#[test]
fn moe_tokens_read_only_the_experts_they_use() {
    let Some(dev) = device() else {
        return;
    };
    let path = format!("{DIR}/tiny-qwen3moe-F32.gguf");
    let file = GgufFile::open(std::path::Path::new(&path)).unwrap();
    let m = LlmModel::load(&dev, &file, LoadStrategy::Copy, OwnerId(1)).unwrap();
    assert_eq!(m.weight_bytes_per_token(), 268_032);
}
