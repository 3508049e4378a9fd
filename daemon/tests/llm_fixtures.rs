//! The LLM forward pass on tiny random-weight llama, qwen3, gemma3, qwen3moe and glm4 models, and a
//! wider llama in the K-quants (tests/fixtures/tiny/, made by gen_tiny_models.py), against
//! transformers' float32 logits.
//!
//! Each file's reference was computed by transformers on the weights dequantized from that same
//! file, so even the quantized files should agree closely: what remains is the engine's own
//! rounding, not the quantization.
//!
//! The engine keeps its KV cache in f16 by default, and that rounding alone moves the last logits
//! (of order 1 to 3 here) by up to about 1.4e-3 (gemma3): transformers itself moves that much when
//! its keys and values are rounded to f16. So refs.json holds two references, and each file runs
//! against both:
//! - with an f16 cache against transformers with keys and values rounded to f16, which isolates
//!   everything else the engine does: max |Δ| ≤ 5e-4 for every file;
//! - with an f16 cache against transformers in float32 throughout: ≤ 2e-3 for F32 files (the
//!   cache's rounding), ≤ 1e-2 for F16 and quantized files;
//! - F32 files also with an f32 cache (`kv_cache = "f32"`) against transformers in float32:
//!   max |Δ| ≤ 1e-3.
//!
//! And the top token equals the reference's wherever the reference's top two are more than 1e-2
//! apart.
//!
//! The prompt runs twice: as one batch (matrix-matrix kernels) and token by token (the KV cache
//! and the matrix-vector kernels); in the second run every step's top token is checked too.

