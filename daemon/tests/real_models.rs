//! The real models from PyPI (scripts/fetch-models.sh puts them in models/): halo's readers on
//! real files. Skips when the files are absent, unless HALO_REQUIRE_MODELS=1 (CI sets it).

mod common;

use common::model;

use halod::gguf::GgufFile;

#[test]
fn smollm2_header() {
    let Some(p) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let f = GgufFile::open(&p).unwrap();
    let g = &f.header;
    assert_eq!(g.str("general.architecture").unwrap(), "llama");
    assert_eq!(g.u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.str("tokenizer.ggml.model").unwrap(), "gpt2");
    let tokens = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(tokens.len(), 49152);
    let emb = g.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.dims, [576, 49152]);
    assert!(g.tensors.len() > 200);
}

#[test]
fn gemma3_header() {
    let Some(p) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let f = GgufFile::open(&p).unwrap();
    let g = &f.header;
    assert_eq!(g.str("general.architecture").unwrap(), "gemma3");
    assert_eq!(g.str("tokenizer.ggml.model").unwrap(), "llama");
    let types: std::collections::BTreeSet<_> = g.tensors.iter().map(|t| t.ty.name()).collect();
    for ty in ["q8_0", "q4_k", "q6_k", "f32"] {
        assert!(types.contains(ty), "{types:?}");
    }
}

#[test]
fn a_truncated_real_file_is_a_clear_error() {
    let Some(p) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = GgufFile::open(&cut).err().unwrap().to_string();
    assert!(e.starts_with(&cut.display().to_string()), "{e}");
    assert!(e.contains("past the end"), "{e}");
}
