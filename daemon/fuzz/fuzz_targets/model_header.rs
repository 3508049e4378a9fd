//! Everything halod derives from a GGUF header before touching the GPU must answer any bytes with
//! a value or an error, never a panic: the model's shape (HParams), the load estimate, the
//! tokenizer built from the metadata (and encoding, decoding and streaming with it) and the chat
//! template. Seeds with real tokenizer metadata are in seeds/model_header (gen_seeds.py).
#![no_main]

use libfuzzer_sys::fuzz_target;

use halod::config::KvCacheType;
use halod::llm::chat::{ChatTemplate, Message};
use halod::llm::hparams::HParams;
use halod::llm::tokenizer::{StreamDecoder, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(g) = halod::gguf::Gguf::parse(data) else {
        return;
    };
    let _ = HParams::from_gguf(&g);
    let _ = halod::llm::engine::estimate(&g, Some(64), 2, KvCacheType::F16, halod::llm::engine::WeightLayout { max_segment: 1 << 31, align: 4096 });
    let Ok(tok) = Tokenizer::from_gguf(&g) else {
        return;
    };
    for (text, add, special) in [
        ("Hello, world! 123", true, true),
        ("<|im_end|> </s> <s>", false, true),
        ("héllo\n\twörld 😀", true, false),
    ] {
        if let Ok(ids) = tok.encode(text, add, special) {
            let _ = tok.decode(&ids);
            let mut d = StreamDecoder::new(&tok);
            for id in &ids {
                let _ = d.push(*id);
            }
            let _ = d.finish();
        }
    }
    // Ids outside the vocabulary are errors, not panics.
    let _ = tok.decode(&[0, u32::MAX, tok.vocab_size() as u32]);
    if let Ok(Some(t)) = ChatTemplate::from_gguf(&g, &tok) {
        let _ = t.render(
            &[Message::new("system", "s"), Message::new("user", "u")],
            true,
        );
    }
});