use halo_kernels::{Device, DeviceOptions, LoadStrategy, OwnerId};
use halod::config::KvCacheType;
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
/// the reference: with an f16 KV cache for every file, and for F32 files also with an f32 cache.
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
    let exact = floats("last_logits");
    let f16_kv = floats("last_logits_f16_kv");
    let top: Vec<usize> = r["argmax"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let margins = floats("margins");

    let file = GgufFile::open(std::path::Path::new(&format!("{DIR}/{name}"))).unwrap();
    let m = LlmModel::load(&dev, &file, LoadStrategy::Copy, OwnerId(1)).unwrap();

    // (cache, reference, tolerance): the f16 cache against the reference that rounds keys and
    // values to f16 too; the f32 cache of an F32 file against plain f32 transformers; and, with
    // room for the cache's own rounding, the f16 cache against plain f32.
    let mut runs = vec![
        (KvCacheType::F16, &f16_kv, "with an f16 KV cache", 5e-4),
        (
            KvCacheType::F16,
            &exact,
            "in f32, from an f16 KV cache",
            if ty == "F32" { 2e-3 } else { 1e-2 },
        ),
    ];
    if ty == "F32" {
        runs.push((
            KvCacheType::F32,
            &exact,
            "in f32, from an f32 KV cache",
            1e-3,
        ));
    }
    for (kv, want, what, tol) in runs {
        // The whole prompt as one batch.
        let mut sc = m.new_scratch(64, 1, OwnerId(2)).unwrap();
        let mut seq = m.new_sequence(64, kv, OwnerId(2)).unwrap();
        let batch = m.forward(&mut sc, &mut seq, &prompt).unwrap();
        let batch_diff = max_diff(&batch, want);

        // Token by token: every step's top token, and the last step's logits.
        let mut seq = m.new_sequence(64, kv, OwnerId(3)).unwrap();
        let mut step = Vec::new();
        let mut tops = Vec::new();
        for t in &prompt {
            step = m.forward(&mut sc, &mut seq, &[*t]).unwrap();
            tops.push(argmax(&step));
        }
        let step_diff = max_diff(&step, want);
        eprintln!(
            "{name}: max |Δ| of the last logits vs transformers {what}: batch {batch_diff:.2e}, \
             token by token {step_diff:.2e} (tolerance {tol:.0e}); top tokens {tops:?}, \
             reference {top:?}"
        );
        assert!(
            batch_diff <= tol,
            "{name}: batched logits differ from transformers' {what} by {batch_diff:.3e} \
             (> {tol:.0e})"
        );
        assert!(
            step_diff <= tol,
            "{name}: token-by-token logits differ from transformers' {what} by {step_diff:.3e} \
             (> {tol:.0e})"
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

/// The estimate (from the header and the config) is what loading and one sequence allocate,
/// with either KV cache type, to the byte; an f32 cache holds twice the f16 one's bytes.
#[test]
fn the_estimate_matches_the_allocation_for_both_cache_types() {
    let Some(dev) = device() else {
        return;
    };
    for arch in ["llama", "gemma3", "qwen3moe", "glm4"] {
        let path = format!("{DIR}/tiny-{arch}-Q8_0.gguf");
        let file = GgufFile::open(std::path::Path::new(&path)).unwrap();
        let mut actual = Vec::new();
        for (i, kv) in [KvCacheType::F16, KvCacheType::F32].into_iter().enumerate() {
            let owner = OwnerId(100 + i as u64);
            let m = LlmModel::load(&dev, &file, LoadStrategy::Copy, owner).unwrap();
            let seq = m.new_sequence(64, kv, owner).unwrap();
            let sc = m.new_scratch(64, 1, owner).unwrap();
            let est =
                halod::llm::engine::estimate(&file.header, Some(64), 1, kv, dev.weight_layout())
                    .unwrap();
            // What the device holds for the owner, chunks whole: the estimate is exact.
            let got = dev.ledger().owner(owner);
            assert_eq!(got, est, "{arch} {kv:?}: estimate {est}, allocated {got}");
            actual.push(est);
            drop((seq, sc, m));
            assert_eq!(dev.ledger().owner(owner), 0);
        }
        let hp = halod::llm::hparams::HParams::from_gguf(&file.header).unwrap();
        let f16_kv = 2 * hp.n_layer * hp.n_head_kv * 64 * hp.head_dim * 2;
        assert!(actual[1] - actual[0] >= f16_kv, "{arch}: {actual:?}");
    }
}

#[test]
fn qwen3_yarn_rope_scaling_f32() {
    check("qwen3yarn", "F32");
}

/// One forward step over several sequences at once (continuous batching) gives each sequence
/// the logits it gets alone: three prompts that join one after another while the earlier ones
/// decode, on a dense, a gemma and a mixture-of-experts model. Greedy tokens are equal; the
/// logits differ only by the rounding of the batch's matrix kernel (matmul for every row
/// instead of matvec for a lone token), stated below.
#[test]
fn batched_steps_give_each_sequence_its_solo_logits() {
    use halod::llm::model::Part;
    let Some(dev) = device() else {
        return;
    };
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 2, 7], &[3, 3, 8], &[4, 11, 6, 2, 10, 12, 1]];
    const STEPS: usize = 6;
    for arch in ["llama", "gemma3", "qwen3moe"] {
        let path = format!("{DIR}/tiny-{arch}-Q8_0.gguf");
        let file = GgufFile::open(std::path::Path::new(&path)).unwrap();
        let m = LlmModel::load(&dev, &file, LoadStrategy::Copy, OwnerId(1)).unwrap();
        let kv = KvCacheType::F16;
        // Alone: each prompt, then greedy tokens one by one.
        let mut solo = Vec::new();
        for p in prompts {
            let mut sc = m.new_scratch(64, 1, OwnerId(2)).unwrap();
            let mut seq = m.new_sequence(64, kv, OwnerId(2)).unwrap();
            let mut logits = vec![m.forward(&mut sc, &mut seq, p).unwrap()];
            for _ in 0..STEPS {
                let t = argmax(logits.last().unwrap()) as u32;
                logits.push(m.forward(&mut sc, &mut seq, &[t]).unwrap());
            }
            solo.push(logits);
        }
        // Batched: prompt i joins at step i, beside the decoding of the earlier ones.
        let mut sc = m.new_scratch(64, 3, OwnerId(3)).unwrap();
        let mut seqs: Vec<_> = (0..3)
            .map(|_| m.new_sequence(64, kv, OwnerId(3)).unwrap())
            .collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        for step in 0..STEPS + 3 {
            let feeds: Vec<Vec<u32>> = (0..3)
                .map(|i| match got[i].last() {
                    _ if step < i => Vec::new(),
                    None => prompts[i].to_vec(),
                    Some(_) if got[i].len() > STEPS => Vec::new(),
                    Some(l) => vec![argmax(l) as u32],
                })
                .collect();
            let mut parts: Vec<Part> = seqs
                .iter_mut()
                .zip(&feeds)
                .filter(|(_, f)| !f.is_empty())
                .map(|(seq, f)| Part {
                    seq,
                    tokens: f,
                    logits: true,
                })
                .collect();
            if parts.is_empty() {
                break;
            }
            let out = m.forward_batch(&mut sc, &mut parts).unwrap();
            let mut out = out.into_iter();
            for (i, f) in feeds.iter().enumerate() {
                if !f.is_empty() {
                    got[i].push(out.next().unwrap().unwrap());
                }
            }
        }
        for i in 0..3 {
            assert_eq!(got[i].len(), solo[i].len(), "{arch} sequence {i}");
            for (s, (a, b)) in got[i].iter().zip(&solo[i]).enumerate() {
                assert_eq!(argmax(a), argmax(b), "{arch} sequence {i} step {s}");
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                eprintln!(
                    "{arch} seq {i} step {s}: max |batched - solo| = {:.2e} of {scale:.2}",
                    diff
                );
                assert!(
                    diff <= 1e-3 * scale,
                    "{arch} seq {i} step {s}: {diff} of {scale}"
                );
            }
        }
    }
}
