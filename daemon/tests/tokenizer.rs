//! The tokenizer and chat templates of the real models against llama.cpp's own results, recorded
//! in tests/fixtures/tokenizer/ by tests/fixtures/gen_tokenizer_refs.py. Skips when the model files
//! are absent, unless HALO_REQUIRE_MODELS=1 (CI sets it).

mod common;

use common::model;

use std::path::PathBuf;

use halod::gguf::GgufFile;
use halod::llm::chat::{ChatTemplate, Message};
use halod::llm::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

struct Loaded {
    gguf: GgufFile,
    tok: Tokenizer,
    refs: Value,
}

fn load(fixture_name: &str) -> Option<Loaded> {
    let refs = fixture(fixture_name);
    let file = refs["model"].as_str().unwrap().to_string();
    let path = model(&file)?;
    let gguf = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf.header).unwrap();
    Some(Loaded { gguf, tok, refs })
}

/// Every reference case must tokenize to exactly llama.cpp's ids; all differences are listed.
fn matches_llama_cpp(l: &Loaded) {
    let cases = l.refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 25 * 2);
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let add = c["add_special"].as_bool().unwrap();
        let parse = c["parse_special"].as_bool().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = l.tok.encode(text, add, parse).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?} add_special={add} parse_special={parse}\n  want {want:?}\n  got  {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// decode(encode(s)) == s when special tokens are not parsed, and streaming gives the same text.
fn round_trips(l: &Loaded) {
    for c in l.refs["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let ids = l.tok.encode(text, false, false).unwrap();
        assert_eq!(l.tok.decode(&ids).unwrap(), text, "{ids:?}");
        let parsed = l.tok.encode(text, true, true).unwrap();
        let whole = l.tok.decode(&parsed).unwrap();
        let mut d = StreamDecoder::new(&l.tok);
        let mut streamed = String::new();
        for id in &parsed {
            streamed.push_str(&d.push(*id));
        }
        streamed.push_str(&d.finish());
        assert_eq!(streamed, whole, "{text:?}");
    }
}

fn chat_renders_like_reference(l: &Loaded) {
    let t = ChatTemplate::from_gguf(&l.gguf.header, &l.tok).unwrap();
    let chat = &l.refs["chat"];
    if chat.is_null() {
        assert!(t.is_none(), "the reference found no chat template");
        return;
    }
    let t = t.expect("the model has a chat template");
    let messages: Vec<Message> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let without = t.render(&messages, false).unwrap();
    let with = t.render(&messages, true).unwrap();
    assert_eq!(without, chat["without_generation_prompt"].as_str().unwrap());
    assert_eq!(with, chat["with_generation_prompt"].as_str().unwrap());
    let header = with
        .strip_prefix(&without)
        .expect("the generation prompt is appended");
    assert!(!header.is_empty());
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let Some(l) = load("smollm2") else { return };
    matches_llama_cpp(&l);
    round_trips(&l);
    chat_renders_like_reference(&l);
    let t = &l.tok;
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos(), t.eos()), (Some(1), Some(2)));
    let im_end = t.encode("<|im_end|>", false, true).unwrap();
    assert_eq!(im_end.len(), 1);
    assert!(t.is_eog(im_end[0]) && t.is_eog(2));
    assert!(!t.is_eog(t.encode("<|im_start|>", false, true).unwrap()[0]));
    assert_eq!(t.token_text(im_end[0]), Some("<|im_end|>"));
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    let Some(l) = load("gemma3") else { return };
    matches_llama_cpp(&l);
    round_trips(&l);
    chat_renders_like_reference(&l);
    let t = &l.tok;
    assert_eq!(t.vocab_size(), 262144);
    assert_eq!((t.bos(), t.eos()), (Some(2), Some(1)));
    let eot = t.encode("<end_of_turn>", false, true).unwrap();
    assert_eq!(eot.len(), 1);
    assert!(t.is_eog(eot[0]) && t.is_eog(1));
    assert_eq!(t.encode("", true, true).unwrap(), [2]);
}

/// The byte-level pre-tokenizer families no fetched model uses, on SmolLM2's vocabulary and
/// merges with `tokenizer.ggml.pre` swapped (llama.cpp tokenized the same swap; see
/// gen_tokenizer_refs.py): each family's split regexes and its whole-word rule must give
/// llama.cpp's ids on every case.
#[test]
fn pre_tokenizer_families_match_llama_cpp() {
    use halod::gguf::Value as GgufValue;
    for pre in ["llama-bpe", "qwen2", "glm4", "gpt-2"] {
        let refs = fixture(&format!("pre-{pre}"));
        assert_eq!(refs["pre"], pre);
        let Some(path) = model(refs["model"].as_str().unwrap()) else {
            return;
        };
        let mut gguf = GgufFile::open(&path).unwrap();
        gguf.header.metadata.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String(pre.to_string()),
        );
        let tok = Tokenizer::from_gguf(&gguf.header).unwrap();
        let l = Loaded { gguf, tok, refs };
        matches_llama_cpp(&l);
        round_trips(&l);
    }
}

/// Arbitrary text never fails to encode and always decodes back to itself.
#[test]
fn arbitrary_text_round_trips() {
    use proptest::prelude::*;
    let toks: Vec<Tokenizer> = ["smollm2", "gemma3"]
        .into_iter()
        .filter_map(load)
        .map(|l| l.tok)
        .collect();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(&"\\PC{0,40}|[ \\n\\t<>|a-z0-9]{0,40}", |s| {
            for t in &toks {
                for special in [false, true] {
                    let ids = t.encode(&s, special, special).unwrap();
                    let back = t.decode(&ids).unwrap();
                    if !special {
                        prop_assert_eq!(&back, &s);
                    }
                    let mut d = StreamDecoder::new(t);
                    let mut streamed: String = ids.iter().map(|i| d.push(*i)).collect();
                    streamed.push_str(&d.finish());
                    prop_assert_eq!(streamed, back);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// The model_header fuzz target's seeds (daemon/fuzz/seeds, gen_seeds.py) must reach the code
/// they are there for: each builds a tokenizer that round-trips text, and the BPE ones a template.
#[test]
fn fuzz_seeds_build_tokenizers_and_templates() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/model_header");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let g = halod::gguf::Gguf::parse(&std::fs::read(&path).unwrap()).unwrap();
        halod::llm::hparams::HParams::from_gguf(&g).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ids = tok.encode("hello world", false, false).unwrap();
        let bpe = path.to_string_lossy().contains("bpe");
        // SentencePiece-style vocabularies add a leading space, and decoding keeps it.
        let want = if bpe { "hello world" } else { " hello world" };
        assert_eq!(tok.decode(&ids).unwrap(), want, "{}", path.display());
        assert_eq!(
            ChatTemplate::from_gguf(&g, &tok).unwrap().is_some(),
            bpe,
            "{}",
            path.display()
        );
        n += 1;
    }
    assert_eq!(n, 4);
}
